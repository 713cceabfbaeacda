"""Preference losses: DPO / IPO / hinge equal a hand computation on naive full logits (value and gradient), the
per-pair mean goes through the loop's count however a step is split, the logged rewards are what they say, packed
pairs score as unpacked ones, and cached reference log-probs equal recomputed ones."""

import copy
import json
import math

import numpy as np
import pytest
import torch

from mobilellm.data.batch_source import BatchLayout
from mobilellm.data.pair_batches import PreferenceData, fit_pair, pairs_in
from mobilellm.data.chat import Rendered
from mobilellm.model import build_model
from mobilellm.train.distributed import SingleProcess
from mobilellm.train.loop import accumulate_gradients
from mobilellm.train.preference import (PreferenceLoss, cached_reference, compute_reference, pair_losses,
                                        sequence_logps)
from tests.data_helpers import WORDS, tiny_tokenizer
from tests.train_common import TINY, one_thread  # noqa: F401 (autouse fixture)


def pair_records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)

    def words(k):
        return " ".join(rng.choice(WORDS, size=int(rng.integers(1, k))))
    return [{"prompt": words(10), "chosen": words(12), "rejected": words(12)} if i % 2 else
            {"prompt": [{"role": "system", "content": "be kind"}, {"role": "user", "content": words(8)}],
             "chosen": [{"role": "assistant", "content": words(6)}], "rejected": words(15)} for i in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    tokenizer = tiny_tokenizer()
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pair_records(16)))
    config = TINY.replace(vocab_size=tokenizer.vocab_size)
    return tokenizer, str(path), build_model(config, seed=0), build_model(config, seed=1).requires_grad_(False)


def pair_batches(setup, rows=2, grad_accum=1, packing=True, seq_len=96):
    tokenizer, path, _, _ = setup
    layout = BatchLayout(seq_len, rows, grad_accum, rows // grad_accum, seed=2)
    return PreferenceData(path, packing=packing).build(layout, tokenizer, tokenizer.vocab_size, None).train


def naive_logps(model, batch):
    """Each sequence's summed log-prob from the full (B, T, V) logits, position by position."""
    logp = model(batch["tokens"], batch["positions"], batch["doc_ids"]).float().log_softmax(-1)
    sums = [0.0] * (2 * int(pairs_in(batch)))
    counts = [0] * len(sums)
    for b, t in (batch["sequence"] >= 0).nonzero().tolist():
        s = int(batch["sequence"][b, t])
        sums[s] = sums[s] + logp[b, t, batch["targets"][b, t]]
        counts[s] += 1
    return torch.stack(sums), torch.tensor(counts, dtype=torch.float32)


def by_hand(kind, policy, reference, counts, beta, eps):
    """The pair losses, written out from the papers' formulas, pair by pair."""
    if kind == "ipo":
        policy, reference = policy / counts, reference / counts
    losses = []
    for j in range(len(policy) // 2):
        h = (policy[2 * j] - reference[2 * j]) - (policy[2 * j + 1] - reference[2 * j + 1])
        if kind == "sigmoid":
            sig = lambda x: 1 / (1 + torch.exp(-x))  # noqa: E731
            losses.append(-(1 - eps) * torch.log(sig(beta * h)) - eps * torch.log(sig(-beta * h)))
        elif kind == "ipo":
            losses.append((h - 1 / (2 * beta)) ** 2)
        else:
            losses.append(torch.clamp(1 - beta * h, min=0))
    return torch.stack(losses).sum()


@pytest.mark.parametrize("kind, beta, eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 2.0, 0.2), ("ipo", 0.5, 0.0),
                                             ("hinge", 5.0, 0.0)])
def test_the_pair_loss_equals_a_hand_computation_in_value_and_gradient(setup, kind, beta, eps):
    _, _, model, reference = setup
    batch = next(pair_batches(setup))
    assert int(pairs_in(batch)) >= 2
    loss = PreferenceLoss(kind, beta, eps, reference=reference, chunk_size=7)  # several chunks of rows
    model.zero_grad()
    value = loss(model, batch)
    value.backward()
    ours = [p.grad.clone() for p in model.parameters()]

    exact = copy.deepcopy(model).double()  # the reference computation in float64
    policy, counts = naive_logps(exact, batch)
    with torch.no_grad():
        ref, _ = naive_logps(copy.deepcopy(reference).double(), batch)
    expected = by_hand(kind, policy, ref, counts.double(), beta, eps)
    expected.backward()
    # fp32 sums of ~100-nat log-probs carry ~1e-5 nat of rounding, times beta.
    assert value.item() == pytest.approx(expected.item(), rel=1e-4)
    for got, want in zip(ours, (p.grad for p in exact.parameters())):
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-4 * want.abs().max().item())
    assert loss.count(batch) == len(policy) // 2


def test_rewards_margin_and_accuracy_are_logged_per_pair(setup):
    _, _, model, reference = setup
    batch = next(pair_batches(setup))
    loss = PreferenceLoss("sigmoid", 0.5, reference=reference)
    loss(model, batch)
    figures = loss.take_metrics()
    with torch.no_grad():
        policy, _ = naive_logps(model, batch)
        ref, _ = naive_logps(reference, batch)
    rewards = 0.5 * (policy - ref)
    chosen, rejected = rewards[0::2], rewards[1::2]
    assert figures["reward_chosen"].item() == pytest.approx(chosen.sum().item(), abs=1e-4)
    assert figures["reward_margin"].item() == pytest.approx((chosen - rejected).sum().item(), abs=1e-4)
    assert figures["reward_accuracy"].item() == (chosen > rejected).sum().item()
    assert loss.take_metrics() == {}  # taken once


def test_the_step_mean_is_per_pair_however_the_step_is_split(setup):
    _, _, model, reference = setup
    loss = PreferenceLoss("sigmoid", 0.1, reference=reference)
    results = []
    for grad_accum in (1, 2):
        batches = pair_batches(setup, rows=4, grad_accum=grad_accum)
        micro = [next(batches) for _ in range(grad_accum)]
        model.zero_grad()
        step_loss, count = accumulate_gradients(micro, lambda b: loss(model, b), loss, SingleProcess(), lambda: torch.enable_grad())
        results.append((step_loss, count, [p.grad.clone() for p in model.parameters()]))
    (loss_1, count_1, grads_1), (loss_2, count_2, grads_2) = results
    assert count_1 == count_2 > 2 and loss_1 == pytest.approx(loss_2, rel=1e-6)
    for a, b in zip(grads_1, grads_2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_packed_pairs_score_as_unpacked_pairs(setup):
    _, _, _, reference = setup
    scores = {}
    for packing in (True, False):
        batches = pair_batches(setup, packing=packing, seq_len=160)
        scores[packing] = compute_reference(reference, batches, torch.device("cpu"))
        rows = sum(1 for _ in batches.every_pair(1))
        assert rows < 16 if packing else rows == 16
    np.testing.assert_allclose(scores[True], scores[False], rtol=1e-5)


def test_cached_reference_logps_equal_recomputed_ones(setup, tmp_path, monkeypatch):
    _, _, model, reference = setup
    batches = pair_batches(setup)
    identity = {"reference": "seed 1"}
    values = cached_reference(reference, batches, tmp_path, SingleProcess(), torch.device("cpu"), identity)
    batches.set_reference(values)
    for _ in range(3):
        batch = next(batches)
        cached = PreferenceLoss(reference=None).reference_logps(batch)
        torch.testing.assert_close(cached, sequence_logps(reference, batch), rtol=1e-5, atol=1e-5)
    # A second run reads the cache; another reference recomputes it.
    import mobilellm.train.preference as preference
    monkeypatch.setattr(preference, "compute_reference", lambda *a: pytest.fail("recomputed"))
    again = cached_reference(reference, batches, tmp_path, SingleProcess(), torch.device("cpu"), identity)
    assert np.array_equal(again, values)
    monkeypatch.setattr(preference, "compute_reference", lambda *a: np.zeros_like(values))
    other = cached_reference(model, batches, tmp_path, SingleProcess(), torch.device("cpu"), {"reference": "other"})
    assert not other.any()


def test_trl_dpo_loss_on_the_same_logps_when_installed():
    trl = pytest.importorskip("trl")  # not a dependency; this runs where it installs
    import inspect
    import types

    policy = torch.tensor([-3.0, -5.0, -4.0, -2.5])
    reference = torch.tensor([-3.5, -4.5, -4.2, -2.0])
    ours = pair_losses("sigmoid", (policy - reference)[0::2] - (policy - reference)[1::2], 0.1)
    trainer = trl.DPOTrainer.__new__(trl.DPOTrainer)  # the loss function alone, on hand-set attributes
    trainer.__dict__.update(beta=0.1, label_smoothing=0.0, loss_type="sigmoid", reference_free=False,
                            f_divergence_type="reverse_kl", use_weighting=False,
                            accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    if not hasattr(trainer, "dpo_loss"):
        pytest.skip(f"trl {trl.__version__} computes the DPO loss inside DPOTrainer._compute_loss (a model forward), "
                    "not as a function of log-probs")
    kwargs = {"loss_type": "sigmoid"} if "loss_type" in inspect.signature(trainer.dpo_loss).parameters else {}
    try:
        theirs = trainer.dpo_loss(policy[0::2], policy[1::2], reference[0::2], reference[1::2], **kwargs)[0]
    except (AttributeError, TypeError) as err:
        pytest.skip(f"this trl's DPOTrainer.dpo_loss needs a fully built trainer: {err}")
    torch.testing.assert_close(ours, theirs)


def test_an_over_long_pair_is_cut_longer_side_first():
    def side(n):
        return Rendered(np.arange(n), np.ones(n, dtype=bool))
    for lengths, want in [((10, 30), (10, 22)), ((30, 10), (22, 10)), ((20, 25), (16, 16)), ((5, 5), (5, 5))]:
        (chosen, rejected), cut = fit_pair((side(lengths[0]), side(lengths[1])), 32, "truncate")
        assert (len(chosen.tokens), len(rejected.tokens)) == want and cut == (sum(lengths) > 32)
    assert fit_pair((side(20), side(20)), 32, "drop") == (None, False)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown preference loss 'kto'"):
        PreferenceLoss("kto")
    with pytest.raises(ValueError, match="beta must be positive"):
        PreferenceLoss("sigmoid", beta=0)
    assert pair_losses("sigmoid", torch.zeros(1), 0.1).item() == pytest.approx(math.log(2))  # policy = reference
