"""Reading a mergekit YAML config for the methods we run (linear, task_arithmetic, ties).

The subset read, with mergekit's meaning and defaults:

    merge_method: linear | task_arithmetic | ties
    base_model: PATH                  # task_arithmetic and ties
    models:
      - model: PATH
        parameters: {weight: W, density: D}
    parameters: {normalize: BOOL, lambda: L}

linear normalizes by the sum of the weights unless `normalize: false`; ties normalizes by the agreeing
weights (always, here: `normalize: false` is refused rather than silently run another way); a per-model
density must be the same for every model. Anything else in the file is an error, not ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from .methods import METHODS, MergeError, MergeMethod

TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "tokenizer_source"}


@dataclass(frozen=True)
class MergePlan:
    method: MergeMethod
    models: list[str]
    weights: list[float]
    base: str | None


def _parameters(entry: dict, where: str) -> dict:
    params = entry.get("parameters") or {}
    if not isinstance(params, dict):
        raise MergeError(f"{where}: parameters must be a mapping")
    for key, value in params.items():
        if not isinstance(value, (int, float, bool)):
            raise MergeError(f"{where}: parameter {key!r} must be a number (per-layer lists are not supported)")
    return params


def read_mergekit_config(path: str | Path) -> MergePlan:
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise MergeError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(config, dict):
        raise MergeError(f"{path}: expected a mapping with merge_method and models")
    if unknown := sorted(set(config) - TOP_KEYS):
        raise MergeError(f"{path}: unsupported keys {unknown}")
    method = config.get("merge_method")
    if method not in METHODS:
        raise MergeError(f"{path}: merge_method {method!r} is not one of {', '.join(METHODS)}")
    entries = config.get("models")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) and "model" in e for e in entries):
        raise MergeError(f"{path}: models must be a list of {{model: PATH, parameters: ...}}")
    top = _parameters(config, str(path))
    params = [_parameters(e, f"{path} model {e['model']}") for e in entries]
    weights = [float(p.get("weight", 1.0)) for p in params]
    densities = {float(p.get("density", top.get("density", 1.0))) for p in params}
    if len(densities) > 1:
        raise MergeError(f"{path}: per-model densities differ ({sorted(densities)}); one density is supported")
    normalize = top.get("normalize", method != "task_arithmetic")
    if method == "linear" and normalize:
        total = sum(weights)
        if total <= 0:
            raise MergeError(f"{path}: linear weights sum to {total}")
        weights = [w / total for w in weights]
    if method == "ties" and not normalize:
        raise MergeError(f"{path}: ties with normalize: false is not supported")
    merge = MergeMethod(method, density=densities.pop(), lam=float(top.get("lambda", 1.0)))
    return MergePlan(merge, [str(e["model"]) for e in entries], weights, config.get("base_model"))
