"""mix.json, read back: the domain weights a simulation found, for `pretrain --mix` and a recipe's `domain_weights`."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..data.sources import DataError

FORMAT = "mobilellm-mix/1"
MIX_FILE = "mix.json"


def read_mix(path: str | Path) -> dict[str, float]:
    """The domain weights of a mix.json (`simulate`), checked."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"mix file {path} does not exist (make one with `mobilellm mix`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"mix file {path} is not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("weights"), dict):
        raise DataError(f"{path} is not a mix file (format {FORMAT!r} with a weights table)")
    weights = data["weights"]
    if not weights or not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in weights.values()):
        raise DataError(f"{path}: weights must be finite numbers >= 0, got {weights}")
    return {str(d): float(w) for d, w in weights.items()}
