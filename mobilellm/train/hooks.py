"""Step hooks: code a stage runs at fixed points of every optimizer step, without a second loop.

A hook subclasses `StepHook` and overrides what it needs:
- `begin(state)`: before the step's forward passes (a RoPE-theta or loss-weight schedule sets its value here);
- `after_backward(state)`: gradients of the whole step are summed and clipped, the optimizer has not stepped
  (gradient snapshots for data-mix estimation read them here);
- `end(state)`: after the optimizer step, with the step's loss.
Hooks are passed to `train(..., hooks=[...])` and run in list order. They keep no state of their own across a
resume: a hook's behaviour should follow from `state.step`, so a resumed run sees the same calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class StepState:
    step: int  # 0-based optimizer step
    total_steps: int
    model: nn.Module  # as trained (sharded or compiled blocks included)
    loss_fn: object  # the loop's Loss object
    optimizer: torch.optim.Optimizer
    lr: float
    loss: float | None = None  # the step's mean loss, from after_backward on
    grad_norm: float | None = None  # before clipping, from after_backward on
    skipped: bool = False  # a non-finite step: the optimizer did not step
    metrics: dict[str, float] = field(default_factory=dict)  # the loss's own figures (Loss.take_metrics), from after_backward on


class StepHook:
    def begin(self, state: StepState) -> None:
        pass

    def after_backward(self, state: StepState) -> None:
        pass

    def end(self, state: StepState) -> None:
        pass
