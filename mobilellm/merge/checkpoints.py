"""Merging checkpoints: checked once, then streamed tensor by tensor from safetensors into new shards.

Peak memory is about one tensor per input (plus the base and the output tensor), whatever the model size:
`TensorReader` reads one tensor at a time and `ShardWriter` writes a shard as it fills. For a weight search,
`load_states` holds the inputs in memory once and `merge_states` makes each candidate without any file.

The output is a normal checkpoint folder with the inputs' tokenizer and `merge.json`: the sources (with
the sha256 of their weight files), the method, the weights and any scores the caller records.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from ..artifacts import resolve_checkpoint
from ..config import ModelConfig
from ..hf import ShardWriter, TensorReader, read_config, weight_files
from ..quant.config import QUANT_CONFIG_FILE
from ..tokenizer import TOKENIZER_FILE, Tokenizer, tokenizer_files
from .methods import MergeError, MergeMethod

MERGE_FILE = "merge.json"
CHUNK_ELEMENTS = 1 << 24  # 16M elements: 64 MB of fp32 per input at a time


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _config_difference(a: ModelConfig, b: ModelConfig) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: {da.get(k)!r} vs {db.get(k)!r}" for k in sorted(set(da) | set(db))
            if k != "name" and da.get(k) != db.get(k)]


def check_inputs(folders: Sequence[Path]) -> ModelConfig:
    """The inputs' shared config; refuses quantized inputs, other configs, tokenizers, tensor names or shapes."""
    configs = []
    for folder in folders:
        if (folder / QUANT_CONFIG_FILE).exists():
            raise MergeError(f"{folder} is quantized: merge full-precision checkpoints, then quantize the merge")
        configs.append(read_config(folder))
    first = configs[0]
    for folder, config in zip(folders[1:], configs[1:]):
        if diff := _config_difference(first, config):
            raise MergeError(f"{folder} has another model config than {folders[0]}: {'; '.join(diff[:4])}")
    tokenizers = {f: Tokenizer.load(f).backend.to_str() for f in folders if (f / TOKENIZER_FILE).exists()}
    if len(set(tokenizers.values())) > 1:
        a, b = list(tokenizers)[:2]
        raise MergeError(f"{a} and {b} have different tokenizers: merged weights would mix two vocabularies")
    readers = [TensorReader(f, first.family) for f in folders]
    names = merged_names(readers[0], first)
    for folder, reader in zip(folders[1:], readers[1:]):
        theirs = merged_names(reader, first)
        if missing := sorted(set(names) - set(theirs)):
            raise MergeError(f"{folder} lacks tensor {missing[0]!r} (and {len(missing) - 1} more)")
        if extra := sorted(set(theirs) - set(names)):
            raise MergeError(f"{folder} has tensor {extra[0]!r} that {folders[0]} lacks")
        for name in names:
            if reader.shape(name) != readers[0].shape(name):
                raise MergeError(f"tensor {name!r}: shape {reader.shape(name)} in {folder} vs "
                                 f"{readers[0].shape(name)} in {folders[0]}")
    return first


def merged_names(reader: TensorReader, config: ModelConfig) -> list[str]:
    """The tensors to merge: a tied head is the embedding, merged once (some exporters store both)."""
    return [n for n in reader.keys() if not (config.tie_embeddings and n == "lm_head.weight")]


def resolve(models: Sequence[str | Path], base: str | Path | None, method: MergeMethod,
            weights: Sequence[float]) -> tuple[list[Path], Path | None]:
    if len(weights) != len(models):
        raise MergeError(f"{len(models)} models but {len(weights)} weights")
    method.check_weights(weights)
    if method.needs_base and base is None:
        raise MergeError(f"{method.name} merges task vectors: give the base model (--base)")
    return [resolve_checkpoint(m) for m in models], resolve_checkpoint(base) if base is not None else None


def merge_checkpoints(models: Sequence[str | Path], weights: Sequence[float], method: MergeMethod, out: str | Path,
                      *, base: str | Path | None = None, record: dict | None = None,
                      max_shard_bytes: int = 2 * 1024**3, progress: bool = True) -> Path:
    """Merge `models` (with `base` for task vectors) into the checkpoint folder `out`, streaming."""
    folders, base_folder = resolve(models, base, method, weights)
    config = check_inputs(folders + ([base_folder] if base_folder else []))
    readers = [TensorReader(f, config.family) for f in folders]
    base_reader = TensorReader(base_folder, config.family) if base_folder else None
    summary = {
        "method": {"name": method.name, "density": method.density, "lam": method.lam},
        "models": [{"path": str(f), "weight": w, "weights_sha256": [_sha256(p) for p in weight_files(f)]}
                   for f, w in zip(folders, weights)],
        "base": str(base_folder) if base_folder else None,
        **(record or {}),
    }
    extra = {**tokenizer_files(folders[0]), MERGE_FILE: json.dumps(summary, indent=2) + "\n"}
    names = merged_names(readers[0], config)
    with ShardWriter(out, config, max_shard_bytes=max_shard_bytes, extra_files=extra) as writer:
        for name in tqdm(names, desc=f"{method.name} merge", unit="tensor", disable=not progress):
            writer.add(name, merge_tensor(name, readers, base_reader, weights, method))
    return Path(out)


def merge_tensor(name: str, readers: Sequence[TensorReader], base: TensorReader | None, weights: Sequence[float],
                 method: MergeMethod, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """One merged tensor. Elementwise methods read and merge a large tensor (the embedding) in row blocks, so
    memory holds the output and one block per input instead of every input whole and their fp32 copies;
    TIES trims by magnitude over the whole tensor, so it reads whole tensors."""
    shape = readers[0].shape(name)
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    if not method.elementwise or math.prod(shape) <= chunk_elements or not shape:
        return method([r.get(name) for r in readers], weights, base.get(name) if base else None)
    step, out = max(1, chunk_elements // row), None
    for start in range(0, shape[0], step):
        rows = slice(start, min(start + step, shape[0]))
        block = method([r.get(name, rows) for r in readers], weights, base.get(name, rows) if base else None)
        out = torch.empty(shape, dtype=block.dtype) if out is None else out
        out[rows] = block
    return out


def load_states(folders: Sequence[Path]) -> tuple[ModelConfig, list[dict[str, torch.Tensor]]]:
    """Every input's tensors in memory (for a search that merges many candidates of models that fit)."""
    config = check_inputs(folders)
    states = []
    for folder in folders:
        reader = TensorReader(folder, config.family, torch.float32)
        states.append({name: reader.get(name) for name in merged_names(reader, config)})
    return config, states


def merge_states(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float], method: MergeMethod,
                 base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    method.check_weights(weights)
    return {name: method([s[name] for s in states], weights, base[name] if base is not None else None)
            for name in states[0]}
