"""The transformer of the MobileLLM family, read top to bottom.

Pre-norm RMSNorm blocks, GQA attention with RoPE (rotate-half or interleaved pairs), optional
parameter-free q/k L2 norm and NoPE layers (Llama-4-text), per-layer local (sliding-window) or global
attention, SwiGLU MLP, tied embeddings. Module names follow HF Llama so checkpoints map by name.

A KV cache is a `mobilellm.cache_protocol.AttentionCache`: `update(layer, k, v, positions) -> (k_all, v_all,
k_positions)` and the capabilities it declares (see mobilellm.infer.cache); the model itself keeps no decoding state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CachedChunk, attend, attention_mask, flex_block_mask
from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama-4's parameter-free q/k norm (an RMS norm without weight)."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x)


def fuse_linears(linears: list[nn.Module]) -> nn.Module:
    """One module whose output is the given bias-free linears' outputs side by side (they share an input). A
    module type with a `concatenate` classmethod (the int4 QuantizedLinear) fuses its own way."""
    if hasattr(type(linears[0]), "concatenate"):
        return type(linears[0]).concatenate(linears)
    weight = torch.cat([linear.weight.detach() for linear in linears])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    return fused


def rope_frequencies(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """(head_dim/2,) rotation speed of each dim pair."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation tables of `apply_rope` for integer positions (B, T): each (B, T, 1, head_dim)."""
    angles = positions.float()[..., None] * rope_frequencies(head_dim, theta, positions.device)  # (B, T, hd/2)
    return rotation_tables(angles.cos()[:, :, None], angles.sin()[:, :, None], layout)


def rotation_tables(cos: torch.Tensor, sin: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (..., hd/2) spread over head_dim as apply_rope pairs the dims, the sign of sin folded in."""
    if layout == "half":
        return torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)
    return cos.repeat_interleave(2, -1), torch.stack((-sin, sin), -1).flatten(-2)


def apply_rope(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor], layout: str) -> torch.Tensor:
    """Rotate x (B, T, n, hd). 'half' pairs dims (i, i+hd/2); 'interleaved' pairs (2i, 2i+1). Each dim's
    output is x * cos + partner * (+-sin): three elementwise ops, since the tables are built once per forward."""
    cos, sin = tables
    xf = x.float()
    if layout == "half":
        partner = xf.roll(x.shape[-1] // 2, dims=-1)
    else:
        partner = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (xf * cos + partner * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.layer_type = config.layer_types[layer]
        self.use_rope = config.uses_rope(layer)
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.config = config
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.qkv_proj = None  # set by fuse_projections

    def fuse_projections(self) -> None:
        """Inference only: q, k and v from one matrix, one kernel call instead of three (the separate modules
        are dropped, so the state dict changes: fuse after loading, never before saving)."""
        self.qkv_proj = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, rope, positions, masks: "MaskCache", cache=None):
        B, T, _ = x.shape
        cfg = self.config
        if self.qkv_proj is not None:
            kv_size = self.n_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([self.n_heads * self.head_dim, kv_size, kv_size], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if self.use_rope:
            q, k = apply_rope(q, rope, cfg.rope_layout), apply_rope(k, rope, cfg.rope_layout)
            if cfg.qk_norm:
                q, k = l2_norm(q, cfg.norm_eps), l2_norm(k, cfg.norm_eps)
        elif cfg.attn_temperature_tuning:
            # Llama-4 NoPE layers sharpen attention as positions grow.
            scale = torch.log1p(torch.floor((positions.float() + 1.0) / cfg.attn_floor_scale)) * cfg.attn_scale + 1.0
            q = (q * scale[:, :, None, None]).type_as(q)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, n, T, hd)
        if (T == 1 and masks.cached_chunks and cache.attends_one_token  # cached_chunks: there is a cache
                and self.layer_type in ("full_attention", "sliding_attention")):
            y = cache.attend_one_token(self.layer, q, k, v)  # decode straight from the cache's own storage
        else:
            k_pos = positions
            if cache is not None:
                k, v, k_pos = cache.update(self.layer, k, v, positions)
            y = attend(q, k, v, masks.get(self.layer_type, k_pos), masks.backend)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)
        self.gate_up_proj = None  # set by fuse_projections

    def fuse_projections(self) -> None:
        """Inference only, as Attention.fuse_projections: gate and up from one matrix."""
        self.gate_up_proj = fuse_linears([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config.dim, config.ffn_dim)

    def forward(self, x, rope, positions, masks, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, positions, masks, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class MaskCache:
    """Builds each layer type's mask once per forward; layers look theirs up.

    Plain causal attention over the tokens themselves (no cache, no documents) needs no mask at all:
    the backend's causal path is faster. FlexAttention serves training and full forwards. Against a cache
    (chunked prefill, decode), global and sliding layers get a CachedChunk instead of a mask (see
    attention.attend_cached_chunk); the eager backend keeps explicit masks as the reference.
    """

    def __init__(self, config: ModelConfig, positions, doc_ids, backend: str, cache=None):
        has_cache = cache is not None
        self.config, self.positions, self.doc_ids = config, positions, doc_ids
        self.backend = "sdpa" if backend == "flex" and has_cache else backend
        self.plain_causal_ok = doc_ids is None and not has_cache and self.backend != "flex"
        # A cache that returns keys as [every past key, the chunk's own] (infer.KVCache says so) lets attention
        # skip masked work (CachedChunk); other caches (e.g. eval's prefix cache, with padding) get masks.
        self.cached_chunks = (has_cache and cache.keys_past_then_chunk and doc_ids is None
                              and self.backend == "sdpa")
        self.start = cache.next_position if self.cached_chunks else 0
        self._masks: dict[str, torch.Tensor | None] = {}

    def get(self, layer_type: str, k_pos: torch.Tensor):
        if layer_type not in self._masks:
            if self.cached_chunks and layer_type in ("full_attention", "sliding_attention"):
                self._masks[layer_type] = CachedChunk(layer_type, self.positions, k_pos, self.config.sliding_window,
                                                      self.start)
            elif layer_type == "full_attention" and self.plain_causal_ok:
                self._masks[layer_type] = None
            else:
                build = flex_block_mask if self.backend == "flex" else attention_mask
                self._masks[layer_type] = build(
                    layer_type, self.positions, k_pos, self.doc_ids, self.doc_ids,
                    window=self.config.sliding_window, chunk=self.config.attention_chunk_size)
        return self._masks[layer_type]


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.attn_backend = "sdpa"
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def init_weights(self, seed: int | None = None) -> "Transformer":
        """Normal(0, init_std) matrices, residual projections scaled by depth (GPT-2), unit norms."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.ndim == 1:
                nn.init.ones_(p)
            else:
                scale = 1 / math.sqrt(2 * self.config.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * std * scale)
        return self

    def hidden_states(self, tokens, positions=None, doc_ids=None, cache=None):
        """Final-norm hidden states (B, T, dim): what the LM head (and a chunked loss) reads."""
        B, T = tokens.shape
        if positions is None:
            positions = (cache.positions(T, tokens.device) if cache is not None
                         else torch.arange(T, device=tokens.device)[None]).expand(B, T)
        rope = cache.rotations(positions) if cache is not None else None  # a cache may hold the tables (decode)
        if rope is None:
            rope = rope_angles(positions, self.config.head_dim, self.config.rope_theta, self.config.rope_layout)
        masks = MaskCache(self.config, positions, doc_ids, self.attn_backend, cache)
        x = self.embed_tokens(tokens)
        for block in self.layers:
            x = block(x, rope, positions, masks, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def forward(self, tokens, positions=None, doc_ids=None, cache=None):
        """Logits (B, T, vocab)."""
        return self.lm_head(self.hidden_states(tokens, positions, doc_ids, cache))

    def fuse_projections(self) -> "Transformer":
        """For inference: every block's q/k/v and gate/up projections as one matrix each (see Attention)."""
        for block in self.layers:
            block.self_attn.fuse_projections()
            block.mlp.fuse_projections()
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once


def build_model(config: ModelConfig, device="cpu", dtype=torch.float32, seed: int | None = 0) -> Transformer:
    """A freshly initialised model; on the meta device nothing is allocated."""
    with torch.device(device):
        model = Transformer(config)
    if str(device) != "meta":
        model.init_weights(seed)
    return model.to(dtype)
