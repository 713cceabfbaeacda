"""The transformer against references written independently of its code paths."""

import math

import pytest
import torch

from mobilellm.attention import attention_mask
from mobilellm.cache_protocol import AttentionCache
from mobilellm.config import ModelConfig
from mobilellm.model import apply_rope, build_model, rotation_tables


def naive_attention(q, k, v, allowed):
    """Per-query loop over explicitly listed allowed keys: no masks, no SDPA."""
    B, H, T, hd = q.shape
    groups = H // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                keys = [j for j in range(T) if allowed(b, i, j)]
                s = torch.stack([q[b, h, i] @ k[b, h // groups, j] for j in keys]) / math.sqrt(hd)
                w = s.softmax(0)
                out[b, h, i] = sum(w[n] * v[b, h // groups, j] for n, j in enumerate(keys))
    return out


@pytest.mark.parametrize("layer_type, window", [("full_attention", None), ("sliding_attention", 3)])
def test_masked_sdpa_equals_naive_loop(layer_type, window):
    torch.manual_seed(0)
    B, H, Hkv, T, hd = 2, 4, 2, 9, 8
    q, k, v = torch.randn(B, H, T, hd), torch.randn(B, Hkv, T, hd), torch.randn(B, Hkv, T, hd)
    pos = torch.arange(T).expand(B, T)
    mask = attention_mask(layer_type, pos, pos, window=window)
    from mobilellm.attention import attend
    got = attend(q, k, v, mask, "sdpa")
    ref = naive_attention(q, k, v, lambda b, i, j: j <= i and (window is None or i - j < window))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_document_mask_keeps_attention_inside_each_document():
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    doc = torch.tensor([[0, 0, 0, 1, 1]])
    mask = attention_mask("full_attention", pos, pos, doc, doc)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]])
    assert torch.equal(mask, expected.bool())


def test_sdpa_equals_eager_reference_on_local_global_model():
    cfg = ModelConfig.from_name("tiny")
    assert set(cfg.layer_types) == {"full_attention", "sliding_attention"}
    model = build_model(cfg, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 3 * cfg.sliding_window))
    with torch.no_grad():
        sdpa = model(tokens)
        model.attn_backend = "eager"
        eager = model(tokens)
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)


def test_sliding_window_limits_what_a_token_sees():
    """Changing a token more than `window` positions back must not change a sliding-only model's output."""
    cfg = ModelConfig.from_name("tiny").replace(layer_types=("sliding_attention",) * 4, sliding_window=4, n_layers=4)
    model = build_model(cfg, seed=0)
    tokens = torch.randint(3, cfg.vocab_size, (1, 20))
    changed = tokens.clone()
    changed[0, 2] = 1
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    # 4 layers x (window - 1) = 12 positions of reach: position 2 influences up to position 14.
    torch.testing.assert_close(a[0, 15:], b[0, 15:])
    assert not torch.allclose(a[0, 14], b[0, 14])


def test_packed_documents_equal_separate_runs():
    cfg = ModelConfig.from_name("tiny")
    model = build_model(cfg, seed=0)
    docs = [torch.randint(3, cfg.vocab_size, (n,)) for n in (7, 12, 5)]
    tokens = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        packed = model(tokens, positions, doc_ids)[0]
        separate = torch.cat([model(d[None])[0] for d in docs])
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)


def test_rope_layouts_are_the_same_rotation_up_to_a_permutation():
    torch.manual_seed(0)
    x = torch.randn(1, 5, 2, 8)
    angles = torch.arange(5.0)[None, :, None, None] * torch.tensor([1.0, 0.1, 0.01, 0.001])
    cos, sin = angles.cos(), angles.sin()
    perm = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])  # interleaved pairs (2i, 2i+1) -> halves (i, i+4)
    half = apply_rope(x[..., perm], rotation_tables(cos, sin, "half"), "half")
    inter = apply_rope(x, rotation_tables(cos, sin, "interleaved"), "interleaved")
    torch.testing.assert_close(half, inter[..., perm])
    torch.testing.assert_close(inter.norm(dim=-1), x.norm(dim=-1))  # a rotation keeps lengths


def test_tied_embeddings_share_storage_and_gradients_flow():
    model = build_model(ModelConfig.from_name("tiny"), seed=0)
    assert model.lm_head.weight is model.embed_tokens.weight
    tokens = torch.randint(0, 256, (2, 16))
    loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow  # compiling flex_attention on CPU takes about a minute
def test_flex_attention_equals_eager_with_windows_and_documents():
    cfg = ModelConfig.from_name("tiny")
    model = build_model(cfg, seed=0)
    tokens = torch.randint(3, cfg.vocab_size, (1, 48))
    positions = torch.cat([torch.arange(30), torch.arange(18)])[None]
    doc_ids = torch.cat([torch.zeros(30), torch.ones(18)]).long()[None]
    with torch.no_grad():
        model.attn_backend = "flex"
        flex = model(tokens, positions, doc_ids)
        model.attn_backend = "eager"
        eager = model(tokens, positions, doc_ids)
    torch.testing.assert_close(flex, eager, atol=1e-5, rtol=1e-5)


class KeepEverything(AttentionCache):
    """The cache protocol with only its defaults: every key kept and handed back, the model builds masks
    from their positions and computes RoPE."""

    def __init__(self):
        self.kv: dict[int, tuple] = {}

    def update(self, layer, k, v, positions):
        old_k, old_v, old_pos = self.kv.get(layer, (k[:, :, :0], v[:, :, :0], positions[:, :0]))
        self.kv[layer] = torch.cat([old_k, k], 2), torch.cat([old_v, v], 2), torch.cat([old_pos, positions], 1)
        return self.kv[layer]


def test_a_cache_declaring_no_capability_decodes_as_the_full_forward():
    cfg = ModelConfig.from_name("tiny")
    model = build_model(cfg, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 2 * cfg.sliding_window + 3))  # past the sliding window
    cache = KeepEverything()
    with torch.no_grad():
        full = model(tokens)
        steps = [model(tokens[:, :5], cache=cache)] + [model(tokens[:, i:i + 1], cache=cache)
                                                       for i in range(5, tokens.shape[1])]
    assert cache.next_position == tokens.shape[1]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
