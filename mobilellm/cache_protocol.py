"""What the model asks of a KV cache, declared once: `model.Transformer` reads these attributes, never probes.

A cache subclasses `AttentionCache`, implements `update`, and overrides the capabilities it has. The
defaults describe a cache with none of them: attention gets masks built from the returned key positions,
and the model computes RoPE itself. Implementations: `infer.cache.KVCache` (decoding),
`eval.loglik.PrefixCache` (shared prefixes), `quant.modules._Int8KV` (a per-layer int8 wrapper).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class AttentionCache(ABC):
    # Position of the next token fed; the model numbers a chunk from it when given no positions.
    next_position: int = 0
    # update() returns keys as [every earlier key the layer keeps, the chunk's own T keys], so attention can
    # skip masked work (attention.CachedChunk) instead of taking a mask.
    keys_past_then_chunk: bool = False
    # Decode steps (T == 1) of global and sliding layers of a keys_past_then_chunk cache call
    # attend_one_token instead of update: the cache attends from its own storage.
    attends_one_token: bool = False
    # K and V are stored in quant.math.quantize_kv_int8's format, so quantizing them before is a no-op.
    int8: bool = False

    @abstractmethod
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Store this chunk's k, v (B, n_kv, T, hd) of `layer`; return (k_all, v_all, k_positions): every key and
        value the chunk attends (B, n_kv, S, hd) and their positions (B, S), -1 for an empty slot."""

    def positions(self, T: int, device=None) -> torch.Tensor:
        """The positions of the next T tokens fed, (1, T) (or (B, T) when each row is at its own position): the
        model numbers a chunk with them when given none."""
        return torch.arange(self.next_position, self.next_position + T, device=device)[None]

    def advance(self, T: int) -> None:
        """Called once per forward, after every layer: T more tokens are cached."""
        self.next_position += T

    def rotations(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What model.rope_angles(positions) gives, when the cache holds it precomputed; None: compute it."""
        return None

    def attend_one_token(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """With attends_one_token: store the token's k, v (B, n_kv, 1, hd), return q's attention (B, H, 1, hd)."""
        raise NotImplementedError(f"{type(self).__name__} does not attend from its own storage "
                                  "(its attends_one_token is False)")
