"""Streaming checkpoints: TensorReader reads one tensor at a time, ShardWriter writes shards as they fill."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mobilellm.config import ModelConfig
from mobilellm.hf import (INDEX_FILE, WEIGHTS_FILE, CheckpointError, ShardWriter, TensorReader, load_pretrained,
                          model_from_tensors, read_tensors, save_pretrained, to_hf_name)
from mobilellm.model import build_model

ROOT = Path(__file__).resolve().parents[1]
CFG = ModelConfig.from_name("tiny")


@pytest.fixture
def model():
    return build_model(CFG, seed=0)


def stored(model) -> dict[str, torch.Tensor]:
    """What a checkpoint of `model` holds: its state dict less the tied head."""
    return {k: v for k, v in model.state_dict().items() if not (CFG.tie_embeddings and k == "lm_head.weight")}


def check_index(folder: Path) -> dict[str, str]:
    """The index names every shard file, model-0000i-of-0000N, and exactly the tensors each one holds."""
    index = json.loads((folder / INDEX_FILE).read_text())
    weight_map = index["weight_map"]
    files = sorted(set(weight_map.values()))
    n = len(files)
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in folder.glob("*.safetensors")) == files
    total = 0
    for name in files:
        with safe_open(folder / name, framework="pt") as f:
            assert set(f.keys()) == {k for k, v in weight_map.items() if v == name}
            total += sum(f.get_tensor(k).nbytes for k in f.keys())
    assert index["metadata"]["total_size"] == total
    return weight_map


def test_sharded_checkpoint_read_tensor_by_tensor_and_rewritten(model, tmp_path):
    src = save_pretrained(model, tmp_path / "src", max_shard_bytes=100_000)
    assert len(set(check_index(src).values())) >= 3

    reader = TensorReader(src, CFG.family)
    expected = stored(model)
    assert sorted(reader.keys()) == sorted(expected)  # our names
    assert all(reader.shape(k) == tuple(v.shape) for k, v in expected.items())
    assert "lm_head.weight" not in reader and len(reader) == len(expected)

    with ShardWriter(tmp_path / "dst", CFG, max_shard_bytes=250_000, extra_files={"note.txt": "hi"}) as writer:
        for name, tensor in reader.items():
            writer.add(name, tensor)
        assert not (tmp_path / "dst").exists()  # visible only once complete
    dst = tmp_path / "dst"
    weight_map = check_index(dst)
    assert set(weight_map) == {to_hf_name(k, CFG.family) for k in expected}
    assert 3 <= len(set(weight_map.values())) < len(set(check_index(src).values()))
    assert (dst / "note.txt").read_text() == "hi"
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "float32"
    assert ModelConfig.load(dst) == CFG
    rewritten = read_tensors(dst, CFG.family)
    assert rewritten.keys() == expected.keys()
    assert all(torch.equal(rewritten[k], v) for k, v in expected.items())
    loaded = load_pretrained(dst)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_one_shard_is_model_safetensors_without_an_index(model, tmp_path):
    with ShardWriter(tmp_path / "one", CFG) as writer:
        for name, tensor in model.state_dict().items():
            writer.add(name, tensor.to(torch.bfloat16))
    folder = tmp_path / "one"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "mobilellm_config.json", WEIGHTS_FILE]
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(folder / WEIGHTS_FILE, framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # the tied head is the embedding
    assert [p.name for p in tmp_path.iterdir()] == ["one"]


def test_writer_refuses_a_tensor_twice_and_leaves_nothing(model, tmp_path):
    with pytest.raises(ValueError, match="added twice"):
        with ShardWriter(tmp_path / "x", CFG) as writer:
            writer.add("norm.weight", model.norm.weight)
            writer.add("norm.weight", model.norm.weight)
    with pytest.raises(ValueError, match="no tensors"):
        with ShardWriter(tmp_path / "x", CFG):
            pass
    assert list(tmp_path.iterdir()) == []


def test_reader_casts_float_tensors_only(tmp_path):
    with ShardWriter(tmp_path / "c", CFG) as writer:
        writer.add("norm.weight", torch.ones(4))
        writer.add("layers.0.packed", torch.arange(4, dtype=torch.uint8))
    reader = TensorReader(tmp_path / "c", CFG.family, dtype=torch.bfloat16)
    assert reader.get("norm.weight").dtype == torch.bfloat16
    assert reader.get("layers.0.packed").dtype == torch.uint8


def sharded(model, folder: Path) -> list[Path]:
    save_pretrained(model, folder, max_shard_bytes=100_000)
    return sorted(folder.glob("model-*.safetensors"))


def test_missing_shard_is_named(model, tmp_path):
    shard = sharded(model, tmp_path / "ckpt")[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name} named in the index is missing"):
        TensorReader(tmp_path / "ckpt", CFG.family)
    with pytest.raises(CheckpointError, match=f"{shard.name} named in the index is missing"):
        load_pretrained(tmp_path / "ckpt")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_shard_is_named(model, tmp_path, damage):
    path = sharded(model, tmp_path / "ckpt")[2]
    data = path.read_bytes()
    path.write_bytes(b"\x00" * 64 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"cannot read .*{path.name} .corrupt or truncated"):
        load_pretrained(tmp_path / "ckpt")


def test_malformed_index_is_named(model, tmp_path):
    sharded(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / INDEX_FILE).write_text("{}")
    with pytest.raises(CheckpointError, match="malformed .*model.safetensors.index.json"):
        TensorReader(tmp_path / "ckpt", CFG.family)


def test_model_from_tensors_checks_and_ties(model):
    tensors = stored(model)
    built = model_from_tensors(CFG, tensors, dtype=torch.bfloat16)
    assert built.embed_tokens.weight.dtype == torch.bfloat16 and built.lm_head.weight is built.embed_tokens.weight
    assert torch.equal(built.norm.weight, model.norm.weight.to(torch.bfloat16))
    with_head = model_from_tensors(CFG, dict(tensors, **{"lm_head.weight": torch.zeros_like(model.lm_head.weight)}))
    assert with_head.lm_head.weight is with_head.embed_tokens.weight  # a stored tied head is tolerated, not used
    bad = dict(tensors, **{"norm.weight": torch.zeros(3), "extra.weight": torch.zeros(1)})
    del bad["layers.0.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"^here: missing tensors \['layers.0.mlp.up_proj.weight'\]; unexpected "
                                              r"tensors \['extra.weight'\]; shape mismatches norm.weight: checkpoint "
                                              r"\(3,\) vs model \(64,\)$"):
        model_from_tensors(CFG, bad, context="here")
    kinds = dict(tensors, **{"norm.weight": torch.zeros(64, dtype=torch.uint8)})
    with pytest.raises(CheckpointError, match="dtype mismatches norm.weight: checkpoint torch.uint8 vs model"):
        model_from_tensors(CFG, kinds)


# Run in a fresh process, so memory freed by earlier tests (and kept by the allocator) cannot hide growth.
# VmHWM is the kernel's peak resident set (file pages of the read maps included), reset by clear_refs.
# MALLOC_MMAP_THRESHOLD_ fixes glibc's threshold: by default it rises after the first 16 MiB block is freed,
# later blocks come from the heap, and its fragmentation adds a block to RSS every few tensors, with none
# of them held (blocks past 32 MiB, as most of a real model's, are always mapped and unmapped).
STREAM = """
import json, re, sys
import torch
from mobilellm.config import ModelConfig
from mobilellm.hf import ShardWriter, TensorReader

def mib(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024

def peak_growth(work):
    start = mib("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    kept = work()
    return mib("VmHWM") - start, kept

src, dst, shard_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = ModelConfig.from_name("tiny")
reader = TensorReader(src, config.family)

def rewrite():
    with ShardWriter(dst, config, max_shard_bytes=shard_bytes) as writer:
        for name, tensor in reader.items():
            writer.add(name, tensor * 2)  # a new tensor per input, as merging makes

streaming, _ = peak_growth(rewrite)
holding, kept = peak_growth(lambda: [tensor * 2 for _, tensor in reader.items()])  # the control: keeps them all
print(json.dumps({"streaming_mib": streaming, "holding_mib": holding}))
"""


def test_streaming_rewrite_holds_a_few_tensors_not_the_model(tmp_path):
    n_tensors, numel = 20, 4 * 2**20  # 20 x 16 MiB fp32 = 320 MiB
    tensor_mib = numel * 4 / 2**20
    gen = torch.Generator().manual_seed(0)
    with ShardWriter(tmp_path / "src", CFG, max_shard_bytes=numel * 4) as writer:  # one tensor per shard
        for i in range(n_tensors):
            writer.add(f"layers.{i}.big.weight", torch.randn(numel, generator=gen))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    done = subprocess.run([sys.executable, "-c", STREAM, str(tmp_path / "src"), str(tmp_path / "dst"), str(numel * 4)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    model_mib = n_tensors * tensor_mib
    assert result["holding_mib"] > 0.9 * model_mib  # the control: the measure sees tensors that are kept
    assert result["streaming_mib"] < 2 * tensor_mib + 64, result  # 64 MiB: allocator and interpreter slack

    src, dst = TensorReader(tmp_path / "src", CFG.family), TensorReader(tmp_path / "dst", CFG.family)
    assert dst.keys() == src.keys() and len(set(check_index(tmp_path / "dst").values())) == n_tensors
    for name, tensor in src.items():
        assert torch.equal(dst.get(name), tensor * 2), name
