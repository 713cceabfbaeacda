"""The error-minimising int4 scale search and the config option choosing which parts are quantized."""

import copy
import dataclasses

import pytest
import torch

from mobilellm.config import ModelConfig
from mobilellm.model import build_model
from mobilellm.quant import QuantConfig, convert, prepare, quantize_
from mobilellm.quant import math as qm
from mobilellm.quant.checkpoint import load_quantized, save_quantized
from mobilellm.quant.modules import QuantizedEmbedding, QuantizedLinear

CFG = ModelConfig.from_name("tiny")
TOKENS = torch.randint(0, CFG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))


def group_errors(w, scales):  # (N, K/group) squared reconstruction error of the stored format
    group = w.shape[1] // scales.shape[1]
    err = (qm.dequantize_int4(qm.quantize_int4(w, scales), scales) - w).square()
    return err.reshape(w.shape[0], -1, group).sum(-1)


def test_search_by_hand():
    # Group 0 is the grid -8..7 (peak -8): max/7.5 gives scale 8/7.5 and an error; scale 1 is exact.
    # Group 1 is -7..8 (peak +8): only a negative scale, -1, represents it exactly (8 -> -8, -7 -> 7).
    w = torch.zeros(1, 64)
    w[0, :16] = torch.arange(-8.0, 8.0)
    w[0, 32:48] = torch.arange(-7.0, 9.0)
    minmax = qm.int4_scales(w, 32)
    assert minmax.tolist() == [[pytest.approx(8 / 7.5)] * 2]
    assert (group_errors(w, minmax) > 0.5).all()
    searched = qm.int4_search_scales(w, 32, torch.float16)
    assert searched.dtype == torch.float16 and searched.tolist() == [[1.0, -1.0]]
    assert group_errors(w, searched).tolist() == [[0.0, 0.0]]
    assert qm.quantize_int4(w, searched)[0, 32:48].tolist() == list(range(7, -9, -1))


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [32, 64, 256])
@pytest.mark.parametrize("dist", ["normal", "heavy_tailed", "grid"])
def test_search_never_reconstructs_a_group_worse_than_minmax(scale_dtype, group, dist):
    gen = torch.Generator().manual_seed(group)
    w = torch.randn(64, 256, generator=gen)
    if dist == "heavy_tailed":  # outliers, where clipping pays
        w = w * torch.rand(64, 256, generator=gen).pow(4) * 10
    elif dist == "grid":  # weights already on an asymmetric 4-bit grid (as a Q4_1 GGUF's are)
        w = (torch.randint(0, 16, (64, 256), generator=gen) * 0.01 - 0.05).float()
    minmax, searched = qm.int4_scales(w, group, scale_dtype), qm.int4_search_scales(w, group, scale_dtype)
    assert searched.dtype == scale_dtype and searched.shape == minmax.shape
    e_minmax, e_search = group_errors(w, minmax), group_errors(w, searched)
    assert (e_search <= e_minmax).all()
    assert e_search.sum() < 0.9 * e_minmax.sum()  # and it does find better scales


def test_kernels_take_negative_scales():
    from mobilellm.quant.kernels import int4_linear, load_extension

    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    scales = qm.int4_search_scales(w, 32, torch.float16)
    assert (scales < 0).any() and (scales > 0).any()
    packed = qm.pack_int4(qm.quantize_int4(w, scales))
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    ref = x.double() @ qm.dequantize_int4(qm.quantize_int4(w, scales), scales).double().T
    backends = ["reference"] + (["cpp"] if load_extension() is not None else [])
    for backend in backends:
        y = int4_linear(x, packed, scales, 32, False, backend=backend)
        assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-4), backend


@pytest.mark.parametrize("scheme", ["cpu", "accelerator"])
def test_ptq_with_search_stores_the_searched_scales_and_lowers_weight_error(scheme):
    config = dataclasses.replace(QuantConfig.from_scheme(scheme), scale_search=True)
    fp = build_model(CFG, seed=0)
    minmax = quantize_(copy.deepcopy(fp), QuantConfig.from_scheme(scheme))
    searched = quantize_(copy.deepcopy(fp), config)
    for name in ("layers.0.mlp.down_proj", "lm_head"):
        w = fp.get_submodule(name).weight.detach()
        group = config.group_for(w.shape[1])
        s = searched.get_submodule(name).int4_rows()[1]
        assert s.dtype == config.torch_scale_dtype
        assert torch.equal(s, qm.int4_search_scales(w, group, config.torch_scale_dtype))
        assert group_errors(w, s.float()).sum() < group_errors(w, minmax.get_submodule(name).int4_rows()[1].float()).sum()
    if config.share_embeddings:
        assert searched.lm_head.packed_weight is searched.embed_tokens.packed_weight


@pytest.mark.parametrize("scheme", ["cpu", "accelerator"])
def test_qat_with_search_converts_to_what_it_trained(scheme, monkeypatch):
    from test_quant_qat import tokens, train_steps

    monkeypatch.setenv("MOBILELLM_INT4_BACKEND", "reference")
    config = dataclasses.replace(QuantConfig.from_scheme(scheme), scale_search=True)
    model = prepare(build_model(CFG, seed=0), config)
    q = model.layers[0].mlp.up_proj.weight_fake_quantizer
    initial = qm.int4_search_scales(model.layers[0].mlp.up_proj.weight, q.group_size, config.torch_scale_dtype)
    assert torch.equal(q.scales(model.layers[0].mlp.up_proj.weight), initial.float())  # starts at the search
    if not config.learnable_scales:
        assert model.lm_head.weight_fake_quantizer is model.embed_tokens.weight_fake_quantizer
        assert "layers.0.mlp.up_proj.weight_fake_quantizer.clip" not in model.state_dict()  # derived, not saved
    train_steps(model, 3)
    with torch.no_grad():
        fake = model(tokens(1))
        real = convert(model, config)(tokens(1))
    assert torch.allclose(real, fake, rtol=1e-5, atol=1e-5), (real - fake).abs().max()


@pytest.mark.parametrize("scheme", ["cpu", "accelerator"])
def test_float_embeddings_option_quantizes_only_the_block_linears(scheme, tmp_path):
    config = dataclasses.replace(QuantConfig.from_scheme(scheme), quantize_embeddings=False)
    fp = build_model(CFG, seed=0)
    model = quantize_(copy.deepcopy(fp), config)
    assert type(model.embed_tokens) is torch.nn.Embedding and type(model.lm_head) is torch.nn.Linear
    assert isinstance(model.layers[0].self_attn.q_proj, QuantizedLinear)
    assert (model.lm_head.weight is model.embed_tokens.weight) == config.share_embeddings
    assert torch.equal(model.embed_tokens.weight, fp.embed_tokens.weight)
    full = quantize_(copy.deepcopy(fp), QuantConfig.from_scheme(scheme))
    assert isinstance(full.embed_tokens, QuantizedEmbedding) and not torch.equal(full(TOKENS), model(TOKENS))
    save_quantized(model, config, tmp_path / "q")
    loaded, loaded_config = load_quantized(tmp_path / "q")
    assert loaded_config == config
    assert torch.equal(loaded(TOKENS), model(TOKENS))
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == config.share_embeddings


def test_qat_with_search_runs_and_checkpoints_through_the_train_loop(tmp_path):
    # The tied table and head share one quantizer: the loop's checkpoint must still save (no shared tensors).
    from mobilellm.quant.qat import qat
    from mobilellm.train.loop import TrainConfig
    from mobilellm.train.optim import Schedule
    from mobilellm.train.synthetic import SyntheticBatches

    config = dataclasses.replace(QuantConfig.from_scheme("cpu"), scale_search=True)
    result = qat(build_model(CFG, seed=0), config, SyntheticBatches(CFG.vocab_size, 2, 16),
                 TrainConfig(2, Schedule(1e-3, 2)), tmp_path)
    assert result.checkpoint is not None and result.checkpoint.exists()
    assert isinstance(result.model.lm_head, QuantizedLinear) and len(result.losses) == 2
