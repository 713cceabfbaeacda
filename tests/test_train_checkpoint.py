"""Checkpoints: a run killed mid-way (SIGKILL, even while saving) resumes to the bit-identical loss sequence."""

import json
import pickle
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mobilellm.artifacts import resolve_checkpoint
from mobilellm.hf import CheckpointError, load_pretrained
from mobilellm.train.checkpoint import latest_checkpoint, step_dirs
from mobilellm.train.loop import train
from mobilellm.train.losses import CrossEntropy
from tests.train_common import one_thread, single_thread, tiny_setup  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 9, 3

# The child trains like `run()` below, and SIGKILLs itself: during step 8 (after the step-6 checkpoint),
# or in the middle of writing the step-6 checkpoint (model files written, optimizer state not yet).
CHILD = """
import os, signal, sys, torch
torch.set_num_threads(1)
from mobilellm.train import checkpoint
from mobilellm.train.loop import train
from mobilellm.train.losses import CrossEntropy
from tests.train_common import tiny_setup

run_dir, mode = sys.argv[1], sys.argv[2]
calls = []

class Dying(CrossEntropy):
    def __call__(self, model, batch):
        calls.append(1)
        if mode == "step" and len(calls) == 8:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(model, batch)

real_write = checkpoint.write_state
def dying_write(folder, name, tree):
    if mode == "save" and "step_0000006" in str(folder) and name == "optimizer":
        os.kill(os.getpid(), signal.SIGKILL)
    return real_write(folder, name, tree)
checkpoint.write_state = dying_write

model, batches, config = tiny_setup(steps=%d, save_every=%d)
train(model, batches, Dying(), config, run_dir)
""" % (STEPS, SAVE_EVERY)


def run(run_dir, resume=False):
    model, batches, config = tiny_setup(steps=STEPS, save_every=SAVE_EVERY)
    return train(model, batches, CrossEntropy(), config, run_dir, resume=resume)


def logged_losses(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    with single_thread():  # as the tests' own runs
        yield run(tmp_path_factory.mktemp("reference"))


@pytest.mark.parametrize("mode,latest_before_resume", [("step", 6), ("save", 3)])
def test_killed_run_resumes_bit_identically(tmp_path, reference, mode, latest_before_resume):
    killed = tmp_path / "killed"
    child = subprocess.run([sys.executable, "-c", CHILD, str(killed), mode], cwd=ROOT, capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert latest_checkpoint(killed).name == f"step_{latest_before_resume:07d}"
    resumed = run(killed, resume=True)
    assert len(resumed.losses) == STEPS - latest_before_resume
    assert logged_losses(killed) == logged_losses(reference.checkpoint.parents[1])  # exact floats, every step
    for a, b in zip(reference.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert not list((killed / "checkpoints").glob(".*"))  # the half-written checkpoint was replaced


def test_keep_last_and_checkpoints_load_as_models(tmp_path):
    model, batches, config = tiny_setup(steps=8, save_every=2, keep_last=2)
    result = train(model, batches, CrossEntropy(), config, tmp_path)
    assert [p.name for p in step_dirs(tmp_path)] == ["step_0000006", "step_0000008"]
    loaded = load_pretrained(result.checkpoint)  # the format the rest of the tool reads
    for (name, a), b in zip(result.model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert resolve_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_0000008"  # a run stands for its latest
    assert resolve_checkpoint(result.checkpoint) == result.checkpoint


def test_resume_of_a_finished_run_does_nothing_more(tmp_path):
    run(tmp_path)
    again = run(tmp_path, resume=True)
    assert again.losses == [] and again.checkpoint.name == f"step_{STEPS:07d}"


# ---- no pickle: a planted file is refused and never run ------------------------------------------------
RESUME_FILES = [f"resume/{name}.{ext}" for name in ("model", "optimizer", "train_state")
                for ext in ("json", "safetensors")]


class Plant:
    """Unpickling it creates `marker`: what a malicious checkpoint file would do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path, marker):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(Plant(marker)))


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A run of 2 steps, checkpointed at each; tests copy it."""
    run_dir = tmp_path_factory.mktemp("two_steps")
    model, batches, config = tiny_setup(steps=2, save_every=1)
    with single_thread():
        train(model, batches, CrossEntropy(), config, run_dir)
    return run_dir


def resume(run_dir, steps=3):
    model, batches, config = tiny_setup(steps=steps, save_every=1)
    return train(model, batches, CrossEntropy(), config, run_dir, resume=True)


def test_the_planted_pickle_runs_when_unpickled(tmp_path):
    plant(tmp_path / "file", tmp_path / "marker")
    pickle.loads((tmp_path / "file").read_bytes())
    assert (tmp_path / "marker").exists()  # so the tests below would see it, had a resume unpickled


@pytest.mark.parametrize("name", RESUME_FILES)
def test_a_resume_file_replaced_by_a_pickle_is_refused_unrun(tmp_path, two_steps, name):
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(two_steps, run_dir)
    plant(latest_checkpoint(run_dir) / name, marker)
    with pytest.raises(CheckpointError, match=re.escape(name)):
        resume(run_dir)
    assert not marker.exists()


def test_pickles_where_the_old_format_kept_its_state_are_never_opened(tmp_path, two_steps):
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(two_steps, run_dir)
    for name in ("train_state.pt", "dcp/.metadata", "dcp/__0_0.distcp"):
        plant(latest_checkpoint(run_dir) / name, marker)
    assert resume(run_dir).step == 3
    assert not marker.exists()


def test_an_old_format_checkpoint_is_refused_unopened(tmp_path, two_steps):
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(two_steps, run_dir)
    old = latest_checkpoint(run_dir)
    shutil.rmtree(old / "resume")
    for name in ("train_state.pt", "dcp/.metadata", "dcp/__0_0.distcp"):
        plant(old / name, marker)
    with pytest.raises(CheckpointError, match="older mobilellm.*not supported"):
        resume(run_dir)
    assert not marker.exists()
