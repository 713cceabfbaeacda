"""attend_cached_chunk (the mask-free paths of chunked prefill and decode) against the masked reference."""

import pytest
import torch

from mobilellm.attention import CachedChunk, _banded, attend_cached_chunk, attention_mask, eager_attention
from mobilellm.config import ModelConfig
from mobilellm.infer.cache import ring_positions
from mobilellm.infer.engine import new_cache, prefill_chunks
from mobilellm.model import build_model

H, N_KV, HD, W = 6, 2, 16, 8


def qkv(T, n_keys, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, H, T, HD, generator=g), torch.randn(1, N_KV, n_keys, HD, generator=g),
            torch.randn(1, N_KV, n_keys, HD, generator=g))


def reference(q, k, v, layer_type, q_pos, k_pos):
    return eager_attention(q, k, v, attention_mask(layer_type, q_pos, k_pos, window=W))


@pytest.mark.parametrize("start,T", [(0, 5), (0, 8), (3, 1), (20, 1), (0, 19), (13, 8), (13, 21), (40, 3)])
def test_sliding_chunk_against_its_ring_matches_the_mask(start, T):
    q_pos = torch.arange(start, start + T)[None]
    k_pos = torch.cat([ring_positions(start, W), q_pos[0]])[None] if T > 1 else ring_positions(start + 1, W)[None]
    q, k, v = qkv(T, k_pos.shape[1], seed=start + T)
    got = attend_cached_chunk(q, k, v, CachedChunk("sliding_attention", q_pos, k_pos, W, start))
    torch.testing.assert_close(got, reference(q, k, v, "sliding_attention", q_pos, k_pos), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block", [1, 2, 4, 8])
@pytest.mark.parametrize("start,T", [(0, 5), (0, 19), (13, 8), (13, 21), (40, 3)])
def test_sliding_bands_of_any_block_size_match_the_mask(start, T, block):
    q_pos = torch.arange(start, start + T)[None]
    k_pos = torch.cat([ring_positions(start, W), q_pos[0]])[None]
    q, k, v = qkv(T, k_pos.shape[1], seed=start + T)
    got = _banded(q, k, v, CachedChunk("sliding_attention", q_pos, k_pos, W, start), block)
    torch.testing.assert_close(got, reference(q, k, v, "sliding_attention", q_pos, k_pos), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("start,T", [(0, 7), (0, 1), (9, 1), (9, 6), (30, 17)])
def test_global_chunk_after_its_past_matches_the_mask(start, T):
    q_pos = torch.arange(start, start + T)[None]
    k_pos = torch.arange(start + T)[None]
    q, k, v = qkv(T, start + T, seed=start)
    got = attend_cached_chunk(q, k, v, CachedChunk("full_attention", q_pos, k_pos, W, start))
    torch.testing.assert_close(got, reference(q, k, v, "full_attention", q_pos, k_pos), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [3, 8, 13, 40])
def test_chunked_prefill_equals_the_eager_full_forward(chunk):
    config = ModelConfig.from_name("tiny")  # local/global layers
    model = build_model(config, seed=0).eval()
    tokens = torch.randint(0, config.vocab_size, (1, 3 * config.sliding_window + 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.attn_backend = "eager"
        want = model.hidden_states(tokens)
        model.attn_backend = "sdpa"
        got = torch.cat(list(prefill_chunks(model, tokens, new_cache(model, tokens.shape[1]), chunk)), dim=1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
