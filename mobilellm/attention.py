"""Attention masks (causal, sliding window, chunked, document) and the attention backends.

Masks are built from token *positions*, not indices, so one rule serves training on packed windows
(positions restart per document), chunked prefill and decoding against a ring-buffer cache, where a
key slot's position says where it came from and -1 marks an empty slot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "eager")


def attention_mask(
    layer_type: str,
    q_pos: torch.Tensor,  # (B, Tq) position of each query
    k_pos: torch.Tensor,  # (B, Tk) position of each key, -1 for an empty cache slot
    q_doc: torch.Tensor | None = None,  # (B, Tq) document id of each query
    k_doc: torch.Tensor | None = None,  # (B, Tk)
    window: int | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Boolean mask (B, 1, Tq, Tk), True where the query may attend to the key."""
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    allowed = (k <= q) & (k >= 0)
    if layer_type == "sliding_attention":
        allowed &= (q - k) < window  # the window counts the query itself, as HF does
    elif layer_type == "chunked_attention":
        allowed &= torch.div(q, chunk, rounding_mode="floor") == torch.div(k, chunk, rounding_mode="floor")
    if q_doc is not None:
        allowed &= q_doc[:, :, None] == k_doc[:, None, :]
    return allowed[:, None]


def attend(
    q: torch.Tensor,  # (B, H, Tq, hd)
    k: torch.Tensor,  # (B, Hkv, Tk, hd)
    v: torch.Tensor,  # (B, Hkv, Tk, hd)
    mask: torch.Tensor | None,  # (B, 1, Tq, Tk) bool, or None for plain causal over the same tokens
    backend: str = "sdpa",
) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads; returns (B, H, Tq, hd)."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              enable_gqa=k.shape[1] != q.shape[1])
    if backend == "eager":
        return eager_attention(q, k, v, mask)
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")


def eager_attention(q, k, v, mask):
    """The reference: explicit softmax in fp32 over the masked scores."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5  # (B, H, Tq, Tk)
    if mask is None:
        tq, tk = scores.shape[-2:]
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)
