"""The shared-prefix scorer equals the plain full forward; tokenization and metrics follow lm-eval."""

import math

import pytest
import torch

from mobilellm.eval import metrics
from mobilellm.eval.lm import EvalLM
from mobilellm.eval.loglik import TokenRequest, loglikelihood_tokens, plan_batches, truncate
from tests.eval_helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return EvalLM.load(tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt"), progress=False)


def full_forward_score(model, context, continuation):
    tokens = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = model(tokens[:, :-1]).float().log_softmax(-1)[0, len(context) - 1:]  # (n_cont, V)
    target = torch.tensor(continuation)
    return logprobs.gather(-1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


def test_shared_prefix_scores_equal_full_forward(lm):
    gen = torch.Generator().manual_seed(0)
    rand = lambda n: tuple(torch.randint(3, lm.model.config.vocab_size, (n,), generator=gen).tolist())
    long_context, short_context = rand(40), rand(5)  # 40 > the sliding window (8) of the tiny model
    requests = [TokenRequest(long_context, rand(n)) for n in (1, 3, 12)]
    requests += [TokenRequest(short_context, rand(n)) for n in (2, 7)]
    requests += [TokenRequest(rand(1), rand(4)), TokenRequest(rand(1), rand(1)), TokenRequest(rand(23), rand(6))]
    # A greedy continuation, so that is_greedy is exercised both ways.
    with torch.no_grad():
        next_token = int(lm.model(torch.tensor([short_context]))[0, -1].argmax())
    requests.append(TokenRequest(short_context, (next_token,)))
    for batch_tokens in (64, 100_000):  # many small batches, and everything in one
        got = loglikelihood_tokens(lm.model, requests, max_len=lm.max_len, batch_tokens=batch_tokens)
        for r, (ll, greedy) in zip(requests, got):
            ref_ll, ref_greedy = full_forward_score(lm.model, list(r.context), list(r.continuation))
            assert ll == pytest.approx(ref_ll, abs=1e-4)
            assert greedy == ref_greedy
    assert got[-1][1] is True


def test_each_distinct_context_runs_once():
    requests = [TokenRequest((1, 2, 3), (4,)), TokenRequest((1, 2, 3), (5, 6)), TokenRequest((7, 3), (4,)),
                TokenRequest((1, 2, 9), (4,))]  # same prefix (1, 2) as the first two: one group
    batches = plan_batches(requests, batch_tokens=10_000)
    assert batches == [[[0, 1, 3], [2]]]
    assert sum(len(b) for b in plan_batches(requests, batch_tokens=1)) == 2  # still one group per prefix


def test_truncation_keeps_the_latest_context():
    r = truncate(TokenRequest(tuple(range(10)), (20, 21)), max_len=6)
    assert r.context == (5, 6, 7, 8, 9) and r.continuation == (20, 21)
    with pytest.raises(ValueError, match="does not fit"):
        truncate(TokenRequest((1,), tuple(range(9))), max_len=6)


def test_encode_pair_moves_trailing_spaces_and_splits_the_whole_encoding(lm):
    context, continuation = lm.encode_pair("Question: what is the answer? Answer: ", "yes")
    assert context == lm.tokenizer.encode("Question: what is the answer? Answer:")
    assert context + continuation == lm.tokenizer.encode("Question: what is the answer? Answer: yes")
    assert lm.encode_pair("", "yes") == ([lm.prefix_token_id], lm.tokenizer.encode("yes"))


def test_loglikelihood_of_text_matches_token_scoring(lm):
    (ll, _), = lm.loglikelihood([("Paris is the", " capital of France.")])
    context, continuation = lm.encode_pair("Paris is the", " capital of France.")
    assert ll == pytest.approx(full_forward_score(lm.model, context, continuation)[0], abs=1e-4)


def test_rolling_loglikelihood_with_a_full_window_is_the_full_forward(lm):
    text = "The quick brown fox jumps over the lazy dog. " * 3
    ids = [lm.prefix_token_id, *lm.tokenizer.encode(text)]
    ref, _ = full_forward_score(lm.model, ids[:1], ids[1:])
    ll, n = lm.rolling_loglikelihood(text, window=lm.max_len, stride=lm.max_len)
    assert n == len(ids) - 1 and ll == pytest.approx(ref, abs=1e-3)
    ll_small, n_small = lm.rolling_loglikelihood(text, window=16, stride=5)  # many windows, every token once
    assert n_small == n and ll_small != pytest.approx(ref, abs=1e-3)
    with pytest.raises(ValueError, match="stride"):
        lm.rolling_loglikelihood(text, window=4, stride=8)


def test_acc_norm_divides_by_choice_length():
    # The long choice has the highest total log-likelihood but the lowest per character.
    scores = metrics.multiple_choice([-10.0, -4.0], ["a much longer answer", "no"], gold=[0])
    assert scores == {"acc": 0.0, "acc_norm": 1.0, "choice": 1}


def test_exact_match_normalisation_follows_lm_eval():
    assert metrics.exact_match(" Sunset Boulevard", ["Sunset Blvd", "sunset boulevard"]) == 1.0
    assert metrics.exact_match("Paris!", ["paris"]) == 1.0
    assert metrics.exact_match("Lyon", ["Paris"]) == 0.0
    nq = ("\\b(?:The |the |An |A |The |a |an )",)
    assert metrics.exact_match("the Moon", ["Moon"], regexes_to_ignore=nq) == 1.0
    assert metrics.exact_match("the Moon", ["Moon"]) == 0.0


def test_pass_at_k():
    assert metrics.pass_at_k(1, 1, 1) == 1.0 and metrics.pass_at_k(1, 0, 1) == 0.0
    assert metrics.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert metrics.pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))
