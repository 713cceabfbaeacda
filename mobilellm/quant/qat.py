"""QAT with self-distillation through the one training loop (mobilellm.train.loop.train).

`QATPrepare` is the model transform a recipe names (`recipes/qat.py`); the loss is the loop's own KD (or
CE) loss. The loop's chunked losses call a swapped LM head as a module, so the head's fake quantization
(weights and int8 activations) applies inside the loss exactly as in the forward. After training, convert
gives the real int4 model. `qat()` is the same for a model already in hand (Python API).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from ..hf import CheckpointError, read_config, read_tensors
from ..model import build_model
from ..train.loop import TrainConfig, TrainResult, train
from ..train.losses import CrossEntropy, Distillation
from ..train.teacher import frozen_copy
from .api import convert, prepare
from .config import QuantConfig


@dataclass(frozen=True)
class QATPrepare:
    """The recipe transform: swap in fake-quantized modules for `config` before the optimizer is built."""

    config: QuantConfig

    def __call__(self, model: nn.Module) -> nn.Module:
        return prepare(model, self.config)


def qat(model: nn.Module, config: QuantConfig, batches: Iterator[dict], train_config: TrainConfig,
        run_dir: str | Path, *, self_distillation: bool = True, teacher: nn.Module | None = None,
        val_batches: Sequence[dict] | None = None) -> TrainResult:
    """prepare -> train (KL to the frozen full-precision model, or plain CE) -> convert. Returns the loop's
    result with `model` the converted int4 model; the loop's checkpoints (fake-quantized, resumable; for
    learnable ranges they hold `...weight_fake_quantizer.scale` tensors) are in run_dir. `teacher`: the
    full-precision model when the caller already holds a frozen copy (default: a copy of `model`)."""
    if self_distillation:
        loss = Distillation(teacher if teacher is not None else frozen_copy(model))
    else:
        loss = CrossEntropy()
    result = train(model, batches, loss, train_config, run_dir,
                   transforms=[QATPrepare(config)], val_batches=val_batches)
    with torch.no_grad():
        return dataclasses.replace(result, model=convert(result.model.eval(), config))


def load_prepared(folder: str | Path, config: QuantConfig) -> nn.Module:
    """A QAT loop checkpoint (full weights, learnt ranges under `...weight_fake_quantizer.*`) as the prepared
    model, ready for `convert`: how a run sharded over processes (FSDP) is converted after training."""
    model_config = read_config(folder)
    model = prepare(build_model(model_config, seed=None), config)
    tensors = read_tensors(Path(folder), model_config.family)
    result = model.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if not (model_config.tie_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{folder} is not a QAT checkpoint of the {config.scheme} scheme: missing "
                              f"{missing[:4]}, unexpected {result.unexpected_keys[:4]}")
    return model


def run_qat_recipe(recipe, run_dir: str | Path, out: str | Path, *, resume: bool = False, parallel=None,
                   micro_batch: int | None = None) -> TrainResult:
    """A recipe whose transforms hold a `QATPrepare` (QAT, or QAT-aware SFT/DPO) trained through `run_recipe` into
    `run_dir`, then converted to the scheme's int4 model and saved to `out` (by the main process). Returns the
    loop's result (its model the trained, prepared one)."""
    from ..train.distributed import init_parallel
    from ..train.recipe import run_recipe
    from ..tokenizer import tokenizer_files
    from .checkpoint import save_quantized

    prepared = [t.config for t in recipe.transforms if isinstance(t, QATPrepare)]
    if len(prepared) != 1:
        raise ValueError(f"recipe {recipe.name!r} needs exactly one QATPrepare transform to be converted to int4")
    config = prepared[0]
    parallel = parallel or init_parallel(None)
    result = run_recipe(recipe, run_dir, resume=resume, parallel=parallel, micro_batch=micro_batch)
    if parallel.is_main:
        # One process holds every weight only when unsharded; the final checkpoint always holds them all.
        trained = result.model if parallel.world_size == 1 else load_prepared(result.checkpoint, config)
        with torch.no_grad():
            model = convert(trained.eval(), config)
        save_quantized(model, config, out, extra_files=tokenizer_files(result.checkpoint))
    return result
