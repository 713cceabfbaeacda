"""Attention masks (causal, sliding window, chunked, document) and the attention backends.

Masks are built from token *positions*, not indices, so one rule serves training on packed windows
(positions restart per document), chunked prefill and decoding against a ring-buffer cache, where a
key slot's position says where it came from and -1 marks an empty slot.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    if isinstance(mask, CachedChunk):
        return attend_cached_chunk(q, k, v, mask)
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


# ---- a chunk of queries against a KV cache (prefill and decode) ------------------------------------

@dataclass(frozen=True)
class CachedChunk:
    """What the cache handed a chunk of T queries: keys whose last T are the chunk's own, in position order,
    after the past (every earlier position for a global layer; the ring of `window` slots, oldest position
    anywhere, for a sliding layer). Knowing that layout, attention skips the masked work a boolean mask
    over all keys would still do."""
    layer_type: str  # "full_attention" or "sliding_attention"
    q_pos: torch.Tensor  # (B, T)
    k_pos: torch.Tensor  # (B, Tk), -1 for an empty slot
    window: int | None
    start: int  # tokens cached before this chunk


def attend_cached_chunk(q, k, v, chunk: CachedChunk) -> torch.Tensor:
    T = q.shape[2]
    n_past = k.shape[2] - T
    if chunk.layer_type == "full_attention":
        if T == 1:  # one query at the newest position: every cached key is visible
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=k.shape[1] != q.shape[1])
        return _past_plus_causal(q, k, v, n_past)
    if T > 1 and n_past == chunk.window:
        return _banded(q, k, v, chunk)
    if T == 1 and n_past == chunk.window - 1 and chunk.start + 1 >= chunk.window:
        # decode against a full ring: its slots hold exactly the window before this token, all visible
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=k.shape[1] != q.shape[1])
    mask = attention_mask(chunk.layer_type, chunk.q_pos, chunk.k_pos, window=chunk.window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


def _flash_with_lse(q, k, v, causal: bool):
    """Attention output (B, H, T, hd) and the log-sum-exp of each query's scores (B, H, T)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=causal)[:2]
    return out, lse


def _past_plus_causal(q, k, v, n_past: int) -> torch.Tensor:
    """A global layer's chunk: all past keys unmasked, its own keys causally, merged by log-sum-exp (as
    flash-decoding merges splits). The past part folds each KV head's query group into one sequence, so
    grouped heads need no key copies; the causal part is T x T."""
    B, H, T, hd = q.shape
    n_kv = k.shape[1]
    groups = H // n_kv
    own_k, own_v = k[:, :, n_past:], v[:, :, n_past:]
    if groups > 1:
        own_k, own_v = own_k.repeat_interleave(groups, dim=1), own_v.repeat_interleave(groups, dim=1)
    out, lse = _flash_with_lse(q, own_k, own_v, causal=True)
    if n_past == 0:
        return out
    folded = q.reshape(B, n_kv, groups * T, hd)  # heads of one KV group are adjacent
    past_out, past_lse = _flash_with_lse(folded, k[:, :, :n_past], v[:, :, :n_past], causal=False)
    past_out, past_lse = past_out.reshape(B, H, T, hd), past_lse.reshape(B, H, T)
    top = torch.maximum(lse, past_lse)
    w_own, w_past = (lse - top).exp()[..., None], (past_lse - top).exp()[..., None]
    return ((out * w_own + past_out * w_past) / (w_own + w_past)).to(q.dtype)


def _banded(q, k, v, chunk: CachedChunk, block: int | None = None) -> torch.Tensor:
    """A sliding layer's chunk, keys = [ring of W slots, the chunk's T keys]: queries in blocks of `block`,
    block j against the W + block keys from W - 1 before its first query to its last, so the work is
    T x (W + block) instead of T x (W + T). Smaller blocks waste less (a quarter of the window: 1.25 W
    per query) while each stays big enough to run at full speed."""
    B, H, T, hd = q.shape
    W = chunk.window
    bq = block or (W // 4 if W % 4 == 0 and W >= 64 else W)
    span = W + bq
    nb = -(-T // bq)
    pad = nb * bq - T
    q_pos, k_pos = chunk.q_pos, chunk.k_pos
    shift = chunk.start % W
    if shift and bq < W:  # ring slots in position order, so that a band of keys is a run of positions
        order = (torch.arange(W, device=k.device) + shift) % W
        order = torch.cat([order, torch.arange(W, k.shape[2], device=k.device)])
        k, v, k_pos = k[:, :, order], v[:, :, order], k_pos[:, order]
    if pad:  # padded queries see nothing and are dropped; padded keys are empty slots
        q = F.pad(q, (0, 0, 0, pad))
        k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
        q_pos, k_pos = F.pad(q_pos, (0, pad), value=-1), F.pad(k_pos, (0, pad), value=-1)
    qb = q.unflatten(2, (nb, bq)).transpose(1, 2).flatten(0, 1)  # (B * nb, H, bq, hd)
    kb = k.unfold(2, span, bq).permute(0, 2, 1, 4, 3).flatten(0, 1)  # (B * nb, n_kv, W + bq, hd)
    vb = v.unfold(2, span, bq).permute(0, 2, 1, 4, 3).flatten(0, 1)
    qp = q_pos.unflatten(1, (nb, bq)).flatten(0, 1)  # (B * nb, bq)
    kp = k_pos.unfold(1, span, bq).flatten(0, 1)  # (B * nb, W + bq)
    mask = attention_mask("sliding_attention", qp, kp, window=W) & (qp >= 0)[:, None, :, None]
    mask |= ~mask.any(-1, keepdim=True)  # a padded query row: let it see anything rather than nothing (no NaN)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=kb.shape[1] != H)
    return out.unflatten(0, (B, nb)).transpose(1, 2).flatten(2, 3)[:, :, :T]
