"""The training loop: learning, accumulation, NaN handling, transforms, activation checkpointing, logging."""

import json
import math
import re

import pytest
import torch
from torch import nn

from mobilellm.model import build_model
from mobilellm.train.loop import NonFiniteLossError, TrainConfig, train
from mobilellm.train.losses import CrossEntropy
from mobilellm.train.optim import Schedule
from mobilellm.train.synthetic import SyntheticBatches
from tests.train_common import TINY, one_thread, tiny_setup  # noqa: F401 (autouse fixture)


def test_loss_falls_and_validation_is_logged(tmp_path):
    model, batches, config = tiny_setup(steps=25, lr=2e-2, eval_every=25)
    val = [next(SyntheticBatches(TINY.vocab_size, 4, 16, seed=99))]
    result = train(model, batches, CrossEntropy(), config, tmp_path, val_batches=val)
    assert len(result.losses) == 25
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3 - 0.5
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 26))
    assert [r["val_loss"] for r in records if "val_loss" in r][0] < math.log(TINY.vocab_size)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    # 2 micro-batches of 2 rows = 1 batch of 4 rows, with a padded (ignored) tail in one row so the
    # token-count normalisation matters.
    class Padded(SyntheticBatches):
        def __next__(self):
            batch = super().__next__()
            if self.rank == 0:  # global row 0 only
                batch["targets"][0, -5:] = -100
            return batch

    big = Padded(TINY.vocab_size, 4, 16)
    split = [Padded(TINY.vocab_size, 4, 16, rank=r, world_size=2) for r in range(2)]

    class Interleave:  # rows 0-1 then rows 2-3 of each global batch
        def __next__(self):
            return next(split[0]) if split[0].step == split[1].step else next(split[1])

        def state_dict(self):
            return [s.state_dict() for s in split]

    cfg = TrainConfig(steps=3, schedule=Schedule(1e-2, 3), print_every=1000)
    a = train(build_model(TINY, seed=0), big, CrossEntropy(), cfg, tmp_path / "a")
    b = train(build_model(TINY, seed=0), Interleave(), CrossEntropy(), cfg.__class__(**{**cfg.__dict__, "grad_accum": 2}),
              tmp_path / "b")
    assert a.losses == pytest.approx(b.losses, rel=1e-5)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=5e-5)  # Adam magnifies rounding of near-zero grads


def test_a_batch_source_cut_for_another_layout_is_refused(tmp_path):
    model, _, config = tiny_setup(steps=1)
    with pytest.raises(ValueError, match="laid out for world_size=2 but this run has world_size=1"):
        train(model, SyntheticBatches(TINY.vocab_size, 4, 16, world_size=2), CrossEntropy(), config, tmp_path)
    with pytest.raises(ValueError, match="laid out for grad_accum=2 but this run has grad_accum=1"):
        train(model, SyntheticBatches(TINY.vocab_size, 4, 16, grad_accum=2), CrossEntropy(), config, tmp_path)


class NanAt(CrossEntropy):
    """CE, but NaN on the given (0-based) calls."""

    def __init__(self, bad_calls):
        self.bad_calls, self.calls = set(bad_calls), 0

    def __call__(self, model, batch):
        loss = super().__call__(model, batch)
        self.calls += 1
        return loss * float("nan") if self.calls - 1 in self.bad_calls else loss


def test_a_nan_step_is_skipped_and_training_goes_on(tmp_path):
    model, batches, config = tiny_setup(steps=4)
    loss = NanAt({1})
    with pytest.warns(UserWarning, match="step 2: non-finite loss"):
        result = train(model, batches, loss, config, tmp_path)
    assert math.isnan(result.losses[1]) and all(math.isfinite(x) for x in result.losses[::2])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["skipped"] is True and records[1]["loss"] is None


def test_a_skipped_step_leaves_the_weights_alone(tmp_path):
    model, batches, config = tiny_setup(steps=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.warns(UserWarning):
        train(model, batches, NanAt({0}), config, tmp_path)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_too_many_nan_steps_in_a_row_stop_the_run(tmp_path):
    model, batches, config = tiny_setup(steps=10, max_bad_steps=3)
    loss = NanAt(range(100))
    with pytest.warns(UserWarning), pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row"):
        train(model, batches, loss, config, tmp_path)
    assert loss.calls == 3


def test_model_transforms_run_before_the_optimizer(tmp_path):
    class Scaled(nn.Linear):  # a stand-in for a QAT fake-quant linear: a new module with its own parameter
        def __init__(self, linear):
            super().__init__(linear.in_features, linear.out_features, bias=False)
            self.weight = linear.weight
            self.gain = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return super().forward(x) * self.gain

    def swap_up_proj(model):
        model.layers[0].mlp.up_proj = Scaled(model.layers[0].mlp.up_proj)

    model, batches, config = tiny_setup(steps=3)
    result = train(model, batches, CrossEntropy(), config, tmp_path, transforms=[swap_up_proj])
    swapped = result.model.layers[0].mlp.up_proj
    assert isinstance(swapped, Scaled) and swapped.gain.item() != 1.0  # the optimizer saw the new parameter


def plain_and_variant(tmp_path, steps, **variant):
    """The same tiny run twice: plain, and with the given TrainConfig changes."""
    runs = []
    for name, changes in (("plain", {}), ("variant", variant)):
        model, batches, config = tiny_setup(steps=steps, **changes)
        runs.append(train(model, batches, CrossEntropy(), config, tmp_path / name))
    return runs


def test_activation_checkpointing_gives_the_same_training(tmp_path):
    a, b = plain_and_variant(tmp_path, 3, activation_checkpointing=True)
    assert a.losses == pytest.approx(b.losses, rel=1e-6)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)


def test_progress_line_format(tmp_path, capsys):
    model, batches, config = tiny_setup(steps=2)
    train(model, batches, CrossEntropy(), TrainConfig(steps=2, schedule=config.schedule), tmp_path)
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"step 00001/00002 \| loss \d+\.\d{4} \| lr \d\.\de[-+]\d\d \| [\d.]+k? tok/s \| "
                        r"mfu n/a \| eta \d+m\d\ds", lines[0]), lines[0]


def test_mfu_is_reported_against_a_given_peak(tmp_path, capsys):
    from mobilellm.train.metrics import flops_per_token
    model, batches, config = tiny_setup(steps=1)
    train(model, batches, CrossEntropy(), TrainConfig(steps=1, schedule=config.schedule, peak_flops=1e9), tmp_path)
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["mfu"] == pytest.approx(record["tokens_per_s"] * flops_per_token(TINY, 16) / 1e9)
    assert re.search(r"mfu \d+\.\d%", capsys.readouterr().out)


def test_flops_per_token_counts_sliding_layers_by_their_window():
    from mobilellm.config import ModelConfig
    from mobilellm.train.metrics import flops_per_token, matmul_params
    pro = ModelConfig.from_name("pro-1b")
    assert matmul_params(pro) == 1_084_453_120 - 30 * 2 * 1280 - 1280  # all but the norms
    attention = 12 * 20 * 64 * (9 * 4096 + 21 * 512)
    assert flops_per_token(pro, 4096) == 6 * matmul_params(pro) + attention


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(tmp_path):
    a, b = plain_and_variant(tmp_path, 2, compile=True)
    assert a.losses == pytest.approx(b.losses, rel=1e-4)
    assert set(a.model.state_dict()) == set(b.model.state_dict())  # no _orig_mod. prefixes
