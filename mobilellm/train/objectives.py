"""What a recipe trains toward: loss factories that build the loop's `Loss` once the run is set up.

A recipe names its loss as a small frozen value (`KD(teacher=...)`, `CE()`, `SelfDistillation()`), so the
recipe stays printable and comparable; `run_recipe` calls it with the `StageContext` (the starting model
before any transform, its tokenizer, the device, the batch source) when the run has them. A new objective (DPO,
a positional-distillation teacher) is one more class here, not a branch in the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..artifacts import resolve_checkpoint
from .losses import CrossEntropy, Distillation, Loss
from .preference import PreferenceLoss, cached_reference
from .teacher import frozen_copy, load_teacher
from .teacher_cache import TopKCache, teacher_identity


@dataclass
class StageContext:
    model: nn.Module  # the starting weights, before the recipe's transforms
    tokenizer: Path | None  # the run's tokenizer folder
    device: torch.device
    batches: object | None = None  # the run's training batch source (e.g. to precompute per-example values)
    run_dir: Path | None = None  # where the run keeps its files (checkpoints, caches)
    parallel: object | None = None  # the run's processes (mobilellm.train.distributed)
    seq_len: int | None = None  # the training window: a teacher's context must hold it

    @property
    def dtype(self) -> torch.dtype:
        """Frozen models (teachers) run in bf16 on a GPU, fp32 on a CPU."""
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32


class Objective:
    batch_kind = "sequences"  # what its loss reads: next-token targets; "pairs" for preference losses

    def check(self, recipe_name: str) -> None:
        """Problems visible before any data or weights are read (raise ValueError naming the fix)."""

    def __call__(self, context: StageContext) -> Loss:
        raise NotImplementedError


@dataclass(frozen=True)
class CE(Objective):
    """Plain next-token cross-entropy."""

    def __call__(self, context: StageContext) -> Loss:
        return CrossEntropy()


@dataclass(frozen=True)
class KD(Objective):
    """Forward KL to a teacher checkpoint's full distribution (checked to share the student's tokenizer)."""

    teacher: str | None
    temperature: float = 1.0
    ce_weight: float = 0.0
    top_k: int | None = None
    cache: str | None = None  # folder of cached top-k teacher log-probs (needs top_k): the teacher runs once per window

    def check(self, recipe_name: str) -> None:
        if not self.teacher:
            raise ValueError(f"recipe {recipe_name!r} distills: give a teacher checkpoint folder (--teacher)")
        if self.cache and not self.top_k:
            raise ValueError(f"recipe {recipe_name!r}: a teacher cache holds the teacher's top-k log-probs; set top_k "
                             "(the full distribution is recomputed, not cached)")

    def __call__(self, context: StageContext) -> Loss:
        folder = resolve_checkpoint(self.teacher)  # a fetchable name or a run folder -> its checkpoint folder
        teacher = load_teacher(folder, context.model.config, context.tokenizer, dtype=context.dtype,
                               device=context.device, seq_len=context.seq_len)
        cache = None
        if self.cache:
            identity = teacher_identity(folder, teacher, context.dtype)
            cache = TopKCache(self.cache, teacher, self.top_k, self.temperature, identity)
        return Distillation(teacher, temperature=self.temperature, ce_weight=self.ce_weight, top_k=self.top_k,
                            cache=cache)


@dataclass(frozen=True)
class SelfDistillation(Objective):
    """KL to a frozen copy of the starting weights (QAT: the full-precision model teaches its quantized self)."""

    temperature: float = 1.0
    ce_weight: float = 0.0

    def __call__(self, context: StageContext) -> Loss:
        return Distillation(frozen_copy(context.model).to(context.device), temperature=self.temperature, ce_weight=self.ce_weight)


@dataclass(frozen=True)
class DPO(Objective):
    """A preference loss (sigmoid = DPO, ipo, hinge) on preference pairs, against a frozen reference.

    The reference is the starting weights (`reference=None`, the usual choice: the SFT model) or a checkpoint.
    `precompute`: its log-probs of every pair are computed once before training and cached in the run folder
    (`reference_logps/`, read again on resume), and no reference model is kept during training.
    """

    batch_kind = "pairs"
    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0  # sigmoid only: the assumed fraction of flipped preferences (cDPO)
    reference: str | None = None
    precompute: bool = False

    def check(self, recipe_name: str) -> None:
        PreferenceLoss(self.loss, self.beta, self.label_smoothing)  # refuses unknown losses and bad numbers
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError(f"recipe {recipe_name!r}: label smoothing applies to the sigmoid loss, not {self.loss}")

    def __call__(self, context: StageContext) -> Loss:
        if self.reference is None:
            reference = frozen_copy(context.model).to(device=context.device, dtype=context.dtype)
        else:
            reference = load_teacher(self.reference, context.model.config, context.tokenizer, dtype=context.dtype,
                                     device=context.device)
        if not self.precompute:
            return PreferenceLoss(self.loss, self.beta, self.label_smoothing, reference)
        identity = {"reference": self.reference or "the starting weights", "dtype": str(context.dtype)}
        context.batches.set_reference(cached_reference(reference, context.batches, context.run_dir, context.parallel,
                                                       context.device, identity))
        return PreferenceLoss(self.loss, self.beta, self.label_smoothing, None)
