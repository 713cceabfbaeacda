"""Real quantized modules: packed int4 weights (two per byte) + scales as buffers, no float weights.

QuantizedLinear and QuantizedEmbedding replace nn.Linear / nn.Embedding in place (same call signatures);
a tied LM head shares the embedding's packed buffers. KVQuantAttention is the model's Attention with its
keys and values passed through int8 per-token, per-head (fake) quantization, as the cpu scheme's int8 KV
cache (mobilellm.infer.cache, int8=True) stores them; re-quantizing in that cache is then a no-op.
"""

from __future__ import annotations

import torch
from torch import nn

from ..cache_protocol import AttentionCache
from ..model import Attention
from .kernels import default_backend, int4_linear, row_correction
from .layout import from_panels, panel_rows, to_panels
from .math import dequantize_int4, fake_quantize_kv_int8, unpack_int4


class QuantizedLinear(nn.Module):
    """`packed`, `scales`: int4 weights of `out_features` rows, in 8-row panels (layout.py) when the activations
    are int8 (what that kernel reads), else in rows. `shared=True` (a tied LM head): the buffers belong to the
    embedding and are left out of the state dict."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, group_size: int, int8_activations: bool,
                 shared: bool = False, out_features: int | None = None):
        super().__init__()
        self.out_features, self.in_features = out_features or packed.shape[0], packed.shape[1] * 2
        self.group_size, self.int8_activations = group_size, int8_activations
        self.register_buffer("packed_weight", packed, persistent=not shared)
        self.register_buffer("weight_scale", scales, persistent=not shared)
        # The kernel's per-row constant (int8 activations, C++ backend), derived from the weights on first use.
        self.register_buffer("row_correction", None, persistent=False)
        self._correction_key = None

    @classmethod
    def from_rows(cls, packed: torch.Tensor, scales: torch.Tensor, group_size: int, int8_activations: bool,
                  shared: bool = False) -> "QuantizedLinear":
        """From row-layout (N, K/2) packed weights and (N, K/G) scales (math.pack_int4)."""
        n = packed.shape[0]
        if int8_activations:
            packed, scales = to_panels(packed, scales)
        return cls(packed, scales, group_size, int8_activations, shared, out_features=n)

    def int4_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed (N, K/2), scales (N, K/G)) in row layout, whatever the storage order."""
        if self.int8_activations:
            return from_panels(self.packed_weight, self.weight_scale, self.out_features)
        return self.packed_weight, self.weight_scale

    @classmethod
    def concatenate(cls, linears: list["QuantizedLinear"]) -> "QuantizedLinear":
        """One matrix of the given ones' rows (same input, group size and activations): model.fuse_linears."""
        first = linears[0]
        if any((m.in_features, m.group_size, m.int8_activations) != (first.in_features, first.group_size,
                                                                      first.int8_activations) for m in linears):
            raise ValueError("only int4 linears with the same input size, group size and activations concatenate")
        rows = [m.int4_rows() for m in linears]
        return cls.from_rows(torch.cat([p for p, _ in rows]), torch.cat([s for _, s in rows]), first.group_size,
                             first.int8_activations)

    def forward(self, x):  # (..., K) -> (..., N)
        backend = default_backend()
        correction = self._correction() if self.int8_activations and backend == "cpp" else None
        return int4_linear(x, self.packed_weight, self.weight_scale, self.group_size, self.int8_activations,
                           backend, correction, self.out_features)

    def _correction(self) -> torch.Tensor:
        """The kernel's per-row constant, recomputed only when the weights change (a load, an in-place copy).
        Under torch.compile the weights are taken as fixed: the last eager call's value is used."""
        if torch.compiler.is_compiling():
            return self.row_correction
        w, s = self.packed_weight, self.weight_scale
        key = (w.data_ptr(), w._version, s.data_ptr(), s._version)
        if self._correction_key != key:
            self.row_correction = row_correction(w, s, self.group_size)
            self._correction_key = key
        return self.row_correction

    def dequantized_weight(self) -> torch.Tensor:
        packed, scales = self.int4_rows()
        return dequantize_int4(unpack_int4(packed), scales)

    def extra_repr(self) -> str:
        act = "int8 dynamic" if self.int8_activations else "float"
        return f"in={self.in_features}, out={self.out_features}, int4 group={self.group_size}, activations={act}"


class QuantizedEmbedding(nn.Module):
    """`packed`, `scales`: int4 rows of the table, in 8-row panels when `panels` (the cpu scheme, whose tied
    LM head reads the same buffers), else in rows."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32,
                 panels: bool = False, num_embeddings: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings or packed.shape[0], packed.shape[1] * 2
        self.dtype, self.panels = dtype, panels
        self.register_buffer("packed_weight", packed)
        self.register_buffer("weight_scale", scales)

    def forward(self, tokens):  # (B, T) -> (B, T, dim): unpack only the looked-up rows
        flat = tokens.reshape(-1)
        if self.panels:
            packed, scales = panel_rows(self.packed_weight, self.weight_scale, flat)
        else:
            packed, scales = self.packed_weight[flat], self.weight_scale[flat]
        return dequantize_int4(unpack_int4(packed), scales, self.dtype).reshape(*tokens.shape, self.embedding_dim)

    def int4_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed (V, dim/2), scales (V, dim/G)) in row layout."""
        if self.panels:
            return from_panels(self.packed_weight, self.weight_scale, self.num_embeddings)
        return self.packed_weight, self.weight_scale

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int4 group={self.embedding_dim // self.weight_scale.shape[1]}"


class _Int8KV(AttentionCache):
    """Wraps a KV cache (or none): keys/values are int8-quantized per token and head before use/storage."""

    def __init__(self, cache):
        self.cache = cache

    def update(self, layer, k, v, positions):  # k, v: (B, n_kv, T, hd)
        if self.cache is None:
            return fake_quantize_kv_int8(k), fake_quantize_kv_int8(v), positions
        if not self.cache.int8:  # an int8 cache quantizes them itself, with the same math
            k, v = fake_quantize_kv_int8(k), fake_quantize_kv_int8(v)
        return self.cache.update(layer, k, v, positions)

    @property
    def attends_one_token(self) -> bool:  # an int8 cache's decode path already stores what this would
        return self.cache is not None and self.cache.int8 and self.cache.attends_one_token

    def attend_one_token(self, layer, q, k, v):
        return self.cache.attend_one_token(layer, q, k, v)


class KVQuantAttention(Attention):
    """Attention whose keys and values go through int8 per-token, per-head quantization (STE in training)."""

    @classmethod
    def from_attention(cls, attn: Attention) -> "KVQuantAttention":
        new = cls.__new__(cls)
        new.__dict__ = attn.__dict__.copy()
        return new

    def forward(self, x, rope, positions, masks, cache=None):
        return super().forward(x, rope, positions, masks, _Int8KV(cache))
