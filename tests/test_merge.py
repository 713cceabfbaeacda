"""Merging: methods against hand-computed tensors, streamed checkpoint merges (each tensor read once), refusals,
the weight search, mergekit configs, and a merged checkpoint that generates."""

import json
from pathlib import Path

import pytest
import torch

from mobilellm.cli import main as cli
from mobilellm.hf import TensorReader, load_pretrained, save_pretrained
from mobilellm.merge import MERGE_FILE, MergeError, MergeMethod, merge_checkpoints, search_weights, simplex_grid
from mobilellm.merge.checkpoints import load_states, merge_states
from mobilellm.merge.mergekit_config import read_mergekit_config
from mobilellm.merge.methods import keep_largest, ties
from mobilellm.model import build_model
from mobilellm.tokenizer import Tokenizer
from tests.data_helpers import make_texts, tiny_tokenizer
from tests.train_common import TINY, one_thread  # noqa: F401  (autouse fixture)


# ---- the math, by hand -----------------------------------------------------------------------------------------

A, B, BASE = torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([3.0, 2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 1.0, 0.0])


def test_linear_is_the_weighted_average():
    out = MergeMethod("linear")([A, B], [0.25, 0.75])
    assert torch.equal(out, torch.tensor([2.5, 1.0, 0.0, 0.5]))


def test_task_arithmetic_adds_weighted_task_vectors_to_the_base():
    # deltas: A-BASE = [0, -2, 2, .5]; B-BASE = [2, 2, -2, .5]
    out = MergeMethod("task_arithmetic")([A, B], [1.0, 0.5], BASE)
    assert torch.equal(out, BASE + torch.tensor([1.0, -1.0, 1.0, 0.75]))


def test_ties_trims_elects_signs_and_averages_the_agreeing():
    base = torch.tensor([1.0, 0.0, 1.0, 0.0])
    a, b = base + torch.tensor([0.5, -2.0, 3.0, 0.5]), base + torch.tensor([2.0, 1.0, -2.5, 0.25])
    # density .5 keeps 2 of 4 entries by magnitude: deltas a -> [0, -2, 3, 0], b -> [2, 0, -2.5, 0]
    assert torch.equal(keep_largest(b - base, 0.5), torch.tensor([2.0, 0.0, -2.5, 0.0]))
    # weights (1, 1): sums [2, -2, .5, 0] elect [+, -, +, + (a tie)]; the agreeing entries: b's 2, a's -2,
    # a's 3, none; each divided by the weight that agrees (1)
    out = ties(base, [a, b], [1.0, 1.0], density=0.5)
    assert torch.equal(out, base + torch.tensor([2.0, -2.0, 3.0, 0.0]))
    # weights (1, 3): weighted a [0, -2, 3, 0], b [6, 0, -7.5, 0]; sums [6, -2, -4.5, 0] elect [+, -, -, +];
    # agreeing: b 6/3, a -2/1, b -7.5/3, none; lambda .5 halves it
    out = ties(base, [a, b], [1.0, 3.0], density=0.5, lam=0.5)
    assert torch.equal(out, base + 0.5 * torch.tensor([2.0, -2.0, -2.5, 0.0]))


def test_merge_math_keeps_the_dtype_and_leaves_inputs_alone():
    a, b = A.bfloat16(), B.bfloat16()
    out = MergeMethod("linear")([a, b], [0.5, 0.5])
    assert out.dtype == torch.bfloat16 and torch.equal(a, A.bfloat16())


@pytest.mark.parametrize("method, weights, match", [
    ("linear", [0.5, 0.6], "must sum to 1"),
    ("linear", [1.5, -0.5], "must be >= 0"),
    ("nope", [1.0], "unknown merge method"),
])
def test_bad_weights_and_methods_are_named(method, weights, match):
    with pytest.raises(MergeError, match=match):
        MergeMethod(method).check_weights(weights)


# ---- checkpoints ---------------------------------------------------------------------------------------------

@pytest.fixture
def three(tmp_path):
    """Three tiny models sharing a tokenizer, with a tied embedding, saved in several shards each."""
    tokenizer = tiny_tokenizer()
    config = TINY.replace(vocab_size=tokenizer.vocab_size, tie_embeddings=True)
    folders = []
    for seed in range(3):
        folder = tmp_path / f"m{seed}"
        save_pretrained(build_model(config, seed=seed), folder, max_shard_bytes=20_000)
        tokenizer.save(folder)
        folders.append(folder)
    return folders


def test_a_streamed_merge_equals_the_hand_computed_tensors_and_reads_each_once(tmp_path, three, monkeypatch):
    reads = []
    real_get = TensorReader.get
    monkeypatch.setattr(TensorReader, "get", lambda self, name: reads.append((self.folder, name)) or real_get(self, name))
    weights = [0.5, 0.3, 0.2]
    out = merge_checkpoints(three, weights, MergeMethod("linear"), tmp_path / "merged", max_shard_bytes=20_000,
                            progress=False)
    assert len(reads) == len(set(reads))  # no tensor of any input is read twice
    models = [load_pretrained(f) for f in three]
    merged = load_pretrained(out)
    for name, tensor in merged.state_dict().items():
        expected = sum(w * m.state_dict()[name] for w, m in zip(weights, models))
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6, msg=name)
    assert merged.lm_head.weight is merged.embed_tokens.weight  # the tied table merged once, still tied
    assert "lm_head.weight" not in TensorReader(out, merged.config.family).keys()
    record = json.loads((out / MERGE_FILE).read_text())
    assert [m["weight"] for m in record["models"]] == weights and record["method"]["name"] == "linear"
    assert len(record["models"][0]["weights_sha256"]) > 1  # every shard hashed
    assert (out / "tokenizer.json").exists()


def test_in_memory_merges_equal_the_streamed_one(tmp_path, three):
    out = merge_checkpoints(three[1:], [0.5, 0.5], MergeMethod("task_arithmetic"), tmp_path / "ta", base=three[0],
                            progress=False)
    _, states = load_states(three)
    in_memory = merge_states(states[1:], [0.5, 0.5], MergeMethod("task_arithmetic"), base=states[0])
    for name, tensor in load_pretrained(out).state_dict().items():
        if name != "lm_head.weight":
            torch.testing.assert_close(tensor, in_memory[name], rtol=0, atol=0, msg=name)


def test_unmergeable_inputs_are_refused_by_name(tmp_path, three):
    other = tmp_path / "other"
    config = load_pretrained(three[0]).config
    save_pretrained(build_model(config.replace(ffn_dim=96), seed=0), other)
    with pytest.raises(MergeError, match=f"another model config.*ffn_dim: {config.ffn_dim} vs 96"):
        merge_checkpoints([three[0], other], [0.5, 0.5], MergeMethod("linear"), tmp_path / "x", progress=False)
    Tokenizer.train_bpe([t.upper() for t in make_texts(200)], 300, show_progress=False).save(three[1])
    with pytest.raises(MergeError, match="different tokenizers"):
        merge_checkpoints(three[:2], [0.5, 0.5], MergeMethod("linear"), tmp_path / "x", progress=False)
    assert cli(["quantize", str(three[2]), "--scheme", "cpu", "--out", str(tmp_path / "int4")]) == 0
    with pytest.raises(MergeError, match="is quantized"):
        merge_checkpoints([three[0], tmp_path / "int4"], [0.5, 0.5], MergeMethod("linear"), tmp_path / "x",
                          progress=False)
    with pytest.raises(MergeError, match="give the base model"):
        merge_checkpoints(three[:1], [1.0], MergeMethod("ties"), tmp_path / "x", progress=False)
    with pytest.raises(MergeError, match="2 models but 3 weights"):
        merge_checkpoints(three[:2], [0.2, 0.3, 0.5], MergeMethod("linear"), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_merge_command_and_the_merged_checkpoint_generates(tmp_path, three, capsys):
    assert cli(["merge", *map(str, three), "--weights", "0.2", "0.3", "0.5", "--out", str(tmp_path / "m")]) == 0
    assert cli(["generate", str(tmp_path / "m"), "--prompt", "doc 1", "--max-new-tokens", "4"]) == 0
    assert cli(["merge", str(three[0]), "--weights", "0.7", "--out", str(tmp_path / "bad")]) == 2
    assert "must sum to 1" in capsys.readouterr().err


def test_a_mergekit_config_runs_as_mergekit_means_it(tmp_path, three):
    config = tmp_path / "merge.yml"
    config.write_text(f"""
merge_method: linear
models:
  - model: {three[0]}
    parameters: {{weight: 1.0}}
  - model: {three[1]}
    parameters: {{weight: 3.0}}
dtype: float32
""")
    plan = read_mergekit_config(config)
    assert plan.method.name == "linear" and plan.weights == [0.25, 0.75]  # mergekit normalizes linear weights
    assert cli(["merge", "--config", str(config), "--out", str(tmp_path / "m")]) == 0
    config.write_text("merge_method: slerp\nmodels: []\n")
    with pytest.raises(MergeError, match="slerp"):
        read_mergekit_config(config)


# ---- weight search -------------------------------------------------------------------------------------------

def test_the_simplex_grid_covers_the_simplex():
    grid = simplex_grid(3, 0.25)
    assert len(grid) == 15 and all(abs(sum(w) - 1) < 1e-12 for w in grid) and [0.5, 0.25, 0.25] in grid
    with pytest.raises(MergeError, match="must divide 1"):
        simplex_grid(3, 0.3)


@pytest.mark.parametrize("strategy", ["grid", "cma"])
def test_the_search_finds_the_known_optimum(strategy):
    best = torch.tensor([0.6, 0.3, 0.1])
    result = search_weights(lambda w: float(((torch.tensor(w) - best) ** 2).sum()), 3, strategy=strategy, step=0.1,
                            budget=120)
    weights, score = result.best
    assert score < 1e-3 and torch.allclose(torch.tensor(weights), best, atol=0.03)
    assert all(abs(sum(w) - 1) < 1e-9 and min(w) >= 0 for w, _ in result.trials)  # every trial a valid merge


# ---- specialists and the searched merge, end to end on a tiny model -----------------------------------------

def test_specialize_then_merge_search_end_to_end(tmp_path, capsys):
    from mobilellm.data import Source, tokenize_to_shards
    from tests.data_helpers import write_jsonl

    tokenizer = tiny_tokenizer(tmp_path / "base")
    save_pretrained(build_model(TINY.replace(vocab_size=tokenizer.vocab_size), seed=0), tmp_path / "base")
    docs = {"prose": [Source(write_jsonl(tmp_path / "p.jsonl", make_texts(80, seed=1, min_words=20)))],
            "lists": [Source(write_jsonl(tmp_path / "l.jsonl", make_texts(80, seed=2, max_words=15)))]}
    tokenize_to_shards(docs, tokenizer, tmp_path / "shards", val_fraction=0.3, progress=False)
    common = ["--data", str(tmp_path / "shards"), "--seq-len", "16", "--batch-size", "2"]
    assert cli(["specialize", str(tmp_path / "base"), *common, "--domains", "prose", "lists", "--steps", "3",
                "--lr", "1e-3", "--out", str(tmp_path / "spec")]) == 0
    index = json.loads((tmp_path / "spec" / "specialists.json").read_text())
    assert index["parent"] == str(tmp_path / "base") and set(index["specialists"]) == {"prose", "lists"}
    recipe = json.loads((tmp_path / "spec" / "prose" / "recipe.json").read_text())
    assert recipe["init"] == str(tmp_path / "base") and recipe["domain_weights"] == {"prose": 1.0}  # lineage
    out = tmp_path / "merged"
    assert cli(["merge-search", *index["specialists"].values(), *common, "--step", "0.25", "--val-batches", "2",
                "--out", str(out)]) == 0
    search = json.loads((tmp_path / "merged.search.json").read_text())
    assert len(search["trials"]) == 5 and search["best_weights"] == json.loads((out / MERGE_FILE).read_text())[
        "search"]["best"]["weights"]
    assert (tmp_path / "merged.search.png").read_bytes()[:4] == b"\x89PNG"
    assert set(search["best"]["report_losses"]) == {"prose", "lists", "mean"}
    assert cli(["specialize", str(tmp_path / "shards"), *common, "--domains", "prose", "--out",
                str(tmp_path / "spec")]) == 2  # another parent into the same folder


# ---- against mergekit, where it installs (pip install mergekit; LGPL: a reference, never a dependency) -------

@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_our_merge_equals_mergekits(tmp_path, method):
    import shutil
    import subprocess
    import sys

    pytest.importorskip("mergekit")
    config = TINY.replace(tie_embeddings=False)
    folders = []
    for seed in range(3):
        folder = tmp_path / f"m{seed}"
        save_pretrained(build_model(config, seed=seed), folder)
        folders.append(folder)
    base = f"base_model: {folders[0]}\n" if method != "linear" else ""
    density = ", density: 0.5" if method == "ties" else ""
    yml = tmp_path / "merge.yml"
    yml.write_text(f"merge_method: {method}\n{base}dtype: float32\nmodels:\n" + "".join(
        f"  - model: {f}\n    parameters: {{weight: {w}{density}}}\n" for f, w in zip(folders[1:], (0.7, 0.3))))
    cli_path = shutil.which("mergekit-yaml", path=str(Path(sys.executable).parent)) or shutil.which("mergekit-yaml")
    done = subprocess.run([cli_path, str(yml), str(tmp_path / "theirs")], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert cli(["merge", "--config", str(yml), "--out", str(tmp_path / "ours")]) == 0
    ours, theirs = TensorReader(tmp_path / "ours", config.family), TensorReader(tmp_path / "theirs", config.family)
    assert set(ours.keys()) == set(theirs.keys())
    for name in ours.keys():
        torch.testing.assert_close(ours.get(name), theirs.get(name), rtol=0, atol=1e-6, msg=name)


def test_large_tensors_merge_in_row_blocks_to_the_same_result(three):
    from mobilellm.merge.checkpoints import merge_tensor

    readers = [TensorReader(f, TINY.family) for f in three]
    for method in (MergeMethod("linear"), MergeMethod("task_arithmetic"), MergeMethod("ties", density=0.3)):
        for name in ("embed_tokens.weight", "layers.0.mlp.up_proj.weight", "norm.weight"):
            whole = merge_tensor(name, readers[1:], readers[0], [0.6, 0.4], method, chunk_elements=1 << 30)
            blocks = merge_tensor(name, readers[1:], readers[0], [0.6, 0.4], method, chunk_elements=100)
            assert torch.equal(whole, blocks), (method.name, name)
