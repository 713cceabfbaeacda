"""Checkpoint folders: sharding, and clear errors for every kind of bad input."""

import json

import pytest
import torch

from mobilellm.config import ConfigError, ModelConfig
from mobilellm.hf import CheckpointError, load_pretrained, save_pretrained
from mobilellm.model import build_model
from mobilellm.tokenizer import Tokenizer, TokenizerError


@pytest.fixture
def tiny_checkpoint(tmp_path):
    model = build_model(ModelConfig.from_name("tiny"), seed=0)
    return model, save_pretrained(model, tmp_path / "ckpt")


def test_sharded_save_writes_an_index_and_loads_back(tmp_path):
    model = build_model(ModelConfig.from_name("tiny"), seed=0)
    folder = save_pretrained(model, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 3 and all((folder / s).exists() for s in shards)
    loaded = load_pretrained(folder)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_save_replaces_atomically_and_leaves_no_temp_folders(tiny_checkpoint, tmp_path):
    model, folder = tiny_checkpoint
    save_pretrained(model, folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failed_save_keeps_the_previous_checkpoint(tiny_checkpoint, tmp_path):
    model, folder = tiny_checkpoint
    before = (folder / "model.safetensors").read_bytes()
    with pytest.raises(TypeError):
        save_pretrained(model, folder, extra_files={"broken.txt": 123})  # fails mid-write
    assert (folder / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_truncated_safetensors_is_named(tiny_checkpoint):
    _, folder = tiny_checkpoint
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_pretrained(folder)


def test_garbage_safetensors_is_named(tiny_checkpoint):
    _, folder = tiny_checkpoint
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(folder)


def test_shape_mismatch_is_named(tiny_checkpoint):
    _, folder = tiny_checkpoint
    cfg = ModelConfig.load(folder).replace(ffn_dim=192)
    cfg.save(folder)
    with pytest.raises(CheckpointError, match="shape mismatches .*gate_proj.weight: checkpoint \\(160, 64\\) vs model \\(192, 64\\)"):
        load_pretrained(folder)


def test_missing_tensors_are_named(tiny_checkpoint):
    _, folder = tiny_checkpoint
    ModelConfig.load(folder).replace(n_layers=5, layer_types=("full_attention",) * 5).save(folder)
    with pytest.raises(CheckpointError, match="missing tensors \\['layers.4"):
        load_pretrained(folder)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither mobilellm_config.json nor config.json"):
        load_pretrained(tmp_path / "empty")


def test_hf_config_with_missing_fields(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    with pytest.raises(ConfigError, match="config.json: missing fields 'hidden_size'"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="unsupported model_type 'gpt2'"):
        load_pretrained(tmp_path)


def test_tokenizer_that_does_not_fit_the_model_is_refused():
    tok = Tokenizer.train_bpe(["hello world, a small corpus for a tokenizer"] * 20, vocab_size=300, show_progress=False)
    tok.check_fits(300)
    with pytest.raises(TokenizerError, match="wrong tokenizer"):
        tok.check_fits(ModelConfig.from_name("tiny").vocab_size)


def test_corrupt_tokenizer_json_is_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{\"model\": 3}")
    with pytest.raises(TokenizerError, match="cannot read tokenizer.json"):
        Tokenizer.load(tmp_path)
