"""Cached decoding and chunked prefill equal the full forward pass at every position."""

import pytest
import torch

from mobilellm.config import ModelConfig
from mobilellm.infer.cache import CacheFullError, KVCache, cache_report, kv_cache_bytes, ring_positions
from mobilellm.infer.engine import decode_one_token, new_cache, prefill_chunks
from mobilellm.model import build_model

T = 40  # tiny's window is 8: crosses the window boundary and wraps the ring several times


def cached_logits(model, tokens, cache, chunks):
    """Logits (B, T, V) from feeding tokens through the cache in chunks of the given sizes."""
    out, start = [], 0
    for size in chunks:
        piece = tokens[:, start:start + size]
        if size == 1:
            out.append(decode_one_token(model, piece, cache)[:, None])
        else:
            out.extend(model.lm_head(h) for h in prefill_chunks(model, piece, cache, chunk_size=size))
        start += size
    assert start == tokens.shape[1]
    return torch.cat(out, dim=1)


CHUNKINGS = {
    "decode-only": [1] * T,
    "prefill-then-decode": [13] + [1] * (T - 13),
    "chunks-under-window": [5] * 8,
    "chunk-longer-than-window": [19, 21],
    "uneven": [3, 9, 1, 1, 8, 17, 1],
}


@pytest.fixture(scope="module", params=["tiny", "tiny-llama", "tiny-llama-sliding"])
def model(request):
    if request.param == "tiny-llama-sliding":  # rotate-half RoPE with a local/global layout
        config = ModelConfig.from_name("tiny-llama").replace(
            name="tiny-llama-sliding", layer_types=("sliding_attention", "full_attention"), sliding_window=6)
    else:
        config = ModelConfig.from_name(request.param)
    return build_model(config, seed=0).eval()


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
def test_cached_logits_equal_full_forward_fp32(model, chunking):
    tokens = torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
    cache = new_cache(model, max_len=64, batch=2)
    got = cached_logits(model, tokens, cache, CHUNKINGS[chunking])
    torch.testing.assert_close(got, full, atol=2e-5, rtol=1e-5)
    assert cache.next_position == T


@pytest.mark.parametrize("chunking", ["decode-only", "chunk-longer-than-window"])
def test_int8_kv_close_to_full_forward(model, chunking):
    # int8 per-token-per-head KV: stated tolerance 0.05 absolute on logits of std ~1 (observed ~1e-2).
    tokens = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
    got = cached_logits(model, tokens, new_cache(model, max_len=64, int8=True), CHUNKINGS[chunking])
    assert (got - full).abs().max() < 0.05
    assert (got.argmax(-1) == full.argmax(-1)).float().mean() > 0.95


def test_sliding_layers_use_a_ring_of_window_slots():
    config = ModelConfig.from_name("tiny")
    cache = KVCache(config, max_len=64)
    for layer, store in enumerate(cache.stores):
        expected = config.sliding_window if config.layer_types[layer] == "sliding_attention" else 64
        assert store.k.shape[2] == expected


def test_ring_positions():
    assert ring_positions(0, 4).tolist() == [-1, -1, -1, -1]
    assert ring_positions(3, 4).tolist() == [0, 1, 2, -1]
    assert ring_positions(10, 4).tolist() == [8, 9, 6, 7]


def test_full_cache_raises_clear_error():
    model = build_model(ModelConfig.from_name("tiny"), seed=0)
    cache = new_cache(model, max_len=10)
    prefill_chunks_list = list(prefill_chunks(model, torch.zeros(1, 10, dtype=torch.long), cache))
    assert len(prefill_chunks_list) == 1
    with pytest.raises(CacheFullError, match="holds 10 tokens"):
        decode_one_token(model, torch.zeros(1, 1, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="past the model's context"):
        KVCache(model.config, max_len=model.config.max_seq_len + 1)


@pytest.mark.parametrize("int8", [True, False])
def test_allocated_bytes_match_formula(int8):
    config = ModelConfig.from_name("pro-1b")
    for tokens in (600, 2000):
        cache = KVCache(config, max_len=tokens, int8=int8)
        expected = kv_cache_bytes(config, tokens) if int8 else kv_cache_bytes(config, tokens, 4, scale_bytes=0)
        assert cache.nbytes() == expected


def test_model_card_figures():
    # SPEC.md 1: int8 K and V, local/global 14 / 23 / 40 MB at 2k / 4k / 8k, all-global 117 MB at 8k.
    config = ModelConfig.from_name("pro-1b")
    mib = lambda n, **kw: round(kv_cache_bytes(config, n, scale_bytes=0, **kw) / 2**20)
    assert [mib(2000), mib(4000), mib(8000)] == [14, 23, 40]
    assert mib(8000, all_global=True) == 117
    assert "117.2 MiB" in cache_report(config)
