"""First-order influence: how well a gradient step on a domain's data lowers the target's loss.

A step of size lr along a domain's gradient g_d changes the target loss by about -lr <g_d, g_T> (first order).
The utility of a domain at a checkpoint is the cosine of g_d with the target's gradient, averaged over the
target's parts (mean_p cos(g_d, g_p) = <g_d / |g_d|, mean_p g_p / |g_p|>, so one vector holds the target): the
direction alone, since the step size is the optimizer's and a domain's gradient norm says more about its loss
level than its use, and every target part counts alike however large its gradient. The
gradients are full (every parameter, no layer restriction or projection), taken at once over a block of rows:
the mean next-token CE per target token. g_T is the mean of the target parts' gradients (each part counts
alike, as the target's average loss does).

Under torchrun each process takes every world_size-th row of the same blocks; the summed gradients and token
counts are all-reduced, so the result is the one-process gradient up to summation order.
"""

from __future__ import annotations

import torch
from torch import nn

from ..train.distributed import SingleProcess
from ..train.losses import CrossEntropy
from .target import Rows, share


def mean_gradient(model: nn.Module, rows: Rows, parallel: SingleProcess, micro_rows: int) -> tuple[torch.Tensor, float]:
    """(flat gradient of the mean token CE over `rows`, that mean loss), all processes together."""
    ce = CrossEntropy()
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.zeros(sum(p.numel() for p in params), device=parallel.device)
    loss_sum = torch.zeros((), device=parallel.device)
    tokens = torch.zeros((), device=parallel.device)
    for batch in share(rows, parallel.rank, parallel.world_size, micro_rows):
        batch = {k: v.to(parallel.device) for k, v in batch.items()}
        count = ce.count(batch)
        if count == 0:
            continue
        part = ce(model, batch)
        grads = torch.autograd.grad(part, params, allow_unused=True)
        flat += torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
        loss_sum += part.detach()
        tokens += count
    total = parallel.all_reduce_sum(tokens)
    if total.item() == 0:
        raise ValueError("a gradient block holds no target tokens")
    return parallel.all_reduce_sum(flat) / total, (parallel.all_reduce_sum(loss_sum) / total).item()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    denominator = (a.norm() * b.norm()).item()
    return (a @ b).item() / denominator if denominator > 0 else 0.0


def alignments(model: nn.Module, target: dict[str, Rows], probes: dict[str, Rows], parallel: SingleProcess,
               micro_rows: int) -> dict:
    """At one checkpoint: per domain the cosine of its gradient with the target's, with the losses and norms."""
    model.eval()
    g_target, target_loss = None, {}
    for name, rows in target.items():  # the mean of unit gradients: one flat vector in memory besides the domain's
        g, target_loss[name] = mean_gradient(model, rows, parallel, micro_rows)
        unit = g.double() / max(g.double().norm().item(), 1e-30) / len(target)
        g_target = unit if g_target is None else g_target.add_(unit)
    utilities, losses, norms = {}, {}, {}
    for domain, rows in probes.items():
        g, loss = mean_gradient(model, rows, parallel, micro_rows)
        norm = g.double().norm().item()
        utilities[domain] = (g.double() @ g_target).item() / norm if norm > 0 else 0.0
        losses[domain], norms[domain] = loss, norm
    return {"utilities": utilities, "domain_loss": losses, "domain_grad_norm": norms,
            "target_loss": target_loss,
            "target_alignment": g_target.norm().item()}  # 1 when the parts' gradients agree
