"""QAT with self-distillation through the one training loop (mobilellm.train.loop.train).

prepare is passed to the loop as a model transform; the loss is the loop's own KD (or CE) loss. The
loop's chunked losses call a swapped LM head as a module, so the head's fake quantization (weights and
int8 activations) applies inside the loss exactly as in the forward. After training, convert gives the
real int4 model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from ..train.loop import TrainConfig, TrainResult, train
from ..train.losses import CrossEntropy, Distillation
from ..train.teacher import frozen_copy
from .api import convert, prepare
from .config import QuantConfig


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
                   transforms=[lambda m: prepare(m, config)], val_batches=val_batches)
    with torch.no_grad():
        return dataclasses.replace(result, model=convert(result.model.eval(), config))
