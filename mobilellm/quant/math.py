"""Pure quantization math: tensors in, integers and scales out (no modules, no model).

Conventions (torchao's): int4 symmetric weights take values in [-8, 7] with scale = max|w| / 7.5 per group
of `group_size` input columns (group_size = K gives one scale per output channel); int8 asymmetric
activations take [-128, 127] with a zero point per token and a range that always contains 0. Every scale
is rounded to the scheme's `scale_dtype` before use, so a model stored with fp16 scales computes exactly
what the fake-quantized model computed.

The `fake_*` functions return dequantized values with a straight-through estimator: the forward pass sees
the quantized value, the backward pass the identity (inside the clamp range), and a learnable scale gets
LSQ's gradient (round(w/s) - w/s inside the range, the clamp bound outside).
"""

from __future__ import annotations

import torch

INT4_MIN, INT4_MAX = -8, 7
INT8_MIN, INT8_MAX = -128, 127
SCALE_EPS = 1e-9  # an all-zero group still gets a finite scale


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) -> (N, K/group_size, group_size)."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"in_features {K} is not a multiple of the group size {group_size}")
    return w.reshape(N, K // group_size, group_size)


# ---- int4 symmetric weights --------------------------------------------------------------------

def int4_scales(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Min/max (round-to-nearest) scales (N, K/group_size) for w (N, K), rounded to scale_dtype."""
    amax = _groups(w.detach().float(), group_size).abs().amax(-1)
    return (amax / ((INT4_MAX - INT4_MIN) / 2)).clamp_min(SCALE_EPS).to(scale_dtype)


# Where the search may map a group's largest-magnitude value: levels 7.0 .. 9.0 of the int4 grid (beyond 8 it
# is clipped; llama.cpp's make_qx_quants searches nmax +- 0.9 alike).
SEARCH_LEVELS = tuple(7.0 + 0.1 * i for i in range(21))
SEARCH_REFITS = 2  # least-squares refits of the best scale (the alternating step of llama.cpp / HQQ)


def _int4_group_error(g: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared reconstruction error (N, G) of groups g (N, G, gs) stored with scales s (N, G), and the int4 values."""
    q = torch.round(g / s[..., None]).clamp(INT4_MIN, INT4_MAX)
    return (g - q * s[..., None]).square().sum(-1), q


def int4_search_scales(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Scales (N, K/group_size) for w (N, K) minimising each group's error sum (w - s * clamp(round(w / s)))^2,
    measured with s rounded to scale_dtype (the stored format, so the guarantee holds after storage).

    Candidates: s = -peak / t and s = peak / t for t in SEARCH_LEVELS, where peak is the group's signed
    largest-magnitude value (a negative s puts it on the grid's 8-level side; t = 8 is llama.cpp's Q4_0),
    then SEARCH_REFITS least-squares refits s = <w, q> / <q, q> of the best one's int4 values. The min/max
    scale (int4_scales) is the first candidate and only a strictly smaller error replaces it, so no group is
    ever reconstructed worse than with min/max scaling. A negative scale is just a scale: q * s is stored
    and computed exactly as before.
    """
    g = _groups(w.detach().float(), group_size)  # (N, G, gs)
    best = int4_scales(w, group_size, scale_dtype).float()
    best_err, _ = _int4_group_error(g, best)
    peak = g.gather(-1, g.abs().argmax(-1, keepdim=True)).squeeze(-1)  # (N, G), signed

    def consider(candidate: torch.Tensor) -> None:
        nonlocal best, best_err
        s = candidate.to(scale_dtype).float()
        s = torch.where(s == 0, best, s)  # an underflowed (all-zero) group keeps its min/max scale
        err, _ = _int4_group_error(g, s)
        better = err < best_err
        best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)

    for t in SEARCH_LEVELS:
        consider(-peak / t)
        consider(peak / t)
    for _ in range(SEARCH_REFITS):
        _, q = _int4_group_error(g, best)
        qq = q.square().sum(-1)
        consider(torch.where(qq > 0, (g * q).sum(-1) / qq.clamp_min(1), best))
    return best.to(scale_dtype)


def quantize_int4(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 tensor (N, K) of values in [-8, 7]: round(w / scale) per group; scales (N, K/group)."""
    group_size = w.shape[1] // scales.shape[1]
    q = torch.round(_groups(w.float(), group_size) / scales.float()[..., None])
    return q.clamp(INT4_MIN, INT4_MAX).to(torch.int8).reshape(w.shape)


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, K) float weights from int4 values (N, K) and scales (N, K/group)."""
    group_size = q.shape[1] // scales.shape[1]
    w = _groups(q.float(), group_size) * scales.float()[..., None]
    return w.reshape(q.shape).to(dtype)


class _FakeQuantInt4(torch.autograd.Function):
    """STE fake quantization that saves only its inputs (the weight is alive anyway) and recomputes the
    rest in the backward: QAT of a 135M model would otherwise keep ~5 weight-sized temporaries per step."""

    @staticmethod
    def forward(ctx, w, scales):
        ctx.save_for_backward(w, scales)
        return dequantize_int4(quantize_int4(w, scales), scales, w.dtype)

    @staticmethod
    def backward(ctx, grad):
        w, scales = ctx.saved_tensors
        group_size = w.shape[1] // scales.shape[1]
        q = _groups(w.float(), group_size) / scales.float()[..., None]  # (N, K/g, g)
        inside = (q >= INT4_MIN - 0.5) & (q <= INT4_MAX + 0.5)  # where round+clamp passes the gradient
        g = _groups(grad.float(), group_size)
        grad_w = (g * inside).reshape(w.shape).to(w.dtype) if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:  # LSQ: round(q) - q inside the range, the clamp bound outside
            q_int = torch.round(q).clamp(INT4_MIN, INT4_MAX)
            grad_s = (g * torch.where(inside, q_int - q, q_int)).sum(-1).to(scales.dtype)
        return grad_w, grad_s


def fake_quantize_int4(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """dequantize(quantize(w)) with STE; gradients flow to w and (LSQ) to a learnable `scales`."""
    return _FakeQuantInt4.apply(w, scales)


# ---- int4 packing: two values per byte ---------------------------------------------------------

PACK_BLOCK = 32  # byte i of each 32-wide block holds elements i (low nibble) and i + 16 (high nibble)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 values (N, K) in [-8, 7] -> uint8 (N, K/2). Within each block of 32 columns, byte i holds
    column i in its low nibble and column i+16 in its high one (so one 16-byte load unpacks to 32 values
    in order with two AVX2 shifts/masks)."""
    N, K = q.shape
    if K % PACK_BLOCK:
        raise ValueError(f"in_features {K} must be a multiple of {PACK_BLOCK} to pack int4")
    u = (q.to(torch.int16) - INT4_MIN).to(torch.uint8).reshape(N, K // PACK_BLOCK, 2, PACK_BLOCK // 2)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(N, K // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) -> int8 (N, K) in [-8, 7], the inverse of pack_int4."""
    N, half = packed.shape
    blocks = packed.reshape(N, half // (PACK_BLOCK // 2), PACK_BLOCK // 2)
    u = torch.stack((blocks & 0x0F, blocks >> 4), dim=2)  # (N, K/32, 2, 16)
    return (u.to(torch.int8) + INT4_MIN).reshape(N, half * 2)


# ---- int8 asymmetric per-token activations -----------------------------------------------------

def int8_token_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (last dim) scale and zero point (x.shape[:-1] + (1,)) of an int8 asymmetric quantizer
    whose range [min(x, 0), max(x, 0)] always contains 0."""
    xf = x.detach().float()
    lo = xf.amin(-1, keepdim=True).clamp(max=0)
    hi = xf.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (INT8_MAX - INT8_MIN)).clamp_min(SCALE_EPS)
    zero_point = (INT8_MIN - torch.round(lo / scale)).clamp(INT8_MIN, INT8_MAX)
    return scale, zero_point


def quantize_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 values, scale, zero_point) of x quantized per token; x ~ (q - zero_point) * scale."""
    scale, zero_point = int8_token_qparams(x)
    q = (torch.round(x.float() / scale) + zero_point).clamp(INT8_MIN, INT8_MAX)
    return q.to(torch.int8), scale, zero_point


def dequantize_int8_per_token(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return ((q.float() - zero_point) * scale).to(dtype)


class _FakeQuantInt8PerToken(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return dequantize_int8_per_token(*quantize_int8_per_token(x), dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad):  # STE: the range always covers x, so the gradient passes everywhere
        return grad


def fake_quantize_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Per-token int8 asymmetric fake quantization with STE (scale and zero point are not trained)."""
    return _FakeQuantInt8PerToken.apply(x)


# ---- int8 KV cache (per token, per head) -------------------------------------------------------

def quantize_kv_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The KV cache's int8 format, symmetric absmax with one scale per token and head:
    x (..., T, hd) -> int8 values (..., T, hd) and fp32 scales (..., T, 1) with x ~= q * scale."""
    scale = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127.0
    q = torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_kv_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def fake_quantize_kv_int8(kv: torch.Tensor) -> torch.Tensor:
    """Keys or values (B, n_kv, T, hd) through the KV cache's int8 format (`quantize_kv_int8`: one scale per
    batch row, head and token), with STE: what the cpu scheme's int8 cache will hand back at inference
    (mobilellm.infer.cache stores with the same function), seen already in training."""
    q, scale = quantize_kv_int8(kv)
    return (kv + (q.float() * scale - kv.float()).detach()).to(kv.dtype)
