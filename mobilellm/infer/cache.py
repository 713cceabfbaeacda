"""The KV cache for decoding: a ring buffer per sliding-window layer, a pre-allocated buffer per global layer.

It implements the model's cache protocol (mobilellm.cache_protocol.AttentionCache): `update(layer, k, v,
positions) -> (k_all, v_all, k_positions)`, RoPE tables, keys as [past, chunk], and int8 decode from storage. The cache assumes the
batch rows advance together from position 0 (one conversation per row, same length), so the position of
every slot follows from `next_position` alone and no position bookkeeping is stored.

Sliding layers keep the last `window` positions in a ring (slot = position % window). A chunk of T new
tokens is attended as [ring slots before the chunk] + [the chunk's own keys], so queries early in the chunk
still see their in-window keys that the chunk is about to overwrite; the mask drops what falls out of each
query's window. Global (and chunked-attention) layers keep every position up to `max_len`.

With `int8=True`, K and V are stored as int8 with one fp32 scale per token and head (symmetric absmax,
`mobilellm.quant.math.quantize_kv_int8`, the math QAT fakes); they are dequantized to the compute dtype when attended.
"""

from __future__ import annotations

import torch

from ..cache_protocol import AttentionCache
from ..config import ModelConfig
from ..model import rope_frequencies, rotation_tables
from ..quant.kernels import int8_kv_attention
from ..quant.math import dequantize_kv_int8, quantize_kv_int8

MiB = 2**20


class CacheFullError(ValueError):
    """More tokens than the cache was allocated for."""


def ring_positions(next_position: int, window: int, device=None) -> torch.Tensor:
    """Position held by each ring slot (window,), -1 where the slot was never written."""
    slots = torch.arange(window, device=device)
    # the newest position p < next_position with p % window == slot
    newest = next_position - 1 - (next_position - 1 - slots) % window
    return torch.where(newest >= 0, newest, -1)


class RotationTable:
    """RoPE cos and sin of every position a cache can hold, computed once. A decode step then gathers one row;
    computed in the step instead, torch.compile inlines pow and cos into every rotation, once per head
    (3.7 ms of a 54 ms pro-1b int4 step). 8 bytes per position and dim pair: 32 MiB at 128K positions, head_dim 64."""

    def __init__(self, config: ModelConfig, max_len: int, device=None):
        positions = torch.arange(max_len, device=device)
        angles = positions.float()[:, None] * rope_frequencies(config.head_dim, config.rope_theta, device)
        self.cos, self.sin, self.layout = angles.cos(), angles.sin(), config.rope_layout  # (max_len, hd/2)

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> the (B, T, 1, head_dim) tables of model.apply_rope, as model.rope_angles gives."""
        return rotation_tables(self.cos[positions][:, :, None], self.sin[positions][:, :, None], self.layout)


class KVStore:
    """K and V for one layer, in `slots` positions: (B, n_kv, slots, hd), int8 plus scales or float."""

    def __init__(self, batch: int, n_kv: int, slots: int, head_dim: int, dtype: torch.dtype, int8: bool, device):
        shape = (batch, n_kv, slots, head_dim)
        self.dtype, self.int8 = dtype, int8
        self.k = torch.zeros(shape, dtype=torch.int8 if int8 else dtype, device=device)
        self.v = torch.zeros_like(self.k)
        if int8:
            self.k_scale = torch.zeros(shape[:-1] + (1,), dtype=torch.float32, device=device)
            self.v_scale = torch.zeros_like(self.k_scale)

    def write(self, index, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (B, n_kv, T, hd) at slot `index` (a slice or an index tensor of length T)."""
        if self.int8:
            self.k[:, :, index], self.k_scale[:, :, index] = quantize_kv_int8(k)
            self.v[:, :, index], self.v_scale[:, :, index] = quantize_kv_int8(v)
        else:
            self.k[:, :, index] = k
            self.v[:, :, index] = v

    def read(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots [0, end) in the compute dtype: (B, n_kv, end, hd) each."""
        if self.int8:
            return (dequantize_kv_int8(self.k[:, :, :end], self.k_scale[:, :, :end], self.dtype),
                    dequantize_kv_int8(self.v[:, :, :end], self.v_scale[:, :, :end], self.dtype))
        return self.k[:, :, :end], self.v[:, :, :end]

    def stored(self, x: torch.Tensor) -> torch.Tensor:
        """x as a later read will return it (through int8 and back when the store is int8)."""
        return dequantize_kv_int8(*quantize_kv_int8(x), self.dtype) if self.int8 else x

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v] + ([self.k_scale, self.v_scale] if self.int8 else [])


class KVCache(AttentionCache):
    """Per-layer KV storage that knows each layer's attention type (ring for sliding, full for global)."""

    # update() returns keys as [past, the chunk's own T keys]: the past is every earlier position (global
    # layers) or the ring (sliding), so attention can skip masked work (mobilellm.attention.CachedChunk).
    keys_past_then_chunk = True

    def __init__(self, config: ModelConfig, max_len: int, batch: int = 1, dtype: torch.dtype = torch.float32,
                 int8: bool = False, device="cpu"):
        if max_len <= 0:
            raise ValueError(f"max_len must be positive, got {max_len}")
        if max_len > config.max_seq_len:
            raise ValueError(f"max_len {max_len} is past the model's context of {config.max_seq_len} tokens")
        self.config, self.max_len, self.int8 = config, max_len, int8
        # Decode steps of sliding and global layers call attend_one_token instead of update (int8 on the CPU).
        self.attends_one_token = int8 and torch.device(device).type == "cpu"
        self.window = config.sliding_window
        self.next_position = 0
        self.stores = [
            KVStore(batch, config.n_kv_heads, self.slots(layer_type), config.head_dim, dtype, int8, device)
            for layer_type in config.layer_types]
        self.rotation_table = RotationTable(config, max_len, device)

    def slots(self, layer_type: str) -> int:
        return min(self.window, self.max_len) if layer_type == "sliding_attention" else self.max_len

    def is_ring(self, layer: int) -> bool:
        return self.config.layer_types[layer] == "sliding_attention" and self.window < self.max_len

    def check_room(self, T: int) -> None:
        if self.next_position + T > self.max_len:
            raise CacheFullError(f"the KV cache holds {self.max_len} tokens; {self.next_position} are cached and {T} "
                                 f"more do not fit (raise max_len up to the model's context of {self.config.max_seq_len})")

    # ---- the model's protocol -------------------------------------------------------------------
    def rotations(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """model.rope_angles(positions) for the next T positions (B, T), from the precomputed table."""
        self.check_room(positions.shape[1])
        return self.rotation_table(positions)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Store this step's k, v (B, n_kv, T, hd); return every key the step may attend and their positions."""
        B, _, T, _ = k.shape
        start = self.next_position
        self.check_room(T)
        store = self.stores[layer]
        if not self.is_ring(layer):
            store.write(slice(start, start + T), k, v)
            k_all, v_all = store.read(start + T)
            k_pos = torch.arange(start + T, device=k.device).expand(B, -1)
            return k_all, v_all, k_pos
        if T == 1:  # one token overwrites only the slot just out of its window: write, then read the ring
            store.write(self.ring_slot(start, k.device), k, v)
            k_all, v_all = store.read(self.window)
            return k_all, v_all, ring_positions(start + 1, self.window, k.device).expand(B, -1)
        # A chunk: old slots first (read before the chunk overwrites them), then the chunk itself.
        old_k, old_v = store.read(self.window)
        k, v = store.stored(k), store.stored(v)  # the chunk attends its keys as later steps will read them
        k_all, v_all = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)  # (B, n_kv, window + T, hd)
        k_pos = torch.cat([ring_positions(start, self.window, k.device), positions[0]]).expand(B, -1)
        keep = min(T, self.window)  # only the last `window` tokens of the chunk survive in the ring
        slots = torch.arange(start + T - keep, start + T, device=k.device) % self.window
        store.write(slots, k[:, :, T - keep:], v[:, :, T - keep:])
        return k_all, v_all, k_pos

    def ring_slot(self, position: int, device) -> torch.Tensor:
        """The ring slot of `position` as an index tensor. A slice there would make torch.compile guard on
        whether the slot is 0 (a view's offset) and compile the decode step again when the ring wraps."""
        return torch.arange(position, position + 1, device=device) % self.window

    def attend_one_token(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Decode (int8 caches): store the new token's k, v (B, n_kv, 1, hd) and return q's (B, H, 1, hd)
        attention over every key the layer keeps, read from the int8 store without a float copy. Sliding
        layers: the ring holds exactly the window, filled from slot 0; global layers: every position so far."""
        start = self.next_position
        self.check_room(1)
        store, ring = self.stores[layer], self.is_ring(layer)
        store.write(self.ring_slot(start, k.device) if ring else slice(start, start + 1), k, v)
        n = torch.sym_min(start + 1, self.window) if ring else start + 1  # sym_min: no recompile at the wrap
        return int8_kv_attention(q, store.k, store.k_scale, store.v, store.v_scale, n)

    # ---- bookkeeping ----------------------------------------------------------------------------
    def reset(self) -> None:
        self.next_position = 0

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds: the stores and the rotation tables."""
        return [t for store in self.stores for t in store.tensors()] + [self.rotation_table.cos, self.rotation_table.sin]

    def nbytes(self) -> int:
        """Bytes actually allocated by the cache's K and V (and their scales)."""
        return sum(t.untyped_storage().nbytes() for s in self.stores for t in s.tensors())


def kv_cache_bytes(config: ModelConfig, tokens: int, bytes_per_value: float = 1, scale_bytes: int = 4,
                   all_global: bool = False) -> int:
    """KV-cache bytes for `tokens` cached positions: K and V of every layer, sliding layers capped at the window.

    bytes_per_value is 1 for int8, 2 for bf16, 4 for fp32; scale_bytes is the per-token-per-head scale of
    int8 storage (0 for float storage, or to count the int8 payload alone as the model card does).
    """
    per_token = 2 * config.n_kv_heads * (config.head_dim * bytes_per_value + scale_bytes)  # K and V
    total = 0
    for layer_type in config.layer_types:
        held = tokens if all_global or layer_type != "sliding_attention" else min(tokens, config.sliding_window)
        total += held * per_token
    return int(total)


def cache_report(config: ModelConfig, token_counts=(2000, 4000, 8000)) -> str:
    """The model card's KV-cache figures: int8 K and V payload, MiB, sliding layers capped at the window."""
    lines = [f"KV cache of {config.name} (int8 K and V; MiB = 2^20 bytes; 'with scales' adds one fp32 scale "
             f"per token and KV head)",
             f"{'tokens':>8} {'local/global':>13} {'with scales':>12} {'all-global':>11}"]
    for tokens in token_counts:
        lg = kv_cache_bytes(config, tokens, scale_bytes=0) / MiB
        lg_scaled = kv_cache_bytes(config, tokens) / MiB
        glob = kv_cache_bytes(config, tokens, scale_bytes=0, all_global=True) / MiB
        lines.append(f"{tokens:>8} {lg:>9.1f} MiB {lg_scaled:>8.1f} MiB {glob:>7.1f} MiB")
    return "\n".join(lines)
