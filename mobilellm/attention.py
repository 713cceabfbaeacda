"""Attention masks (causal, sliding window, chunked, document) and the attention backends.

Masks are built from token *positions*, not indices, so one rule serves training on packed windows
(positions restart per document), chunked prefill and decoding against a ring-buffer cache, where a
key slot's position says where it came from and -1 marks an empty slot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "flex", "eager")


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


def flex_block_mask(layer_type, q_pos, k_pos, q_doc=None, k_doc=None, window=None, chunk=None):
    """The same rule as `attention_mask` as a FlexAttention BlockMask: blocks outside the window are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, qi, ki):
        q, k = q_pos[b, qi], k_pos[b, ki]
        allowed = (k <= q) & (k >= 0)
        if layer_type == "sliding_attention":
            allowed = allowed & ((q - k) < window)
        elif layer_type == "chunked_attention":
            allowed = allowed & ((q // chunk) == (k // chunk))
        if q_doc is not None:
            allowed = allowed & (q_doc[b, qi] == k_doc[b, ki])
        return allowed

    B, Tq = q_pos.shape
    return create_block_mask(mask_mod, B, None, Tq, k_pos.shape[1], device=q_pos.device)


_compiled_flex = None


def flex_attend(q, k, v, block_mask):
    global _compiled_flex
    if _compiled_flex is None:  # compiled once, on first use: flex_attention is only fast compiled
        from torch.nn.attention.flex_attention import flex_attention
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])


def attend(
    q: torch.Tensor,  # (B, H, Tq, hd)
    k: torch.Tensor,  # (B, Hkv, Tk, hd)
    v: torch.Tensor,  # (B, Hkv, Tk, hd)
    mask,  # (B, 1, Tq, Tk) bool; a BlockMask for "flex"; None for plain causal over the same tokens
    backend: str = "sdpa",
) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads; returns (B, H, Tq, hd)."""
    if backend == "flex":
        return flex_attend(q, k, v, mask)
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
