"""The loop under torchrun (2 CPU processes, gloo): FSDP2 and DDP match one process; checkpoints reshard,
the data loader's position included."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mobilellm.data import MixtureLoader, Source, TokenDataset, tokenize_to_shards
from mobilellm.model import build_model
from mobilellm.train.loop import TrainConfig, train
from mobilellm.train.losses import CrossEntropy
from mobilellm.train.optim import Schedule
from mobilellm.train.synthetic import SyntheticBatches
from tests.data_helpers import make_texts, tiny_tokenizer, write_jsonl
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


def torchrun(tmp_path, strategy, run_dir, stop, resume=False, child=CHILD, extra=()):
    script = tmp_path / "child.py"
    script.write_text(child)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           strategy, str(run_dir), str(stop), "resume" if resume else "fresh", *map(str, extra)]
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


# fsdp: rank 0 reads the full checkpoint and broadcasts it, each process keeping its shard
@pytest.mark.parametrize("strategy", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp"])
def test_two_processes_resume_a_single_process_run(tmp_path, reference, strategy):
    run = tmp_path / strategy
    single(run, stop=3)
    torchrun(tmp_path, strategy, run, stop=TOTAL, resume=True)  # 1 process -> 2
    assert losses(run) == pytest.approx(reference.losses, rel=LOSS_RTOL)
    from mobilellm.hf import load_pretrained
    from mobilellm.train.checkpoint import latest_checkpoint
    assert_same_weights(load_pretrained(latest_checkpoint(run)), reference.model)


# ---- token shards through MixtureLoader: one global batch of 4 windows, split by processes and micro-batches --
MIXTURE_CHILD = """
import sys
from mobilellm.train.distributed import init_parallel
from tests.test_train_distributed import mixture_run

strategy, run_dir, stop, resume, shards = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "resume", sys.argv[5]
mixture_run(shards, run_dir, stop, grad_accum=1, parallel=init_parallel(strategy), resume=resume)
"""


def mixture_run(shards, run_dir, stop, grad_accum, parallel=None, resume=False):
    from mobilellm.train.distributed import SingleProcess
    parallel = parallel or SingleProcess()
    dataset = TokenDataset(shards)
    loader = MixtureLoader(dataset, {"prose": 1, "lists": 1}, seq_len=2 * SEQ, global_batch_size=BATCH,
                           grad_accum=grad_accum, seed=3, rank=parallel.rank, world_size=parallel.world_size)
    config = TrainConfig(steps=stop, schedule=Schedule(1e-2, TOTAL, 2), grad_accum=grad_accum, print_every=1000)
    model = build_model(TINY.replace(vocab_size=dataset.vocab_size), seed=0)
    return train(model, loader, CrossEntropy(), config, run_dir, parallel=parallel, resume=resume)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    domains = {"prose": [Source(write_jsonl(tmp / "prose.jsonl", make_texts(40, seed=1, min_words=20, max_words=120)))],
               "lists": [Source(write_jsonl(tmp / "lists.jsonl", make_texts(80, seed=2, max_words=15)))]}
    tokenize_to_shards(domains, tiny_tokenizer(), tmp / "shards", val_fraction=0.0, progress=False)
    return tmp / "shards"


def test_a_mixture_run_on_two_processes_resumes_on_one_with_the_same_windows(tmp_path, shards):
    """DDP on 2 processes (2 rows each) for 3 steps, then 1 process (2 micro-batches of 2 rows) for 3 more,
    against a single-process run with the same global batch (1 micro-batch of 4 rows)."""
    reference = mixture_run(shards, tmp_path / "reference", TOTAL, grad_accum=1)
    run = tmp_path / "ddp"
    torchrun(tmp_path, "ddp", run, stop=3, child=MIXTURE_CHILD, extra=[shards])
    assert losses(run) == pytest.approx(reference.losses[:3], rel=LOSS_RTOL)
    resumed = mixture_run(shards, run, TOTAL, grad_accum=2, resume=True)
    assert len(resumed.losses) == 3
    assert losses(run) == pytest.approx(reference.losses, rel=LOSS_RTOL)
    assert_same_weights(resumed.model, reference.model)
