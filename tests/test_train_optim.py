"""LR schedules (warmup, cosine, linear, WSD) and the AdamW settings."""

import math

import pytest

from mobilellm.model import build_model
from mobilellm.train.optim import OptimConfig, Schedule, build_optimizer
from tests.train_common import TINY


def test_warmup_is_linear_and_reaches_the_peak():
    s = Schedule(peak_lr=1e-3, total_steps=100, warmup_steps=10)
    assert [s.lr_at(i) for i in range(3)] == pytest.approx([1e-4, 2e-4, 3e-4])
    assert s.lr_at(9) == pytest.approx(1e-3)


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_decay_ends_at_the_final_lr(decay):
    s = Schedule(peak_lr=1e-3, total_steps=110, warmup_steps=10, decay=decay, final_lr=1e-5)
    assert s.lr_at(109) == pytest.approx(1e-5)
    halfway = s.lr_at(59)  # half of the 100 decay steps done
    assert halfway == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)  # cosine and linear agree at the midpoint
    lrs = [s.lr_at(i) for i in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    quarter = s.lr_at(34)
    expected = 0.5 * (1 + math.cos(math.pi * 0.25)) if decay == "cosine" else 0.75
    assert quarter == pytest.approx(1e-5 + (1e-3 - 1e-5) * expected)


def test_wsd_holds_the_peak_then_decays_linearly():
    s = Schedule(peak_lr=1e-3, total_steps=110, warmup_steps=10, decay="wsd", decay_fraction=0.2)
    assert all(s.lr_at(i) == pytest.approx(1e-3) for i in range(9, 90))  # stable phase: 80 of the 100 steps
    assert s.lr_at(99) == pytest.approx(0.5e-3)
    assert s.lr_at(109) == pytest.approx(0.0)


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="unknown LR decay"):
        Schedule(1e-3, 10, decay="exp")
    with pytest.raises(ValueError, match="warmup_steps"):
        Schedule(1e-3, 10, warmup_steps=20)


def test_adamw_uses_the_family_settings():
    optimizer = build_optimizer(build_model(TINY), OptimConfig(), lr=4e-4)
    decayed, plain = optimizer.param_groups
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-8
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert len(decayed["params"]) == TINY.n_layers * 7  # q k v o gate up down
