"""Packed-int4 matmul backends for the CPU: our AVX2 C++ extension and a pure-PyTorch reference.

`int4_linear(x, packed, scales, group_size, int8_activations)` computes x @ W^T with W = unpack(packed) *
scales, and (int8_activations) x replaced by its per-token int8 asymmetric quantization first: the same
numbers as the fake-quantized model. With int8 activations (the cpu scheme) the weights come in 8-row
panels (layout.py), the order that kernel reads; weight-only, in rows. The backend is chosen by measurement (benchmarks/int4_decode.py,
benchmarks/results/int4_decode.json): on the AVX2 (no AVX512/VNNI) machine it was measured on, a 6144x1280
decode GEMV (1 thread, weights from memory) took 15.7 ms with PyTorch's `_weight_int4pack_mm_for_cpu`, 14.8 ms
with `_dyn_quant_matmul_4bit` (no KleidiAI on x86: a reference loop), 1.75 ms in fp32 and 0.28 ms with this
C++ extension (80% of the read roofline), so "cpp" is the default where it builds; "reference" (dequantize + F.linear) is the fallback.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .layout import from_panels
from .math import dequantize_int4, fake_quantize_int8_per_token, unpack_int4

log = logging.getLogger(__name__)
BACKENDS = ("cpp", "reference")
_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [_CSRC / "int4_linear.cpp", _CSRC / "int8_kv_attention.cpp"]


def cpu_supports_avx2() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@contextlib.contextmanager
def build_lock(root: Path, name: str):
    """Held around torch's build: an OS lock, which dies with its process. torch's own lock is a file that a build
    killed midway leaves behind, and every later process then waits for it forever; under this lock no build is
    running, so such a file is stale and removed."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            for stale in [*root.glob(f"{name}/lock"), *root.glob(f"*/{name}/lock")]:
                print(f"removing {stale}, left by a kernel build that was killed", file=sys.stderr, flush=True)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@functools.cache
def load_extension():
    """Compile (first use, cached by torch under ~/.cache/torch_extensions) and import the C++ kernels;
    None when this CPU lacks AVX2 or the build fails (the reference path is used then)."""
    if not cpu_supports_avx2():
        return None
    from torch.utils.cpp_extension import get_default_build_root, load
    # Named by content: two checkouts with different kernels never overwrite each other's build.
    # The torch version too: a build against another torch (another venv) must not replace this one's.
    digest = hashlib.sha1(b"".join(f.read_bytes() for f in _SOURCES + sorted(_CSRC.glob("*.h")))
                          + torch.__version__.encode()).hexdigest()[:12]
    name = f"mobilellm_cpu_kernels_{digest}"
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())  # where `load` builds
    if not any(root.glob(f"{name}/{name}.so")) and not any(root.glob(f"*/{name}/{name}.so")):
        print(f"building the int4 CPU kernels (first use only, about a minute with gcc; cached in {root})",
              file=sys.stderr, flush=True)
    try:
        with build_lock(root, name):
            ext = load(name=name, sources=[str(source) for source in _SOURCES],
                       extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
                       extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # a missing compiler must not break inference: fall back, say why
        log.warning("int4 C++ kernels unavailable (%s); using the PyTorch reference path", err)
        return None
    # The build registers torch.ops.mobilellm.*; their output shapes, for torch.compile:
    torch.library.register_fake("mobilellm::int4_linear_a8")(
        lambda x, packed, scales, correction, group_size, out_features: x.new_empty(x.shape[0], out_features))
    torch.library.register_fake("mobilellm::int4_linear_f32")(
        lambda x, packed, scales, group_size: x.new_empty(x.shape[0], packed.shape[0]))
    torch.library.register_fake("mobilellm::int8_kv_attention")(
        lambda q, k, k_scale, v, v_scale, n, scale: q.new_empty(q.shape))
    torch.library.register_fake("mobilellm::int8_kv_attention_rows")(
        lambda q, k, k_scale, v, v_scale, rows, n, scale: q.new_empty(q.shape))
    return ext


@torch.compiler.assume_constant_result  # a compiled model bakes its backend in
def default_backend() -> str:
    backend = os.environ.get("MOBILELLM_INT4_BACKEND")
    if backend:
        if backend not in BACKENDS:
            raise ValueError(f"MOBILELLM_INT4_BACKEND must be one of {BACKENDS}, got {backend!r}")
        return backend
    return "cpp" if load_extension() is not None else "reference"


def int4_linear_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int,
                          int8_activations: bool, out_features: int | None = None) -> torch.Tensor:
    """The dequantized math: (M, K) x packed weights -> (M, N). Materialises W in float (slow, exact)."""
    if int8_activations:
        packed, scales = from_panels(packed, scales, out_features or packed.shape[0])
        x = fake_quantize_int8_per_token(x.float())
    return F.linear(x.float(), dequantize_int4(unpack_int4(packed), scales))


def row_correction(packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N rounded up to 8,) float: per row, the sum over groups of scale x (sum of the group's int4 values),
    which the cpp int8-activation kernel needs for the activation zero point. Panel-layout weights. Depends
    only on the weights: compute it once per matrix."""
    return load_extension().int4_row_correction(packed, scales, group_size)


def require_kernels() -> None:
    """The "cpp" backend asked for outside a compiled graph (which calls the ops it traced): the build must exist."""
    if not torch.compiler.is_compiling() and load_extension() is None:
        raise RuntimeError("the C++ kernels are not available on this machine (no AVX2 or no compiler)")


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int,
                int8_activations: bool, backend: str | None = None,
                correction: torch.Tensor | None = None, out_features: int | None = None) -> torch.Tensor:
    """x (..., K) -> (..., N) in x's dtype. int8_activations: packed and scales are panels (layout.to_panels)
    whose first `out_features` rows (default: all) are the matrix. `correction`: row_correction(packed,
    scales, group_size), cached by the caller (computed here when missing). Lean on purpose: a decode step
    makes 200+ of these calls."""
    backend = backend or default_backend()
    K = x.shape[-1]
    x2 = x.reshape(-1, K)  # (M, K)
    if backend == "cpp":
        require_kernels()
        if int8_activations:
            if correction is None:
                correction = row_correction(packed, scales, group_size)
            y = torch.ops.mobilellm.int4_linear_a8(x2.float().contiguous(), packed, scales, correction, group_size,
                                                   out_features or packed.shape[0])
        else:
            y = torch.ops.mobilellm.int4_linear_f32(x2.float().contiguous(), packed, scales, group_size)
    elif backend in BACKENDS:
        y = int4_linear_reference(x2, packed, scales, group_size, int8_activations, out_features)
    else:
        raise ValueError(f"unknown int4 backend {backend!r}; expected one of {BACKENDS}")
    return y.view(*x.shape[:-1], -1).to(x.dtype)


def int8_kv_attention(q: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor, v: torch.Tensor,
                      v_scale: torch.Tensor, n: int, backend: str | None = None) -> torch.Tensor:
    """One query token per row, q (B, Hq, 1, hd), attending slots [0, n) of an int8 KV store: values k, v
    (B, Hkv, S, hd) int8, scales (B, Hkv, S, 1). Softmax scale 1/sqrt(hd), GQA when Hq > Hkv. The C++ kernel
    reads the int8 rows directly; the reference dequantizes slots [0, n) and calls SDPA."""
    B, Hq, T, hd = q.shape
    if T != 1:
        raise ValueError(f"int8_kv_attention takes one query token per row, got {T}")
    if (backend or default_backend()) == "cpp" and hd % 8 == 0:
        require_kernels()
        out = torch.ops.mobilellm.int8_kv_attention(q.reshape(B, Hq, hd).float().contiguous(), k, k_scale, v,
                                                    v_scale, n, hd ** -0.5)
        return out.view(B, Hq, 1, hd).to(q.dtype)
    keys, values = k[:, :, :n].float() * k_scale[:, :, :n], v[:, :, :n].float() * v_scale[:, :, :n]
    return F.scaled_dot_product_attention(q.float(), keys, values, enable_gqa=Hq != k.shape[1]).to(q.dtype)


def int8_kv_attention_rows(q: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor, v: torch.Tensor,
                           v_scale: torch.Tensor, rows: torch.Tensor, n: torch.Tensor,
                           backend: str | None = None) -> torch.Tensor:
    """int8_kv_attention for rows at different lengths, one call for a batch: q (B, Hq, 1, hd) row b attends
    slots [0, n[b]) of store row rows[b] of k, v (N, Hkv, S, hd) int8 with scales (N, Hkv, S, 1); rows, n (B,)
    int64. Each row's numbers are those of int8_kv_attention on that store row alone (the same C++ loop); the
    shapes do not depend on the lengths, so a compiled decode step takes it for every batch."""
    B, Hq, T, hd = q.shape
    if T != 1:
        raise ValueError(f"int8_kv_attention_rows takes one query token per row, got {T}")
    if (backend or default_backend()) == "cpp" and hd % 8 == 0:
        require_kernels()
        out = torch.ops.mobilellm.int8_kv_attention_rows(q.reshape(B, Hq, hd).float().contiguous(), k, k_scale, v,
                                                         v_scale, rows, n, hd ** -0.5)
        return out.view(B, Hq, 1, hd).to(q.dtype)
    return torch.cat([int8_kv_attention(q[b:b + 1], k[r:r + 1], k_scale[r:r + 1], v[r:r + 1], v_scale[r:r + 1],
                                        m, "reference") for b, (r, m) in enumerate(zip(rows.tolist(), n.tolist()))])
