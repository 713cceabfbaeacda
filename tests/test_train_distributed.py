"""The loop under torchrun (2 CPU processes, gloo): FSDP2 and DDP match one process; checkpoints reshard."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mobilellm.model import build_model
from mobilellm.train.loop import TrainConfig, train
from mobilellm.train.losses import CrossEntropy
from mobilellm.train.optim import Schedule
from mobilellm.train.synthetic import SyntheticBatches
from tests.train_common import TINY, one_thread, single_thread  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
TOTAL, BATCH, SEQ = 6, 4, 16
LOSS_RTOL = 1e-5  # summation order differs across processes (reduce-scatter / all-reduce)
WEIGHT_ATOL = 1e-4  # Adam divides by sqrt(v): rounding of near-zero gradients grows into ~1e-5 weight noise

CHILD = """
import sys
from mobilellm.model import build_model
from mobilellm.train.distributed import init_parallel
from mobilellm.train.loop import TrainConfig, train
from mobilellm.train.losses import CrossEntropy
from mobilellm.train.optim import Schedule
from mobilellm.train.synthetic import SyntheticBatches
from tests.test_train_distributed import TINY, TOTAL, BATCH, SEQ

strategy, run_dir, stop, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "resume"
parallel = init_parallel(strategy)
batches = SyntheticBatches(TINY.vocab_size, BATCH, SEQ, rank=parallel.rank, world_size=parallel.world_size)
config = TrainConfig(steps=stop, schedule=Schedule(1e-2, TOTAL, 2), print_every=1000)
train(build_model(TINY, seed=0), batches, CrossEntropy(), config, run_dir, parallel=parallel, resume=resume)
"""


def single(run_dir, stop=TOTAL, resume=False):
    config = TrainConfig(steps=stop, schedule=Schedule(1e-2, TOTAL, 2), print_every=1000)
    return train(build_model(TINY, seed=0), SyntheticBatches(TINY.vocab_size, BATCH, SEQ), CrossEntropy(), config,
                 run_dir, resume=resume)


def torchrun(tmp_path, strategy, run_dir, stop, resume=False):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           strategy, str(run_dir), str(stop), "resume" if resume else "fresh"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def losses(run_dir):
    return [r["loss"] for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())]


def assert_same_weights(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=WEIGHT_ATOL, msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    with single_thread():  # as the tests' own runs
        yield single(tmp_path_factory.mktemp("reference"))


def test_fsdp_on_two_processes_matches_one_and_resumes_on_one(tmp_path, reference):
    run = tmp_path / "fsdp"
    torchrun(tmp_path, "fsdp", run, stop=4)  # 4 of 6 steps on 2 processes, FSDP2-sharded checkpoint
    assert losses(run) == pytest.approx(reference.losses[:4], rel=LOSS_RTOL)
    resumed = single(run, resume=True)  # the sharded checkpoint read back by 1 process
    assert len(resumed.losses) == 2
    assert losses(run) == pytest.approx(reference.losses, rel=LOSS_RTOL)
    assert_same_weights(resumed.model, reference.model)


@pytest.mark.slow
def test_ddp_on_two_processes_resumes_a_single_process_run(tmp_path, reference):
    run = tmp_path / "ddp"
    single(run, stop=3)
    torchrun(tmp_path, "ddp", run, stop=TOTAL, resume=True)  # 1 process -> 2
    assert losses(run) == pytest.approx(reference.losses, rel=LOSS_RTOL)
    from mobilellm.hf import load_pretrained
    from mobilellm.train.checkpoint import latest_checkpoint
    assert_same_weights(load_pretrained(latest_checkpoint(run)), reference.model)
