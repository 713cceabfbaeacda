"""Merge methods as pure tensor math: one tensor name at a time, every input's tensor of that name.

- linear: sum_b w_b theta_b (MobileLLM-Pro's specialist merge; weights must sum to 1);
- task arithmetic: base + sum_b w_b (theta_b - base) (weights free, e.g. MergeMix's alphas);
- TIES (Yadav et al. 2023, as mergekit runs it): each task vector trimmed to its `density` largest magnitudes,
  a sign elected per element from the weighted sum, and the weighted task vectors that agree with it
  averaged over the weights that agree, scaled by `lam`, added to the base.

All math runs in fp32 and returns the inputs' dtype. Inputs are never modified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import UserError

METHODS = ("linear", "task_arithmetic", "ties")


class MergeError(UserError):
    """Inputs that cannot be merged: names the tensor, file or weight at fault."""


@dataclass(frozen=True)
class MergeMethod:
    name: str  # one of METHODS
    density: float = 1.0  # TIES: fraction of each task vector's entries kept (by magnitude)
    lam: float = 1.0  # TIES: scale of the merged task vector

    def __post_init__(self):
        if self.name not in METHODS:
            raise MergeError(f"unknown merge method {self.name!r}; expected one of {', '.join(METHODS)}")
        if not 0 < self.density <= 1:
            raise MergeError(f"density must be in (0, 1], got {self.density}")

    @property
    def elementwise(self) -> bool:
        """Each output element depends only on the same element of the inputs (TIES trims per tensor)."""
        return self.name != "ties" or self.density >= 1

    @property
    def needs_base(self) -> bool:
        return self.name != "linear"

    def check_weights(self, weights: Sequence[float]) -> None:
        if not weights:
            raise MergeError("no models to merge")
        if self.name == "linear" and abs(sum(weights) - 1.0) > 1e-6:
            raise MergeError(f"linear merge weights must sum to 1, got {sum(weights):.6g} ({list(weights)}); "
                             "for free weights use task_arithmetic")
        if any(w < 0 for w in weights) and self.name == "linear":
            raise MergeError(f"linear merge weights must be >= 0, got {list(weights)}")

    def __call__(self, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                 base: torch.Tensor | None = None) -> torch.Tensor:
        if self.name == "linear":
            return linear(tensors, weights)
        if base is None:
            raise MergeError(f"{self.name} needs a base model")
        if self.name == "task_arithmetic":
            return task_arithmetic(base, tensors, weights)
        return ties(base, tensors, weights, density=self.density, lam=self.lam)


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    out = torch.zeros(tensors[0].shape, dtype=torch.float32)
    for tensor, weight in zip(tensors, weights):
        out.add_(tensor.float(), alpha=weight)
    return out.to(tensors[0].dtype)


def task_arithmetic(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    base32 = base.float()
    out = base32.clone()
    for tensor, weight in zip(tensors, weights):
        out.add_(tensor.float() - base32, alpha=weight)
    return out.to(base.dtype)


def keep_largest(delta: torch.Tensor, density: float) -> torch.Tensor:
    """`delta` with all but its int(density * numel) largest-magnitude entries set to zero."""
    if density >= 1:
        return delta
    flat = delta.flatten()
    kept = torch.zeros_like(flat)
    top = flat.abs().topk(int(density * flat.numel())).indices
    kept[top] = flat[top]
    return kept.view_as(delta)


def ties(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], *, density: float = 1.0,
         lam: float = 1.0) -> torch.Tensor:
    base32 = base.float()
    deltas = torch.stack([keep_largest(t.float() - base32, density) for t in tensors])  # (M, ...)
    w = torch.tensor(list(weights), dtype=torch.float32).view(-1, *([1] * base.dim()))
    weighted = deltas * w
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)  # a tie elects +
    agree = weighted.sign() == elected  # zeros (trimmed) agree with no sign
    merged = (weighted * agree).sum(0)
    divisor = (w * agree).sum(0)
    merged = merged / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return (base32 + lam * merged).to(base.dtype)
