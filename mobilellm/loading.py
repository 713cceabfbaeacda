"""The one loader: any checkpoint the tool reads, as (model, tokenizer, quantization config, source).

A checkpoint is a folder (ours or an HF download, full precision or int4), the name of a real model we
can fetch (`smollm2-135m`), or a `.gguf` file. The name is resolved once, here, and the tokenizer is
checked against the model's vocabulary once, here; every command and the server go through `load`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .artifacts import resolve_checkpoint
from .hf import CheckpointError, model_from_tensors, read_config, read_tensors
from .model import Transformer
from .tokenizer import TOKENIZER_FILE, Tokenizer, tokenizer_files


@dataclass
class Loaded:
    model: Transformer
    tokenizer: Tokenizer | None  # None when the checkpoint has no tokenizer.json (and none was given)
    quant: object | None  # its QuantConfig when the checkpoint is quantized
    source: Path  # the resolved folder, or the .gguf file
    tokenizer_files: dict[str, str]  # the tokenizer's files as text, to write beside converted weights


def _from_gguf(path: Path, dtype: torch.dtype, config_changes: dict) -> tuple[Transformer, dict[str, str]]:
    from .gguf_import import gguf_tokenizer_files, read_gguf

    config, tensors = read_gguf(path, name=path.stem)
    model = model_from_tensors(config.replace(**config_changes), tensors, dtype=dtype)
    return model, gguf_tokenizer_files(path)


def _from_folder(folder: Path, dtype: torch.dtype, config_changes: dict):
    from .quant.checkpoint import load_quantized
    from .quant.config import QUANT_CONFIG_FILE

    if (folder / QUANT_CONFIG_FILE).exists():
        if config_changes:
            raise CheckpointError(f"{folder} is quantized: config changes ({', '.join(config_changes)}) apply to "
                                  "full-precision checkpoints only")
        return load_quantized(folder, dtype)
    config = read_config(folder).replace(**config_changes)
    return model_from_tensors(config, read_tensors(folder, config.family, dtype)), None


def load(checkpoint: str | Path, dtype: torch.dtype = torch.float32, *, tokenizer: str | Path | None = None,
         config_changes: dict | None = None, require_tokenizer: bool = False) -> Loaded:
    """Load `checkpoint` with its tokenizer (or the one in the folder `tokenizer`).

    `config_changes` are applied to the model config before the weights are assigned (e.g. a new
    `rope_theta` or `max_seq_len` for context extension); a change that alters a tensor's shape is refused
    by the state-dict check. `require_tokenizer`: a missing tokenizer is an error rather than None.
    """
    source = resolve_checkpoint(checkpoint)
    changes = dict(config_changes or {})
    quant = None
    if source.is_file():
        if source.suffix != ".gguf":
            raise CheckpointError(f"{source} is a file but not a .gguf: give a checkpoint folder or a GGUF file")
        model, files = _from_gguf(source, dtype, changes)
    else:
        model, quant = _from_folder(source, dtype, changes)
        files = {}
    if tokenizer is not None:
        files = tokenizer_files(tokenizer)
    elif not files:
        files = tokenizer_files(source if source.is_dir() else None)
    tok = Tokenizer.from_files(files, origin=str(tokenizer or source)) if TOKENIZER_FILE in files else None
    if tok is None and require_tokenizer:
        raise CheckpointError(f"no {TOKENIZER_FILE} in {tokenizer or source}: give a tokenizer folder (--tokenizer)")
    if tok is not None:
        cfg = model.config
        tok.check_fits(cfg.vocab_size, (cfg.bos_id, cfg.pad_id, *cfg.eos_ids))
    return Loaded(model, tok, quant, source, files)
