"""A KV cache of independent slots, one sequence each at its own position: what continuous batching decodes from.

`infer.cache.KVCache` advances all its rows together from position 0. A server's rows do not: requests join and
leave between steps, each with its own prompt length. `SlotCache` holds `n_slots` sequences; a forward runs on
any subset of them through `SlotCache.rows(slots)`, a view implementing the model's cache protocol for those
rows, where each row's chunk starts at that slot's own length. A decode step feeds (B, 1) tokens, one per active
slot; a prefill chunk feeds one slot's (1, T) tokens. Either way every row's keys are masked by position
(`attention.attention_mask`): a slot's stale keys past its length (an earlier occupant's) are marked -1.

Global layers store position p at slot p; sliding layers keep a ring of `window` slots per row (slot p % window),
as KVCache does. A slot may be rolled back to a shorter length (a new prompt sharing a prefix with the cached
one reuses it): always safe for global layers, and for rings while they have not wrapped (`can_truncate`).
"""

from __future__ import annotations

import torch

from ..cache_protocol import AttentionCache
from ..config import ModelConfig
from ..quant.kernels import int8_kv_attention_rows
from ..quant.math import dequantize_kv_int8, quantize_kv_int8
from .cache import CacheFullError, KVStore, RotationTable


def ring_positions_of(lengths: torch.Tensor, window: int) -> torch.Tensor:
    """Position held by each ring slot, per row: lengths (B,) -> (B, window), -1 where never written
    (cache.ring_positions for a batch of rows at different lengths)."""
    slots = torch.arange(window, device=lengths.device)
    newest = lengths[:, None] - 1 - (lengths[:, None] - 1 - slots) % window
    return torch.where(newest >= 0, newest, -1)


class SlotCache:
    """`n_slots` sequences of up to `max_len` tokens each; `lengths[s]` tokens of slot s are cached."""

    def __init__(self, config: ModelConfig, n_slots: int, max_len: int, dtype: torch.dtype = torch.float32,
                 int8: bool = False, device="cpu"):
        if n_slots < 1 or max_len < 1:
            raise ValueError(f"a slot cache needs at least one slot of one token, got {n_slots} x {max_len}")
        if max_len > config.max_seq_len:
            raise ValueError(f"max_len {max_len} is past the model's context of {config.max_seq_len} tokens")
        self.config, self.n_slots, self.max_len, self.int8 = config, n_slots, max_len, int8
        self.window = config.sliding_window
        self.ring = [t == "sliding_attention" and self.window < max_len for t in config.layer_types]
        self.stores = [KVStore(n_slots, config.n_kv_heads, min(self.window, max_len) if ring else max_len,
                               config.head_dim, dtype, int8, device) for ring in self.ring]
        self.lengths = torch.zeros(n_slots, dtype=torch.long, device=device)
        self.rotation_table = RotationTable(config, max_len, device)

    def rows(self, slots: list[int]) -> "SlotRows":
        return SlotRows(self, torch.tensor(slots, dtype=torch.long, device=self.lengths.device))

    def length(self, slot: int) -> int:
        return int(self.lengths[slot])

    def can_truncate(self, slot: int, length: int) -> bool:
        """Whether slot's cache cut back to `length` tokens is still exact (rings that wrapped lost older keys)."""
        n = self.length(slot)
        return 0 <= length <= n and (length in (0, n) or not any(self.ring) or n <= self.window)

    def truncate(self, slot: int, length: int) -> None:
        if not self.can_truncate(slot, length):
            raise ValueError(f"slot {slot} holds {self.length(slot)} tokens; its sliding-window rings wrapped, so "
                             f"it cannot be cut back to {length}")
        self.lengths[slot] = length

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for s in self.stores for t in s.tensors())


class SlotRows(AttentionCache):
    """The model's cache protocol over some slots of a SlotCache: row i of a forward is slot `slots[i]`.
    Give the forward its positions: (B, T), row i from that slot's length on (`positions(T)`).

    Each row gets the numbers the single-sequence engine gives it, bit for bit: one row (a prefill chunk) takes
    KVCache's attention paths (keys as [past, chunk], attention.CachedChunk), and an int8 decode step attends each
    row from its own slot at its own length with the same C++ loop (int8_kv_attention_rows, one call for the
    batch; int8_kv_attention runs that loop for one sequence). Only float
    caches decoding several rows at once fall back to masked SDPA over the longest row."""

    def __init__(self, cache: SlotCache, slots: torch.Tensor):
        self.cache, self.slots = cache, slots
        self.int8 = cache.int8
        self.start = cache.lengths[slots]  # (B,) tokens each row has cached before this forward
        self.starts = self.start.tolist()
        one_row = len(self.starts) == 1
        self.next_position = self.starts[0] if one_row else 0
        self.attends_one_token = cache.int8 and self.start.device.type == "cpu"
        plain = all(t in ("full_attention", "sliding_attention") for t in cache.config.layer_types)
        self.keys_past_then_chunk = one_row or (self.attends_one_token and plain)

    def positions(self, T: int, device=None) -> torch.Tensor:
        """(B, T): each row's next T positions (what the model numbers the rows with when given none). Checked to
        fit in eager mode only: a compiled step reading the rows' lengths as Python ints would recompile per batch
        size (the engine never feeds a full slot)."""
        if not torch.compiler.is_compiling() and max(self.starts) + T > self.cache.max_len:
            raise CacheFullError(f"a slot holds {self.cache.max_len} tokens; {T} more after {max(self.starts)} "
                                 f"do not fit")
        return self.start[:, None] + torch.arange(T, device=self.start.device)

    def rotations(self, positions: torch.Tensor):
        if not torch.compiler.is_compiling():  # as in positions()
            end = int(positions.max()) + 1
            if end > self.cache.max_len:
                raise CacheFullError(f"a slot holds {self.cache.max_len} tokens; position {end - 1} does not fit")
        return self.cache.rotation_table(positions)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the slot cache (all slots): the stores, the lengths and the rotation tables."""
        table = self.cache.rotation_table
        return [t for store in self.cache.stores for t in store.tensors()] + [self.cache.lengths, table.cos, table.sin]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """k, v (B, n_kv, T, hd) of the rows at `positions` (B, T) -> every key the rows may attend (B, n_kv, S, hd)
        and their positions (B, S), -1 for a slot that is empty or past the row's length."""
        B, _, T, _ = k.shape
        store, rows = self.cache.stores[layer], self.slots
        end = self.start + T  # (B,) each row's length after this forward
        if not self.cache.ring[layer]:
            self._write(store, positions, k, v)
            S = int(end.max())
            k_all, v_all = self._read(store, S)
            held = torch.arange(S, device=k.device).expand(B, S)
            return k_all, v_all, torch.where(held < end[:, None], held, -1)
        W = self.cache.window
        if T == 1:  # the new token overwrites only the slot that just left its window
            self._write(store, positions % W, k, v)
            k_all, v_all = self._read(store, W)
            return k_all, v_all, ring_positions_of(end, W)
        # a chunk: the ring as it was, then the chunk's own keys (as later steps will read them back)
        old_k, old_v = self._read(store, W)
        k, v = store.stored(k), store.stored(v)
        k_all, v_all = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
        k_pos = torch.cat([ring_positions_of(self.start, W), positions], dim=1)
        keep = min(T, W)  # only the chunk's last `window` tokens survive in the ring
        self._write(store, positions[:, T - keep:] % W, k[:, :, T - keep:], v[:, :, T - keep:])
        return k_all, v_all, k_pos

    def _write(self, store: KVStore, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (B, n_kv, T, hd) into each row's store slots index (B, T)."""
        rows = self.slots[:, None].expand_as(index)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, T, n_kv, hd): advanced indices come first
        if store.int8:
            (kq, ks), (vq, vs) = quantize_kv_int8(k), quantize_kv_int8(v)
            store.k[rows, :, index], store.k_scale[rows, :, index] = kq, ks
            store.v[rows, :, index], store.v_scale[rows, :, index] = vq, vs
        else:
            store.k[rows, :, index], store.v[rows, :, index] = k, v

    def _read(self, store: KVStore, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots [0, end) of every row, in the compute dtype: (B, n_kv, end, hd) each."""
        rows = self.slots
        if store.int8:
            return (dequantize_kv_int8(store.k[rows, :, :end], store.k_scale[rows, :, :end], store.dtype),
                    dequantize_kv_int8(store.v[rows, :, :end], store.v_scale[rows, :, :end], store.dtype))
        return store.k[rows, :, :end], store.v[rows, :, :end]

    def attend_one_token(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Decode (int8 caches): store each row's token k, v (B, n_kv, 1, hd) at its position, then attend q
        (B, H, 1, hd) over each row's own slot, read in place from the int8 store (as KVCache does), all rows in
        one kernel call whose shapes do not depend on the rows' lengths (a compiled step takes it)."""
        store, ring, W = self.cache.stores[layer], self.cache.ring[layer], self.cache.window
        positions = self.start[:, None]
        self._write(store, positions % W if ring else positions, k, v)
        n = (self.start + 1).clamp(max=W) if ring else self.start + 1
        return int8_kv_attention_rows(q, store.k, store.k_scale, store.v, store.v_scale, self.slots, n)

    def advance(self, T: int) -> None:
        self.cache.lengths[self.slots] = self.start + T
