"""Decode attention read straight from the int8 KV cache, against the dequantize-then-SDPA math."""

import math

import pytest
import torch

from mobilellm.config import ModelConfig
from mobilellm.infer.cache import RotationTable
from mobilellm.infer.engine import decode_one_token, new_cache, prefill
from mobilellm.model import build_model, rope_angles
from mobilellm.quant import QuantConfig, quantize_
from mobilellm.quant.kernels import int8_kv_attention, int8_kv_attention_rows, load_extension
from mobilellm.quant.math import quantize_kv_int8


def int8_store(B, Hkv, S, hd, seed):
    gen = torch.Generator().manual_seed(seed)
    k, k_scale = quantize_kv_int8(torch.randn(B, Hkv, S, hd, generator=gen) * 2)
    v, v_scale = quantize_kv_int8(torch.randn(B, Hkv, S, hd, generator=gen))
    return k, k_scale, v, v_scale


def float64_attention(q, k, k_scale, v, v_scale, n):
    """Softmax(q k^T / sqrt(hd)) v over slots [0, n), each KV head shared by its Hq / Hkv query heads."""
    keys, values = (k[:, :, :n].double() * k_scale[:, :, :n]), (v[:, :, :n].double() * v_scale[:, :, :n])
    group = q.shape[1] // k.shape[1]
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    scores = q.double() @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.softmax(-1) @ values


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("B,Hq,Hkv,hd", [(1, 20, 4, 64), (2, 4, 2, 16), (1, 3, 3, 8)])
@pytest.mark.parametrize("n", [1, 7, 37, 64])
def test_matches_dequantized_math(backend, B, Hq, Hkv, hd, n):
    if backend == "cpp" and load_extension() is None:
        pytest.skip("the C++ kernels do not build here (no AVX2 or no C++ compiler)")
    k, k_scale, v, v_scale = int8_store(B, Hkv, 64, hd, seed=n)
    # Large queries: peaked softmaxes, scores far below the max, the kernel's exp over a wide range.
    q = torch.randn(B, Hq, 1, hd, generator=torch.Generator().manual_seed(1)) * 3
    got = int8_kv_attention(q, k, k_scale, v, v_scale, n, backend=backend)
    want = float64_attention(q, k, k_scale, v, v_scale, n)
    assert got.shape == (B, Hq, 1, hd) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_rows_at_their_own_lengths_equal_each_row_alone(backend):
    """The continuous-batching call: row b attends store row rows[b] at its own length, bit for bit what the
    single-sequence call gives that store row, and the dequantized math."""
    if backend == "cpp" and load_extension() is None:
        pytest.skip("the C++ kernels do not build here (no AVX2 or no C++ compiler)")
    k, k_scale, v, v_scale = int8_store(5, 3, 40, 64, seed=3)  # 5 slots, SmolLM2's 3 KV heads of 64
    q = torch.randn(4, 9, 1, 64, generator=torch.Generator().manual_seed(2)) * 3
    rows, n = torch.tensor([3, 0, 4, 1]), torch.tensor([1, 40, 17, 8])
    got = int8_kv_attention_rows(q, k, k_scale, v, v_scale, rows, n, backend=backend)
    for b, (r, m) in enumerate(zip(rows.tolist(), n.tolist())):
        s = slice(r, r + 1)
        alone = int8_kv_attention(q[b:b + 1], k[s], k_scale[s], v[s], v_scale[s], m, backend=backend)
        assert torch.equal(got[b:b + 1], alone)
        torch.testing.assert_close(got[b:b + 1].double(), float64_attention(q[b:b + 1], k[s], k_scale[s], v[s],
                                                                            v_scale[s], m), rtol=1e-5, atol=1e-5)
    if backend == "cpp":
        with pytest.raises(RuntimeError, match="n 41 in"):
            int8_kv_attention_rows(q, k, k_scale, v, v_scale, rows, torch.tensor([1, 41, 1, 1]), backend=backend)


def test_refuses_more_than_one_query_token():
    k, k_scale, v, v_scale = int8_store(1, 2, 8, 16, seed=0)
    with pytest.raises(ValueError, match="one query token"):
        int8_kv_attention(torch.zeros(1, 2, 3, 16), k, k_scale, v, v_scale, 4)


def test_rotation_table_equals_rope_angles():
    config = ModelConfig.from_name("pro-1b")
    positions = torch.tensor([[0, 1, 511, 512, 4095]])
    table = RotationTable(config, 4096 + 1)(positions)
    direct = rope_angles(positions, config.head_dim, config.rope_theta, config.rope_layout)
    for a, b in zip(table, direct):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("quantized", [False, True])
def test_cache_decode_path_equals_the_update_path(quantized):
    """Through the ring's wrap (window 8) and global layers, batch of 2: attend_one_token gives the logits that
    storing through update() and attending the dequantized keys gives."""
    model = build_model(ModelConfig.from_name("tiny"), seed=0).eval()
    if quantized:  # the cpu scheme: its attention wraps the cache (modules._Int8KV) and must still take the path
        model = quantize_(model, QuantConfig.from_scheme("cpu"))
    tokens = torch.randint(0, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    runs = []
    for fast in (True, False):
        cache = new_cache(model, max_len=32, int8=True, batch=2)
        cache.attends_one_token = fast
        calls = []
        if fast:
            original = cache.attend_one_token
            cache.attend_one_token = lambda *args: calls.append(args[0]) or original(*args)
        logits = [prefill(model, tokens[:, :5], cache)]
        logits += [decode_one_token(model, tokens[:, t:t + 1], cache) for t in range(5, 30)]
        runs.append(torch.stack(logits, 1))
        assert not fast or len(calls) == 25 * model.config.n_layers
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-5)
