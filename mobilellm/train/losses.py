"""Training losses read from the student's final hidden states, computed in chunks along the sequence.

At MobileLLM-Pro's vocab (202,048) the logits of one 4k sequence are ~3 GB in fp32 (SPEC.md 2.1), so no
loss here ever materialises (B, T, V): `chunked_linear_loss` projects a chunk of rows through the LM head,
takes the loss and its gradient for that chunk at once, and keeps only d/d(hidden) and d/d(head weight).
The backward pass is then a scale, with no recomputation of the chunks. CE and full KD write their
closed-form gradients over the logits buffer (fewer passes over (n, V) than autograd's); top-k KD uses
autograd per chunk.

A loss object is called as `loss(model, batch) -> summed loss` (fp32 scalar) and says what that sum runs
over with `loss.count(batch)`: target tokens (positions where `targets != -100`) by default; a pairwise loss
such as DPO counts pairs. The loop divides the step's summed loss by the step's count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data.packing import IGNORE_INDEX

# (logits (n, V) fp32, rows, need_grad) -> (summed loss, d loss / d logits (n, V) or None). The logits
# buffer is the function's to overwrite (e.g. into its own gradient).
ChunkLoss = Callable[[torch.Tensor, slice, bool], tuple[torch.Tensor, torch.Tensor | None]]


class Loss:
    """A training loss: `loss(model, batch)` is summed over `count(batch)` items (per target token here)."""

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["targets"] != IGNORE_INDEX).sum()

    def take_metrics(self) -> dict[str, torch.Tensor]:
        """Figures of its own (e.g. DPO's reward margin) summed over its items since the last call; the loop
        logs each divided by the step's count. Every call must name the same figures on every process."""
        return {}


class _ChunkedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, chunk_loss: ChunkLoss, chunk_size: int):
        # hidden (N, D), weight (V, D)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h = hidden[rows]
            logits = (h @ weight.T).float()  # (n, V): the only vocab-sized tensor alive
            loss, g = chunk_loss(logits, rows, need_h or need_w)
            total += loss.detach()
            if g is not None:
                g = g.to(h.dtype)
                if need_h:
                    grad_h[rows] = g @ weight.to(g.dtype)
                if need_w:
                    grad_w += (g.T @ h).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def chunked_linear_loss(hidden: torch.Tensor, weight: torch.Tensor, chunk_loss: ChunkLoss,
                        chunk_size: int = 1024) -> torch.Tensor:
    """Sum over row chunks of chunk_loss(hidden[rows] @ weight.T); memory O(chunk * V), not O(N * V)."""
    return _ChunkedLinearLoss.apply(hidden, weight, chunk_loss, chunk_size)


def _chunk_value(head: nn.Module, hidden: torch.Tensor, rows: slice, chunk_loss: ChunkLoss) -> torch.Tensor:
    return chunk_loss(head(hidden).float(), rows, False)[0]


def chunk_rows(vocab_size: int, elements: int = 2**25) -> int:
    """Rows per chunk so one (rows, V) fp32 buffer holds about `elements` values (128 MiB)."""
    return max(16, elements // vocab_size)


def head_loss(head: nn.Module, hidden: torch.Tensor, chunk_loss: ChunkLoss, chunk_size: int | None = None) -> torch.Tensor:
    """The summed chunk loss of head(hidden) (N, V), never holding more than one chunk of logits.

    A plain nn.Linear head takes the fused path (`chunked_linear_loss`). Any other head module, such as
    a QAT fake-quantized linear, is called as a module, chunk by chunk under activation checkpointing, so
    its own forward (and backward) applies; its logits are recomputed in the backward.
    """
    chunk_size = chunk_size or chunk_rows(head.weight.shape[0])
    if type(head) is nn.Linear:
        return chunked_linear_loss(hidden, head.weight, chunk_loss, chunk_size)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        total = total + checkpoint(_chunk_value, head, hidden[rows], rows, chunk_loss, use_reentrant=False)
    return total


def with_autograd(loss_fn: Callable[[torch.Tensor, slice], torch.Tensor]) -> ChunkLoss:
    """A ChunkLoss from a plain differentiable function of the chunk's logits (gradient by autograd)."""
    def chunk_loss(logits, rows, need_grad):
        if not need_grad:
            return loss_fn(logits, rows), None
        with torch.enable_grad():
            logits.requires_grad_()
            loss = loss_fn(logits, rows)
            (grad,) = torch.autograd.grad(loss, logits)
        return loss, grad
    return chunk_loss


def target_rows(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states (N, D) and targets (N,) of the positions that have a target."""
    hidden = model.hidden_states(batch["tokens"], batch.get("positions"), batch.get("doc_ids"))  # (B, T, D)
    keep = batch["targets"] != IGNORE_INDEX  # (B, T)
    return hidden[keep], batch["targets"][keep]


# ---- per-chunk losses on logits (n, V) ------------------------------------------------------------

def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, need_grad: bool, weights: torch.Tensor | None = None):
    """Summed CE (each row's times `weights` (n,) when given) and its gradient weight * (softmax - onehot),
    written over the logits buffer (no autograd graph)."""
    picked = logits.gather(1, targets[:, None]).squeeze(1)  # (n,)
    if need_grad:  # one exp pass serves the loss and the softmax (logsumexp takes its own, and a (n, V) temporary)
        peak = logits.amax(-1, keepdim=True)  # (n, 1)
        grad = logits.sub_(peak).exp_()  # unnormalised softmax, in place
        total = grad.sum(-1, keepdim=True)
        lse = (peak + total.log()).squeeze(1)
    else:
        lse = logits.logsumexp(-1)
    ce = lse - picked  # (n,)
    loss = ce.sum() if weights is None else (ce * weights).sum()
    if not need_grad:
        return loss, None
    grad.div_(total)
    grad[torch.arange(len(targets), device=grad.device), targets] -= 1
    return loss, grad if weights is None else grad.mul_(weights[:, None])


def token_logprobs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                   chunk_size: int | None = None) -> torch.Tensor:
    """log p(target) (N,) fp32 of hidden rows (N, D) through the head, a chunk of logits at a time, no gradient."""
    chunk_size = chunk_size or chunk_rows(head.weight.shape[0])
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = head(hidden[rows]).float()  # (n, V)
            out[rows] = logits.gather(1, targets[rows, None]).squeeze(1) - logits.logsumexp(-1)
    return out


def kl_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, need_grad: bool):
    """Summed forward KL(teacher || student) over the full vocabulary, scaled by T^2 (Hinton), and its gradient.

    d/dz_s [T^2 KL(softmax(z_t/T) || softmax(z_s/T))] = T * (softmax(z_s/T) - softmax(z_t/T)).
    In-place steps keep five (n, V) buffers alive at most: both logits, log p_s, log p_t, p_t.
    """
    scale = 1.0 / temperature
    log_s = (student_logits * scale if temperature != 1 else student_logits).log_softmax(-1)
    teacher_logits = teacher_logits.float()
    log_t = (teacher_logits.mul_(scale) if temperature != 1 else teacher_logits).log_softmax(-1)
    del teacher_logits
    p_t = log_t.exp()
    loss = temperature**2 * log_t.sub_(log_s).mul_(p_t).sum()
    return loss, (log_s.exp_().sub_(p_t).mul_(temperature) if need_grad else None)


def kl_top_k(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, k: int,
             tail_bucket: bool) -> torch.Tensor:
    """Sparse KD: the teacher's top-k probabilities, renormalised over the k, or with the rest as one tail bucket.

    Renormalised: KL(q || p_s) with q = p_t[top-k] / sum p_t[top-k], zero elsewhere.
    Tail bucket: a (k+1)-way KL, the (k+1)-th outcome being "any other token" for both teacher and student.
    """
    top_log_t, ids = F.log_softmax(teacher_logits.float() / temperature, dim=-1).topk(k, dim=-1)  # (n, k)
    return kl_sparse(student_logits, top_log_t, ids, temperature, tail_bucket)


def kl_sparse(student_logits: torch.Tensor, top_log_t: torch.Tensor, ids: torch.Tensor, temperature: float,
              tail_bucket: bool) -> torch.Tensor:
    """`kl_top_k` from the teacher's top-k log-probabilities (n, k) at `temperature` and their token ids (n, k),
    e.g. read from a cache (`mobilellm.train.teacher_cache`)."""
    log_s = F.log_softmax(student_logits / temperature, dim=-1)  # (n, V)
    top_log_s = log_s.gather(-1, ids)
    if not tail_bucket:
        log_q = top_log_t - top_log_t.logsumexp(-1, keepdim=True)
        return temperature**2 * (log_q.exp() * (log_q - top_log_s)).sum()
    tiny = torch.finfo(torch.float32).tiny  # the clamp keeps log(0) finite when the top-k hold all the mass
    tail_t = (1 - top_log_t.exp().sum(-1)).clamp_min(tiny).log()  # (n,)
    tail_s = (1 - top_log_s.exp().sum(-1)).clamp_min(tiny).log()
    kl = (top_log_t.exp() * (top_log_t - top_log_s)).sum() + (tail_t.exp() * (tail_t - tail_s)).sum()
    return temperature**2 * kl


# ---- loss objects ---------------------------------------------------------------------------------

@dataclass
class CrossEntropy(Loss):
    """Next-token cross-entropy against `targets`."""

    chunk_size: int | None = None  # rows per chunk; None: about 128 MiB of fp32 logits (`chunk_rows`)

    def __call__(self, model, batch):
        hidden, targets = target_rows(model, batch)
        return head_loss(model.lm_head, hidden,
                         lambda logits, rows, need_grad: cross_entropy(logits, targets[rows], need_grad), self.chunk_size)


@dataclass
class Distillation(Loss):
    """ce_weight * CE + (1 - ce_weight) * KL(teacher || student), teacher logits also taken chunk by chunk.

    `top_k=None` matches the teacher's full distribution (the MobileLLM-Pro recipe); an integer gives sparse
    KD (see `kl_top_k`). The teacher must be frozen (see `mobilellm.train.teacher`).
    """

    teacher: nn.Module
    temperature: float = 1.0
    ce_weight: float = 0.0
    top_k: int | None = None
    tail_bucket: bool = False
    chunk_size: int | None = None
    cache: object | None = None  # a TopKCache of this teacher's top-k: computed once per window, then read

    def __post_init__(self):
        if not 0.0 <= self.ce_weight <= 1.0:
            raise ValueError(f"ce_weight must be in [0, 1], got {self.ce_weight}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.cache is not None and (self.top_k != self.cache.k or self.temperature != self.cache.temperature):
            raise ValueError(f"the teacher cache holds top-{self.cache.k} at temperature {self.cache.temperature}, "
                             f"not top_k {self.top_k} at {self.temperature}")

    def __call__(self, model, batch):
        t_vocab, s_vocab = self.teacher.config.vocab_size, model.config.vocab_size
        if t_vocab != s_vocab:
            raise ValueError(f"teacher vocab {t_vocab} differs from student vocab {s_vocab}")
        hidden, targets = target_rows(model, batch)
        if self.cache is not None:
            return self._cached(model, batch, hidden, targets)
        with torch.no_grad():
            t_hidden, _ = target_rows(self.teacher, batch)  # (N, D_teacher)

        def teacher_logits(rows):
            with torch.no_grad():
                return self.teacher.lm_head(t_hidden[rows])  # (n, V)

        def top_k_loss(logits, rows):  # sparse KD: gradient by autograd
            kd = kl_top_k(logits, teacher_logits(rows), self.temperature, self.top_k, self.tail_bucket)
            if self.ce_weight == 0:
                return kd
            ce = F.cross_entropy(logits, targets[rows], reduction="sum")
            return self.ce_weight * ce + (1 - self.ce_weight) * kd

        def full_loss(logits, rows, need_grad):  # full KD: closed-form gradient
            kd, grad = kl_full(logits, teacher_logits(rows), self.temperature, need_grad)
            if self.ce_weight == 0:
                return kd, grad
            ce, ce_grad = cross_entropy(logits, targets[rows], need_grad)  # overwrites logits: kd is done with them
            w = self.ce_weight
            return w * ce + (1 - w) * kd, (grad.mul_(1 - w).add_(ce_grad, alpha=w) if need_grad else None)

        chunk_loss = full_loss if self.top_k is None else with_autograd(top_k_loss)
        return head_loss(model.lm_head, hidden, chunk_loss, self.chunk_size)

    def _cached(self, model, batch, hidden, targets):
        top_log_t, ids = self.cache.lookup(batch)  # (B, T, k) each
        keep = batch["targets"] != IGNORE_INDEX
        top_log_t, ids = top_log_t[keep], ids[keep]  # (N, k)

        def loss(logits, rows):
            kd = kl_sparse(logits, top_log_t[rows], ids[rows], self.temperature, self.tail_bucket)
            if self.ce_weight == 0:
                return kd
            ce = F.cross_entropy(logits, targets[rows], reduction="sum")
            return self.ce_weight * ce + (1 - self.ce_weight) * kd

        return head_loss(model.lm_head, hidden, with_autograd(loss), self.chunk_size)
