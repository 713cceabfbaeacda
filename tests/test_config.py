import json

import pytest

from mobilellm.config import CONFIGS, ConfigError, ModelConfig, local_global_pattern
from mobilellm.model import build_model

EXPECTED_PARAMETERS = {
    "pro-1b": 1_084_453_120,
    "r1-140m": 140_248_512,
    "r1-360m": 359_431_168,
    "r1-950m": 949_685_760,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMETERS))
def test_parameter_counts_on_meta_device(name):
    model = build_model(ModelConfig.from_name(name), device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert model.num_parameters() == EXPECTED_PARAMETERS[name]


def test_pro_1b_layer_layout():
    cfg = ModelConfig.from_name("pro-1b")
    globals_ = [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"]
    assert globals_ == [0, 4, 8, 12, 16, 20, 24, 28, 29]
    assert cfg.layer_types.count("sliding_attention") == 21 and cfg.sliding_window == 512
    assert (cfg.vocab_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (202_048, 20, 4, 64)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_named_config_round_trips_through_json(name, tmp_path):
    cfg = ModelConfig.from_name(name)
    cfg.save(tmp_path)
    assert ModelConfig.load(tmp_path) == cfg


def test_local_global_pattern():
    assert local_global_pattern(6, 3, last_global=True) == (
        "full_attention", "sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
        "full_attention")


@pytest.mark.parametrize("change, message", [
    ({"layer_types": ("full_attention",)}, "layer_types has 1 entries for 4 layers"),
    ({"layer_types": ("full_attention", "global", "full_attention", "full_attention")}, "unknown layer types"),
    ({"sliding_window": None}, "need sliding_window"),
    ({"n_kv_heads": 3}, "multiple of n_kv_heads"),
    ({"rope_layout": "sideways"}, "rope_layout"),
    ({"dim": 0}, "dim must be a positive integer"),
])
def test_inconsistent_configs_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_name("tiny").replace(**change)


def test_malformed_config_files_are_refused(tmp_path):
    path = tmp_path / "mobilellm_config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="mobilellm_config.json: not valid JSON"):
        ModelConfig.load(tmp_path)
    data = ModelConfig.from_name("tiny").to_dict()
    path.write_text(json.dumps({**data, "n_expertz": 4}))
    with pytest.raises(ConfigError, match="unknown field .n_expertz."):
        ModelConfig.load(tmp_path)
    del data["dim"]
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="missing field .dim."):
        ModelConfig.load(tmp_path)


def test_unknown_name():
    with pytest.raises(ConfigError, match="unknown model config 'pro-2b'"):
        ModelConfig.from_name("pro-2b")
