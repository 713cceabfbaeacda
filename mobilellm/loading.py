"""Load any checkpoint the tool writes or reads: full precision or quantized, a folder or a fetchable name."""

from __future__ import annotations

from pathlib import Path

import torch

from .artifacts import resolve_checkpoint
from .hf import load_pretrained
from .model import Transformer


def load_model(checkpoint: str | Path, dtype: torch.dtype = torch.float32):
    """(model, QuantConfig or None). A folder's quantization_config.json marks it as quantized."""
    from .quant.checkpoint import load_quantized
    from .quant.config import QUANT_CONFIG_FILE

    folder = resolve_checkpoint(checkpoint)
    if (folder / QUANT_CONFIG_FILE).exists():
        return load_quantized(folder, dtype)
    return load_pretrained(folder, dtype=dtype), None


def load_any_model(checkpoint: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
    return load_model(checkpoint, dtype)[0]
