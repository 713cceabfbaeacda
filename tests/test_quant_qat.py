"""QAT prepare -> train -> convert on the tiny model: converted outputs equal the fake-quantized ones."""

import copy

import pytest
import torch
import torch.nn.functional as F

from mobilellm.config import ModelConfig
from mobilellm.model import build_model
from mobilellm.quant import QuantConfig, convert, prepare, quantize_
from mobilellm.quant.fake import FakeQuantEmbedding, FakeQuantLinear
from mobilellm.quant.modules import KVQuantAttention, QuantizedLinear

CFG = ModelConfig.from_name("tiny")


def tokens(seed=0, shape=(2, 48)):
    return torch.randint(0, CFG.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def train_steps(model, steps=5):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for i in range(steps):
        t = tokens(i + 10)
        loss = F.cross_entropy(model(t[:, :-1]).flatten(0, 1), t[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.parametrize("scheme", ["cpu", "accelerator"])
def test_convert_equals_fake_quant_after_training(scheme, monkeypatch):
    # The reference kernel runs the same float ops as fake quant: equal to float rounding. (The C++ kernel
    # sums in another order; with int8 activations one flipped rounding then moves the next layer's input
    # by a quantization step, so it is checked per layer in test_quant_kernels.py.)
    monkeypatch.setenv("MOBILELLM_INT4_BACKEND", "reference")
    config = QuantConfig.from_scheme(scheme)
    model = train_steps(prepare(build_model(CFG, seed=0), config))
    t = tokens(1)
    with torch.no_grad():
        fake = model(t)
        real = convert(model, config)(t)
    assert not any(isinstance(m, (FakeQuantLinear, FakeQuantEmbedding)) for m in model.modules())
    assert torch.allclose(real, fake, rtol=1e-5, atol=1e-5), (real - fake).abs().max()


def test_cpu_scheme_shares_one_packed_table_and_quantizes_kv():
    model = quantize_(build_model(CFG, seed=0), QuantConfig.from_scheme("cpu"))
    assert model.lm_head.packed_weight is model.embed_tokens.packed_weight
    assert "lm_head.packed_weight" not in model.state_dict()
    assert all(isinstance(b.self_attn, KVQuantAttention) for b in model.layers)
    assert model.lm_head.int8_activations and model.lm_head.group_size == 32
    # turning int8 KV off changes the outputs (so it is really applied)
    no_kv = quantize_(build_model(CFG, seed=0), QuantConfig.from_scheme("cpu").__class__(
        "cpu", kv_int8=False))
    assert not torch.equal(model(tokens()), no_kv(tokens()))


def test_accelerator_scheme_unties_and_learns_per_channel_scales():
    config = QuantConfig.from_scheme("accelerator")
    model = prepare(build_model(CFG, seed=0), config)
    assert not model.config.tie_embeddings
    assert model.lm_head.weight is not model.embed_tokens.weight
    scale = model.layers[0].self_attn.q_proj.weight_fake_quantizer.scale
    assert scale.shape == (CFG.n_heads * CFG.head_dim, 1) and scale.requires_grad
    assert "layers.0.self_attn.q_proj.weight_fake_quantizer.scale" in model.state_dict()
    before = scale.detach().clone()
    train_steps(model, 3)
    assert not torch.equal(before, scale.detach())  # the ranges were learnt
    assert not any(isinstance(b.self_attn, KVQuantAttention) for b in model.layers)  # bf16 KV


def test_ptq_is_close_to_full_precision_but_not_equal():
    fp = build_model(CFG, seed=0)
    q = quantize_(copy.deepcopy(fp), QuantConfig.from_scheme("cpu"))
    t = tokens()
    a, b = fp(t), q(t)
    assert not torch.equal(a, b)
    assert (a.softmax(-1) - b.softmax(-1)).abs().max() < 0.05


def test_prepare_keeps_tied_parameter_and_forward_api():
    model = prepare(build_model(CFG, seed=0), QuantConfig.from_scheme("cpu"))
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.lm_head.weight_fake_quantizer is model.embed_tokens.weight_fake_quantizer
    assert model(tokens()).shape == (2, 48, CFG.vocab_size)
    assert model.hidden_states(tokens()).shape == (2, 48, CFG.dim)


def test_convert_requires_prepared_model():
    with pytest.raises(ValueError, match="prepare"):
        convert(build_model(CFG, seed=0), QuantConfig.from_scheme("cpu"))


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        QuantConfig.from_scheme("int3")
    with pytest.raises(ValueError, match="group_size"):
        QuantConfig("custom", group_size=20)
    assert isinstance(quantize_(build_model(CFG, seed=0), QuantConfig.from_scheme("cpu")).layers[0].mlp.up_proj,
                      QuantizedLinear)


def test_converted_model_decodes_with_the_int8_kv_cache_like_its_full_forward():
    from mobilellm.infer.engine import decode_one_token, new_cache, prefill

    model = quantize_(build_model(CFG, seed=0), QuantConfig.from_scheme("cpu"))
    t = tokens(5, (1, 20))
    full = model(t)  # (1, 20, V): no cache
    cache = new_cache(model, max_len=32, int8=True)
    logits = [prefill(model, t[:, :12], cache)]
    for i in range(12, 20):
        logits.append(decode_one_token(model, t[:, i:i + 1], cache))
    assert torch.allclose(torch.stack(logits[:-1], 1), full[:, 11:19], atol=1e-4)
