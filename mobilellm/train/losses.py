"""Training losses read from the student's final hidden states, computed in chunks along the sequence.

At MobileLLM-Pro's vocab (202,048) the logits of one 4k sequence are ~3 GB in fp32 (SPEC.md 2.1), so no
loss here ever materialises (B, T, V): `chunked_linear_loss` projects a chunk of rows through the LM head,
takes the loss and its gradient for that chunk at once, and keeps only d/d(hidden) and d/d(head weight).
The backward pass is then a scale, with no recomputation of the chunks.

A loss object is called as `loss(model, batch) -> summed loss` (fp32 scalar, summed over the target
tokens, i.e. positions where `targets != -100`); the loop divides by the step's token count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
ChunkLoss = Callable[[torch.Tensor, slice], torch.Tensor]  # (logits (n, V) fp32, rows) -> summed loss


class Loss(Protocol):
    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...


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
            if need_h or need_w:
                with torch.enable_grad():
                    logits.requires_grad_()
                    loss = chunk_loss(logits, rows)
                    (g,) = torch.autograd.grad(loss, logits)
                g = g.to(h.dtype)
                if need_h:
                    grad_h[rows] = g @ weight.to(g.dtype)
                if need_w:
                    grad_w += (g.T @ h).float()
            else:
                loss = chunk_loss(logits, rows)
            total += loss.detach()
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
    """sum over row chunks of chunk_loss(hidden[rows] @ weight.T, rows); memory O(chunk * V), not O(N * V)."""
    return _ChunkedLinearLoss.apply(hidden, weight, chunk_loss, chunk_size)


def target_rows(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states (N, D) and targets (N,) of the positions that have a target."""
    hidden = model.hidden_states(batch["tokens"], batch.get("positions"), batch.get("doc_ids"))  # (B, T, D)
    keep = batch["targets"] != IGNORE_INDEX  # (B, T)
    return hidden[keep], batch["targets"][keep]


# ---- per-chunk losses on logits (n, V) ------------------------------------------------------------

def kl_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Summed forward KL(teacher || student) over the full vocabulary, scaled by T^2 (Hinton)."""
    log_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return temperature**2 * (log_t.exp() * (log_t - log_s)).sum()


def kl_top_k(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, k: int,
             tail_bucket: bool) -> torch.Tensor:
    """Sparse KD: the teacher's top-k probabilities, renormalised over the k, or with the rest as one tail bucket.

    Renormalised: KL(q || p_s) with q = p_t[top-k] / sum p_t[top-k], zero elsewhere.
    Tail bucket: a (k+1)-way KL, the (k+1)-th outcome being "any other token" for both teacher and student.
    """
    log_s = F.log_softmax(student_logits / temperature, dim=-1)  # (n, V)
    top_log_t, ids = F.log_softmax(teacher_logits.float() / temperature, dim=-1).topk(k, dim=-1)  # (n, k)
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
class CrossEntropy:
    """Next-token cross-entropy against `targets`."""

    chunk_size: int = 1024

    def __call__(self, model, batch):
        hidden, targets = target_rows(model, batch)
        return chunked_linear_loss(
            hidden, model.lm_head.weight,
            lambda logits, rows: F.cross_entropy(logits, targets[rows], reduction="sum"), self.chunk_size)


@dataclass
class Distillation:
    """ce_weight * CE + (1 - ce_weight) * KL(teacher || student), teacher logits also taken chunk by chunk.

    `top_k=None` matches the teacher's full distribution (the MobileLLM-Pro recipe); an integer gives sparse
    KD (see `kl_top_k`). The teacher must be frozen (see `mobilellm.train.teacher`).
    """

    teacher: nn.Module
    temperature: float = 1.0
    ce_weight: float = 0.0
    top_k: int | None = None
    tail_bucket: bool = False
    chunk_size: int = 1024

    def __post_init__(self):
        if not 0.0 <= self.ce_weight <= 1.0:
            raise ValueError(f"ce_weight must be in [0, 1], got {self.ce_weight}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")

    def __call__(self, model, batch):
        t_vocab, s_vocab = self.teacher.config.vocab_size, model.config.vocab_size
        if t_vocab != s_vocab:
            raise ValueError(f"teacher vocab {t_vocab} differs from student vocab {s_vocab}")
        hidden, targets = target_rows(model, batch)
        with torch.no_grad():
            t_hidden, _ = target_rows(self.teacher, batch)  # (N, D_teacher)
        t_head = self.teacher.lm_head.weight

        def chunk_loss(logits, rows):
            with torch.no_grad():
                t_logits = t_hidden[rows] @ t_head.T  # (n, V)
            if self.top_k is None:
                kd = kl_full(logits, t_logits, self.temperature)
            else:
                kd = kl_top_k(logits, t_logits, self.temperature, self.top_k, self.tail_bucket)
            if self.ce_weight == 0:
                return kd
            ce = F.cross_entropy(logits, targets[rows], reduction="sum")
            return self.ce_weight * ce + (1 - self.ce_weight) * kd

        return chunked_linear_loss(hidden, model.lm_head.weight, chunk_loss, self.chunk_size)
