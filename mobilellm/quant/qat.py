"""QAT with self-distillation through the one training loop (mobilellm.train.loop.train).

prepare is passed to the loop as a model transform; the loss is the loop's own KD (or CE) loss, read
through `QuantizedHead` so that the LM head is quantized in the loss exactly as in the forward: the loop's
chunked losses multiply hidden states by `model.lm_head.weight` themselves (never materialising the
logits), which would otherwise bypass the head's fake quantizer. After training, convert gives the real
int4 model.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, Sequence

import torch
from torch import nn

from ..train.loop import TrainConfig, TrainResult, train
from ..train.losses import CrossEntropy, Distillation, Loss
from .api import convert, prepare
from .config import QuantConfig
from .fake import FakeQuantLinear
from .math import fake_quantize_int8_per_token


class _QuantizedHeadView:
    """What a chunked loss reads of the model (config, hidden_states, lm_head.weight), with the head's
    input activations and weight fake-quantized as FakeQuantLinear.forward would."""

    def __init__(self, model: nn.Module):
        head = model.lm_head
        if not isinstance(head, FakeQuantLinear):
            raise ValueError("QuantizedHead needs a model prepared for QAT (its lm_head is not fake-quantized)")
        self.model, self.config = model, model.config
        self.quantize_activations = head.quantize_activations
        self.lm_head = SimpleNamespace(weight=head.weight_fake_quantizer(head.weight))  # STE to weight and scale

    def hidden_states(self, *args):
        hidden = self.model.hidden_states(*args)  # (B, T, dim)
        return fake_quantize_int8_per_token(hidden) if self.quantize_activations else hidden


@dataclass
class QuantizedHead:
    """Wraps a training loss so it sees the QAT model's quantized LM head."""

    loss: Loss

    def __call__(self, model, batch):
        return self.loss(_QuantizedHeadView(model), batch)


def frozen_teacher(model: nn.Module) -> nn.Module:
    """A full-precision copy that receives no gradient: the self-distillation teacher."""
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


def qat(model: nn.Module, config: QuantConfig, batches: Iterator[dict], train_config: TrainConfig,
        run_dir: str | Path, *, self_distillation: bool = True, teacher: nn.Module | None = None,
        val_batches: Sequence[dict] | None = None) -> TrainResult:
    """prepare -> train (KL to the frozen full-precision model, or plain CE) -> convert. Returns the loop's
    result with `model` the converted int4 model; the loop's checkpoints (fake-quantized, resumable; for
    learnable ranges they hold `...weight_fake_quantizer.scale` tensors) are in run_dir. `teacher`: the
    full-precision model when the caller already holds a frozen copy (default: a copy of `model`)."""
    if self_distillation:
        inner = Distillation(teacher if teacher is not None else frozen_teacher(model))
    else:
        inner = CrossEntropy()
    result = train(model, batches, QuantizedHead(inner), train_config, run_dir,
                   transforms=[lambda m: prepare(m, config)], val_batches=val_batches)
    with torch.no_grad():
        return dataclasses.replace(result, model=convert(result.model.eval(), config))
