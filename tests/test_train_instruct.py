"""SFT and DPO end to end on a tiny model: the commands, their reports and metrics, a run killed mid-way resuming
bit-identically, cached and frozen references training alike, bad inputs refused in one line, and instruction
and preference data built from BIG-bench tasks."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mobilellm.cli import main as cli
from mobilellm.data.instructions import build_instructions
from mobilellm.errors import DataError
from mobilellm.hf import save_pretrained
from mobilellm.loading import load
from mobilellm.model import build_model
from mobilellm.train.objectives import CE
from mobilellm.train.recipe import run_recipe
from recipes.dpo import dpo
from recipes.sft import sft
from tests.data_helpers import WORDS, tiny_tokenizer
from tests.train_common import TINY, one_thread  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]


def words(rng, k):
    return " ".join(rng.choice(WORDS, size=int(rng.integers(2, k))))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny checkpoint with a ChatML tokenizer, a teacher, conversations (train, val) and preference pairs."""
    root = tmp_path_factory.mktemp("instruct")
    tokenizer = tiny_tokenizer(root / "ckpt")
    config = TINY.replace(vocab_size=tokenizer.vocab_size)
    for name, seed in (("ckpt", 3), ("teacher", 4)):
        save_pretrained(build_model(config, seed=seed), root / name)
        tokenizer.save(root / name)
    rng = np.random.default_rng(0)
    chats = [{"messages": [{"role": "user", "content": words(rng, 10)}, {"role": "assistant", "content": words(rng, 14)}]}
             if i % 2 else {"prompt": words(rng, 8), "completion": words(rng, 10)} for i in range(40)]
    pairs = [{"prompt": words(rng, 8), "chosen": "the " + words(rng, 6), "rejected": "of " + words(rng, 6)}
             for _ in range(40)]
    for name, records in (("chat.jsonl", chats[:32]), ("val.jsonl", chats[32:]), ("pairs.jsonl", pairs)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in metrics(run_dir) if "loss" in r]


def test_sft_command_learns_assistant_tokens_and_writes_a_loadable_checkpoint(files, tmp_path, capsys):
    run = tmp_path / "sft"
    assert cli(["sft", str(files / "ckpt"), "--data", str(files / "chat.jsonl"), "--val", str(files / "val.jsonl"),
                "--out", str(run), "--steps", "4", "--batch-size", "2", "--seq-len", "96", "--lr", "3e-3",
                "--eval-every", "2"]) == 0
    out = capsys.readouterr().out
    assert "data: examples 32, truncated 0" in out and "checkpoint:" in out
    report = json.loads((run / "data.json").read_text())
    assert report["trained_examples"] == 32 and report["rows_per_epoch"] < 32  # packed
    recipe = json.loads((run / "recipe.json").read_text())
    assert recipe["objective"]["kind"] == "CE" and recipe["data"]["kind"] == "ChatData"
    steps = losses(run)
    assert [s for s, _ in steps] == [1, 2, 3, 4] and steps[-1][1] < steps[0][1]
    assert [r["step"] for r in metrics(run) if "val_loss" in r] == [2, 4]
    loaded = load(run / "checkpoints" / "step_0000004")
    assert loaded.tokenizer is not None and loaded.tokenizer.chat_template


def test_sft_with_a_teacher_distills_on_the_same_tokens(files, tmp_path):
    run = tmp_path / "kd"
    assert cli(["sft", str(files / "ckpt"), "--data", str(files / "chat.jsonl"), "--out", str(run), "--steps", "2",
                "--batch-size", "2", "--seq-len", "96", "--teacher", str(files / "teacher"), "--ce-weight", "0.5"]) == 0
    objective = json.loads((run / "recipe.json").read_text())["objective"]
    assert objective["kind"] == "KD" and objective["ce_weight"] == 0.5
    assert all(math.isfinite(loss) for _, loss in losses(run))


def dpo_args(files, run, *extra):
    return ["dpo", str(files / "ckpt"), "--data", str(files / "pairs.jsonl"), "--out", str(run), "--steps", "3",
            "--batch-size", "2", "--seq-len", "128", "--lr", "1e-3", "--beta", "0.5", *extra]


def test_dpo_command_logs_rewards_and_cached_references_train_like_a_frozen_one(files, tmp_path, capsys):
    assert cli(dpo_args(files, tmp_path / "cached", "--precompute-reference")) == 0
    assert "reward_accuracy" in capsys.readouterr().out
    assert (tmp_path / "cached" / "reference_logps" / "reference.safetensors").exists()
    assert cli(dpo_args(files, tmp_path / "frozen")) == 0
    cached, frozen = losses(tmp_path / "cached"), losses(tmp_path / "frozen")
    assert cached[0][1] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as its reference
    assert [loss for _, loss in cached] == pytest.approx([loss for _, loss in frozen], rel=1e-5)
    records = [r for r in metrics(tmp_path / "cached") if "loss" in r]
    assert records[0]["reward_margin"] == pytest.approx(0, abs=1e-5)
    assert records[-1]["reward_margin"] > 0 and 0 <= records[-1]["reward_accuracy"] <= 1


# ---- kill and resume ----------------------------------------------------------------------------------------

CHILD = """
import os, signal, sys, torch
torch.set_num_threads(1)
from mobilellm.train.distributed import init_parallel
from mobilellm.train.hooks import StepHook
from mobilellm.train.recipe import run_recipe
from tests.test_train_instruct import stage

kind, root, run_dir, kill_at, strategy = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]

class Kill(StepHook):
    def begin(self, state):
        if state.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

run_recipe(stage(kind, root), run_dir, hooks=(Kill(),), parallel=init_parallel(None if strategy == "none" else strategy))
"""


def run_child(tmp_path, kind, root, run_dir, kill_at=-1, strategy="none", processes=1):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
              if processes > 1 else [sys.executable])
    return subprocess.run([*launch, str(script), kind, str(root), str(run_dir), str(kill_at), strategy], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def stage(kind: str, root) -> object:
    """A 4-step SFT or DPO (cached reference) recipe, a checkpoint every 2 steps."""
    root = Path(root)
    if kind == "sft":
        recipe = sft(str(root / "ckpt"), str(root / "chat.jsonl"), steps=4, batch_rows=2, seq_len=96, lr=3e-3)
    else:
        recipe = dpo(str(root / "ckpt"), str(root / "pairs.jsonl"), steps=4, batch_rows=2, seq_len=128, lr=1e-3,
                     beta=0.5, precompute_reference=True)
    return recipe.replace_train(save_every=2, keep_last=1)


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_a_run_killed_mid_way_resumes_bit_identically(files, tmp_path, kind):
    whole = run_recipe(stage(kind, files), tmp_path / "whole")
    killed = run_child(tmp_path, kind, files, tmp_path / "run", kill_at=2)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert losses(tmp_path / "run") == losses(tmp_path / "whole")[:2]
    resumed = run_recipe(stage(kind, files), tmp_path / "run", resume=True)
    assert len(resumed.losses) == 2
    assert metrics_without_time(tmp_path / "run") == metrics_without_time(tmp_path / "whole")  # exact floats
    for (name, a), b in zip(resumed.model.state_dict().items(), whole.model.state_dict().values()):
        assert torch.equal(a, b), name


def metrics_without_time(run_dir):
    return [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")} for r in metrics(run_dir)]


def test_dpo_on_two_processes_matches_one(files, tmp_path):
    """Two FSDP processes split every global batch of packed pairs; the reference cache is computed once, by rank 0."""
    one = run_recipe(stage("dpo", files), tmp_path / "one")
    done = run_child(tmp_path, "dpo", files, tmp_path / "two", strategy="fsdp", processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    two = [r for r in metrics(tmp_path / "two") if "loss" in r]
    assert [r["loss"] for r in two] == pytest.approx(one.losses, rel=1e-5)  # another summation order
    ours = [r for r in metrics(tmp_path / "one") if "loss" in r]
    assert [r["reward_margin"] for r in two] == pytest.approx([r["reward_margin"] for r in ours], rel=1e-4, abs=1e-6)


# ---- refusals -----------------------------------------------------------------------------------------------

def test_bad_data_is_refused_in_one_line_naming_the_file_and_line(files, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}) + "\n")
    args = ["--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2", "--seq-len", "64"]
    assert cli(["sft", str(files / "ckpt"), "--data", str(bad), *args]) == 2
    assert f"error: {bad}:1: messages message 2 has unknown role 'bot'" in capsys.readouterr().err
    assert cli(["dpo", str(files / "ckpt"), "--data", str(files / "chat.jsonl"), *args]) == 2
    assert f"{files / 'chat.jsonl'}:1: a preference pair needs 'prompt', 'chosen' and 'rejected'" in capsys.readouterr().err
    assert cli(["sft", str(files / "ckpt"), "--data", str(files / "chat.jsonl"), "--eval-every", "2", *args]) == 2
    assert "give --val" in capsys.readouterr().err


def test_a_recipe_pairs_its_data_with_an_objective_that_reads_it(files, tmp_path):
    recipe = dpo(str(files / "ckpt"), str(files / "pairs.jsonl"), steps=1, batch_rows=2).replace(objective=CE())
    with pytest.raises(ValueError, match="objective CE reads sequences but its data .PreferenceData. gives pairs"):
        run_recipe(recipe, tmp_path / "run")
    with pytest.raises(ValueError, match="keep document_masking on, or turn packing off"):
        run_recipe(stage("sft", files).replace_train(document_masking=False), tmp_path / "run")
    with pytest.raises(ValueError, match="names both token shards and another batch source"):
        run_recipe(stage("sft", files).replace(shards="somewhere"), tmp_path / "run")


# ---- instruction and preference data from BIG-bench ---------------------------------------------------------

def write_task(root, name, task):
    (root / name).mkdir(parents=True)
    (root / name / "task.json").write_text(json.dumps(task))


def test_instructions_and_pairs_from_bigbench_tasks(tmp_path):
    write_task(tmp_path, "capitals", {"description": "Name the capital", "example_input_prefix": "\nQ: ",
                                      "examples": [{"input": f"Country {i}?", "target": [f"City {i}", "x"]}
                                                   for i in range(10)]})
    write_task(tmp_path, "pick", {"task_prefix": "Pick the odd one.", "examples": [
        {"input": "a b c", "target_scores": {"a": 0, "b": 1, "c": 0}},
        {"input": "a b c", "target_scores": {"a": 0, "b": 1, "c": 0}},  # a duplicate, dropped
        {"input": "d e", "target_scores": {"d": 1, "e": 1}}]})  # no single answer: neither
    data = build_instructions(["capitals", "pick"], max_per_task=None, val_fraction=0.0, root=tmp_path)
    assert data.counts == {"capitals": {"instructions": 10, "pairs": 0}, "pick": {"instructions": 1, "pairs": 1}}
    assert data.train[0] == {"prompt": "Name the capital\n\nQ: Country 0?", "completion": "City 0"}
    assert data.pairs == [{"prompt": "Pick the odd one.\n\na b c\n\nOptions:\n- a\n- b\n- c", "chosen": "b",
                           "rejected": data.pairs[0]["rejected"]}] and data.pairs[0]["rejected"] in ("a", "c")
    split = build_instructions(["capitals"], max_per_task=6, val_fraction=0.5, seed=1, root=tmp_path)
    assert len(split.train) + len(split.val) == 6 and split.val
    picks = build_instructions(["pick"], max_per_task=None, val_fraction=0.99, seed=0, root=tmp_path)
    assert not picks.pairs and [p["chosen"] for p in picks.val_pairs] == ["b"]  # a held-out item's pair is held out
    with pytest.raises(DataError, match="social_iqa are scored by `mobilellm eval`"):
        build_instructions(["capitals", "social_iqa"], root=tmp_path)


def test_sft_data_command_on_the_real_bigbench_when_fetched(tmp_path, capsys):
    from mobilellm.eval.tasks.bigbench import bigbench_dir

    if not all((bigbench_dir() / name / "task.json").exists() for name in ("navigate", "word_sorting")):
        pytest.skip("BIG-bench tasks not extracted yet (`mobilellm sft-data` fetches them)")
    assert cli(["sft-data", "--out", str(tmp_path), "--tasks", "navigate", "word_sorting", "--max-per-task", "50"]) == 0
    train = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (tmp_path / "dpo.jsonl").read_text().splitlines()]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["tasks"]["navigate"]["instructions"] == 50 and manifest["tasks"]["word_sorting"]["pairs"] == 0
    assert len(train) + len((tmp_path / "sft_val.jsonl").read_text().splitlines()) == 100
    assert len(pairs) + len((tmp_path / "dpo_val.jsonl").read_text().splitlines()) == 50
    assert all(p["chosen"] in ("True", "False") and p["chosen"] != p["rejected"] for p in pairs)
    assert "from 2 BIG-bench tasks" in capsys.readouterr().out
