"""Reading the config.json of the released checkpoints (as published, fields we could not see left at HF defaults)."""

from mobilellm.config import ModelConfig
from mobilellm.hf import config_from_hf, config_to_hf
from mobilellm.model import build_model

R1_950M = {  # facebook/MobileLLM-R1-950M: HF built-in Llama4ForCausalLM
    "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", "vocab_size": 128256, "hidden_size": 1536,
    "intermediate_size": 6144, "intermediate_size_mlp": 6144, "num_hidden_layers": 22, "num_attention_heads": 24,
    "num_key_value_heads": 6, "head_dim": 64, "rope_theta": 8000000.0, "rms_norm_eps": 1e-5, "use_qk_norm": True,
    "no_rope_layers": [1] * 22, "moe_layers": [], "tie_word_embeddings": True, "max_position_embeddings": 32768,
    "bos_token_id": 128000, "eos_token_id": [128001, 128009], "pad_token_id": 128004,
}

PRO = {  # facebook/MobileLLM-Pro: Llama-4-text config plus layer_types and sliding_window (remote code)
    "architectures": ["MobileLLMP1ForCausalLM"], "model_type": "llama4_text", "vocab_size": 202048,
    "hidden_size": 1280, "intermediate_size": 6144, "intermediate_size_mlp": 6144, "num_hidden_layers": 30,
    "num_attention_heads": 20, "num_key_value_heads": 4, "head_dim": 64, "rope_theta": 500000.0,
    "no_rope_layers": [1] * 30, "moe_layers": [], "tie_word_embeddings": True, "max_position_embeddings": 131072,
    "sliding_window": 512, "use_qk_norm": False,
    "layer_types": ["full_attention" if i in (0, 4, 8, 12, 16, 20, 24, 28, 29) else "sliding_attention" for i in range(30)],
}


def test_r1_950m_config_reads_as_our_named_config():
    cfg = config_from_hf(R1_950M, name="r1-950m")
    named = ModelConfig.from_name("r1-950m")
    assert cfg == named
    assert build_model(cfg, device="meta").num_parameters() == 949_685_760


def test_mobilellm_pro_config_reads_local_global_layout():
    cfg = config_from_hf(PRO)
    assert cfg.layer_types == ModelConfig.from_name("pro-1b").layer_types and cfg.sliding_window == 512
    assert build_model(cfg, device="meta").num_parameters() == 1_084_453_120


def test_llama4_defaults_nope_every_fourth_layer_like_transformers():
    silent = {k: v for k, v in R1_950M.items() if k != "no_rope_layers"}
    cfg = config_from_hf(silent)
    assert [i for i in range(22) if not cfg.uses_rope(i)] == [3, 7, 11, 15, 19]
    assert cfg.layer_types[3] == "chunked_attention" and cfg.attention_chunk_size == 8192


def test_export_reads_back_identically():
    for name in ("pro-1b", "r1-140m", "smollm2-135m", "tiny"):
        cfg = ModelConfig.from_name(name)
        back = config_from_hf(config_to_hf(cfg), name=name)
        assert back.replace(init_std=cfg.init_std) == cfg, name
