"""Shared pieces of the training tests: a tiny run on synthetic batches, one thread (the machine is shared)."""

import pytest
import torch

from mobilellm.config import ModelConfig
from mobilellm.model import build_model
from mobilellm.train.loop import TrainConfig
from mobilellm.train.optim import Schedule
from mobilellm.train.synthetic import SyntheticBatches

TINY = ModelConfig.from_name("tiny")


@pytest.fixture(autouse=True)
def one_thread():
    # Bit-identical comparisons across processes need the same reduction order; one thread is also faster
    # than two on a loaded two-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_setup(steps=6, batch=4, seq=16, seed=0, lr=3e-3, **config):
    model = build_model(TINY, seed=seed)
    batches = SyntheticBatches(TINY.vocab_size, batch, seq, seed=seed, n_docs=2)
    config = TrainConfig(steps=steps, schedule=Schedule(lr, steps, warmup_steps=min(2, steps)), print_every=1000, **config)
    return model, batches, config
