"""Quantized checkpoints: round trip, meta-device loading, clear errors; HF fake-quant export."""

import json

import pytest
import torch

from mobilellm.config import ModelConfig
from mobilellm.hf import CheckpointError
from mobilellm.model import build_model
from mobilellm.quant import QuantConfig, quantize_
from mobilellm.quant.checkpoint import load_quantized, save_quantized

CFG = ModelConfig.from_name("tiny")
TOKENS = torch.randint(0, CFG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(params=["cpu", "accelerator"])
def saved(request, tmp_path):
    config = QuantConfig.from_scheme(request.param)
    model = quantize_(build_model(CFG, seed=0), config)
    save_quantized(model, config, tmp_path / "q")
    return model, config, tmp_path / "q"


def test_round_trip_gives_identical_outputs(saved):
    model, config, folder = saved
    loaded, loaded_config = load_quantized(folder)
    assert loaded_config == config
    assert torch.equal(loaded(TOKENS), model(TOKENS))
    packed = [b for n, b in loaded.named_buffers() if n.endswith("packed_weight")]
    assert packed and all(b.dtype == torch.uint8 for b in packed)
    assert not any(p.is_meta for p in loaded.parameters()) and not any(b.is_meta for b in loaded.buffers())
    assert not any(p.dtype != torch.float32 or p.ndim > 1 for p in loaded.parameters())  # only norms are float
    if config.share_embeddings:
        assert loaded.lm_head.packed_weight is loaded.embed_tokens.packed_weight


def test_missing_quant_config_is_a_clear_error(saved):
    _, _, folder = saved
    (folder / "quantization_config.json").unlink()
    with pytest.raises(ValueError, match="not a quantized checkpoint"):
        load_quantized(folder)


def test_mismatched_quant_config_is_a_clear_error(saved):
    _, config, folder = saved
    other = "accelerator" if config.scheme == "cpu" else "cpu"
    QuantConfig.from_scheme(other).save(folder)
    with pytest.raises(CheckpointError, match="does not match its quantization config"):
        load_quantized(folder)


def test_checkpoint_of_an_older_int4_format_is_a_clear_error(saved):
    _, config, folder = saved
    old = {k: v for k, v in config.to_dict().items() if k != "format_version"}  # as format 1 wrote it
    (folder / "quantization_config.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="format 1.*quantize the model again"):
        load_quantized(folder)


def test_malformed_quant_config(saved):
    _, _, folder = saved
    (folder / "quantization_config.json").write_text(json.dumps({"scheme": "cpu", "bits": 3}))
    with pytest.raises(ValueError, match="unknown fields"):
        load_quantized(folder)


def test_corrupt_weights_are_a_clear_error(saved):
    _, _, folder = saved
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_quantized(folder)


def test_save_refuses_unconverted_model(tmp_path):
    with pytest.raises(ValueError, match="converted model"):
        save_quantized(build_model(CFG, seed=0), QuantConfig.from_scheme("cpu"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_fake_quant_export_stores_weights_on_the_grid_and_their_scales(tmp_path):
    from safetensors.torch import load_file

    from mobilellm.quant.checkpoint import export_fake_quant

    config = QuantConfig.from_scheme("accelerator")
    model = quantize_(build_model(CFG, seed=0), config)
    export_fake_quant(model, config, tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    w = tensors["model.layers.1.self_attn.o_proj.weight"]
    scale = tensors["model.layers.1.self_attn.o_proj.weight_fake_quantizer.scale"]
    assert scale.shape == (CFG.dim, 1)  # per output channel
    q = w / scale
    assert torch.allclose(q, q.round(), atol=1e-4) and q.round().min() >= -8 and q.round().max() <= 7
    assert torch.allclose(w, model.layers[1].self_attn.o_proj.dequantized_weight())
    assert "lm_head.weight" in tensors and "model.lm_head.weight_fake_quantizer.scale" in tensors  # untied
    with pytest.raises(ValueError, match="untied"):
        export_fake_quant(model, QuantConfig.from_scheme("cpu"), tmp_path / "x")
