"""Our logits equal transformers' own LlamaForCausalLM / Llama4ForCausalLM, weights passed through our save/load."""

import pytest
import torch

from mobilellm.config import ModelConfig
from mobilellm.hf import load_pretrained, save_pretrained
from mobilellm.model import build_model

transformers = pytest.importorskip("transformers")


def hf_logits(folder, tokens):
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    hf.eval()
    with torch.no_grad():
        return hf(tokens).logits


def roundtrip_and_compare(cfg, tmp_path, atol=2e-5):
    model = build_model(cfg, seed=1)
    save_pretrained(model, tmp_path / "ckpt")
    ours = load_pretrained(tmp_path / "ckpt").eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(tokens)
        got = ours(tokens)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)  # save/load is lossless
    torch.testing.assert_close(got, hf_logits(tmp_path / "ckpt", tokens), atol=atol, rtol=1e-4)


@pytest.mark.parametrize("tie", [True, False])
def test_llama_matches_transformers(tmp_path, tie):
    cfg = ModelConfig.from_name("tiny-llama").replace(tie_embeddings=tie, rope_theta=5000.0)
    roundtrip_and_compare(cfg, tmp_path)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_llama4_text_matches_transformers(tmp_path, qk_norm):
    cfg = ModelConfig.from_name("tiny-llama").replace(family="llama4", rope_layout="interleaved", qk_norm=qk_norm,
                                                      rope_theta=8_000_000.0)
    roundtrip_and_compare(cfg, tmp_path)


def test_llama4_nope_layers_match_transformers(tmp_path):
    # Llama-4's NoPE layers with chunked attention and query temperature tuning.
    cfg = ModelConfig.from_name("tiny-llama").replace(
        family="llama4", rope_layout="interleaved", qk_norm=True, n_layers=4,
        layer_types=("full_attention", "full_attention", "full_attention", "chunked_attention"),
        attention_chunk_size=8, rope_layers=(True, True, True, False), attn_temperature_tuning=True,
        attn_floor_scale=4)
    roundtrip_and_compare(cfg, tmp_path)
