"""Speculative decoding: KV-cache rollback, the drafters, greedy output equal to plain decoding, sampling
distributed as plain sampling (chi-square against the target's exact probabilities), and `generate --speculative`."""

import copy
import itertools

import pytest
import torch

from mobilellm.cli import main
from mobilellm.config import ModelConfig
from mobilellm.hf import save_pretrained
from mobilellm.infer import speculative
from mobilellm.infer.cache import KVCache
from mobilellm.infer.drafters import Draft, ModelDrafter, NgramDrafter
from mobilellm.infer.engine import generate, new_cache
from mobilellm.infer.sampling import SamplingConfig
from mobilellm.infer.speculative import Speculation, accept_drafts, generate_speculative
from mobilellm.model import build_model
from mobilellm.tokenizer import Tokenizer

# init_std 0.1: a random model whose greedy text varies a little (at 0.02 it repeats one token), so drafts of
# both drafters are kept and rejected. "tiny" is local/global with an 8-token window: the ring wraps many times.
TINY = ModelConfig.from_name("tiny").replace(init_std=0.1)
PROMPT = [5, 9, 12, 5, 9, 33, 7, 5, 9, 12]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forwards: threads only add spin-waits on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target():
    return build_model(TINY, seed=0).eval()


def perturbed(model, noise: float, seed: int = 1):
    """A draft model that agrees with `model` often but not always: its weights plus Gaussian noise."""
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise)
    return draft


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test of counts (V,) against probabilities (V,); cells expected under 5 are pooled."""
    n = counts.sum()
    expected = probs.double() * n
    small = expected < 5
    obs = torch.cat([counts.double()[~small], counts.double()[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat = ((obs - exp) ** 2 / exp).sum()
    return float(torch.special.gammaincc(torch.tensor((len(exp) - 1) / 2, dtype=torch.double), stat / 2))


# ---- the cache ---------------------------------------------------------------------------------
def feed(cache: KVCache, k: torch.Tensor, v: torch.Tensor) -> None:
    """k, v (1, n_kv, T, hd) written to every layer, as one forward would."""
    positions = cache.positions(k.shape[2])
    for layer in range(len(cache.stores)):
        cache.update(layer, k, v, positions)
    cache.advance(k.shape[2])


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("chunks", [[5], [1, 1, 1, 1, 1], [2, 3]])
def test_rollback_leaves_the_cache_as_if_the_rejected_tokens_never_came(int8, chunks):
    cfg = ModelConfig.from_name("tiny")  # layers: global, sliding (window 8), global, global
    kv = torch.randn(2, 1, cfg.n_kv_heads, 30, cfg.head_dim, generator=torch.Generator().manual_seed(0))
    spec, ref = KVCache(cfg, 40, int8=int8), KVCache(cfg, 40, int8=int8)
    prefix, keep = 19, 2  # the ring has wrapped twice; 2 of the 5 speculative tokens are kept
    feed(spec, kv[0, :, :, :prefix], kv[1, :, :, :prefix])
    spec.mark(sum(chunks))
    at = prefix
    for T in chunks:
        feed(spec, kv[0, :, :, at:at + T], kv[1, :, :, at:at + T])
        at += T
    spec.rollback(prefix + keep)
    feed(ref, kv[0, :, :, :prefix + keep], kv[1, :, :, :prefix + keep])
    assert spec.next_position == ref.next_position == prefix + keep
    ring = spec.stores[1]
    for a, b in zip(ring.tensors(), ref.stores[1].tensors()):
        assert torch.equal(a, b)  # every ring slot holds what it held, the overwritten ones restored
    # what the next token attends is the same, in every layer
    for cache in (spec, ref):
        cache.next_chunk = [cache.update(layer, kv[0, :, :, 25:27], kv[1, :, :, 25:27], cache.positions(2))
                            for layer in range(len(cache.stores))]
    for got, want in zip(spec.next_chunk, ref.next_chunk):
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_rollback_refuses_what_it_cannot_restore():
    cache = KVCache(ModelConfig.from_name("tiny"), 40)
    kv = torch.zeros(1, 2, 12, 16)
    with pytest.raises(ValueError, match="without a mark"):
        cache.rollback(0)
    with pytest.raises(ValueError, match="sliding window"):
        cache.mark(9)  # the ring holds 8: a 9th token would overwrite a slot twice
    feed(cache, kv[:, :, :4], kv[:, :, :4])
    cache.mark(3)
    feed(cache, kv[:, :, :2], kv[:, :, :2])
    with pytest.raises(ValueError, match="positions 4..6"):
        cache.rollback(3)
    feed(cache, kv[:, :, :2], kv[:, :, :2])
    assert not cache.can_rollback(5)
    with pytest.raises(ValueError, match="4 tokens were fed since the mark, which saved 3"):
        cache.rollback(5)


# ---- the drafters ------------------------------------------------------------------------------
def test_ngram_drafter_copies_what_followed_the_latest_match():
    drafter = NgramDrafter(max_ngram=3, min_ngram=1)
    greedy = SamplingConfig()
    assert drafter.propose([1, 2, 3, 4, 9, 2, 3, 4, 7, 8, 2, 3], 2, greedy, None).tokens == [4, 7]  # latest "2 3"
    assert drafter.propose([1, 2, 3, 4, 9, 2, 3, 4, 7, 8, 2, 3, 9], 3, greedy, None).tokens == [2, 3, 4]  # "3 9"
    assert drafter.propose([5, 6], 3, greedy, None).tokens == []  # a new context: nothing matches
    assert drafter.propose([7, 7, 7], 4, greedy, None).tokens == [7, 7, 7, 7]  # a loop continues into the copy
    assert drafter.propose([1, 2, 1, 2, 1], 5, greedy, None).tokens == [2, 1, 2, 1, 2]
    # the index grown token by token answers as one built at once
    context = torch.randint(0, 5, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    grown = NgramDrafter()
    for n in range(1, len(context) + 1):
        assert grown.propose(context[:n], 4, greedy, None).tokens == NgramDrafter().propose(context[:n], 4, greedy,
                                                                                            None).tokens
    with pytest.raises(ValueError):
        NgramDrafter(max_ngram=1, min_ngram=2)


def test_model_drafter_with_the_target_itself_drafts_the_target_greedy_text(target):
    plain = list(generate(target, PROMPT, new_cache(target, 64), max_new_tokens=12))
    drafter = ModelDrafter(target)
    draft = drafter.propose(PROMPT + plain[:1], 6, SamplingConfig(), None)
    assert draft.tokens == plain[1:7] and draft.probs is None
    # a context that keeps only part of what it fed rolls its cache back (then drafts on from there)
    draft = drafter.propose(PROMPT + plain[:3], 4, SamplingConfig(), None)
    assert draft.tokens == plain[3:7] and drafter.cache.next_position == len(PROMPT) + 3 + 3


# ---- greedy: the plain text ---------------------------------------------------------------------
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("penalty", [1.0, 1.5])
@pytest.mark.parametrize("drafter", ["ngram", "model"])
def test_greedy_speculative_decoding_gives_the_plain_tokens(target, drafter, penalty, int8):
    sampling = SamplingConfig(repetition_penalty=penalty)
    plain_cache = new_cache(target, 64, int8=int8)
    plain = list(generate(target, PROMPT, plain_cache, max_new_tokens=40, sampling=sampling))
    spec = Speculation(NgramDrafter() if drafter == "ngram" else ModelDrafter(perturbed(target, 0.005), int8),
                       draft_tokens=5)
    cache = new_cache(target, 64, int8=int8)
    out = list(generate_speculative(target, PROMPT, cache, spec, max_new_tokens=40, sampling=sampling))
    assert out == plain
    assert cache.next_position == plain_cache.next_position  # every token but the last is cached, as plain
    assert spec.rounds and spec.drafted > spec.accepted  # drafts were checked and some rejected (rolled back)


def test_speculative_decoding_stops_where_plain_decoding_stops(target):
    plain = list(generate(target, PROMPT, new_cache(target, 64), max_new_tokens=30))
    stop = plain[7]  # a token the text reaches mid-way
    want = list(generate(target, PROMPT, new_cache(target, 64), max_new_tokens=30, stop_ids=[stop]))
    for drafter in (NgramDrafter(), ModelDrafter(target)):  # the target as its own draft: every draft is kept
        cache = new_cache(target, 64)
        got = list(generate_speculative(target, PROMPT, cache, Speculation(drafter, 6), max_new_tokens=30,
                                        stop_ids=[stop]))
        assert got == want and cache.next_position == len(PROMPT) + len(want) - 1
    for n in (0, 1, 2, 9):
        assert list(generate_speculative(target, PROMPT, new_cache(target, 64), Speculation(ModelDrafter(target), 4),
                                         max_new_tokens=n)) == plain[:n]
    # a cache that fills up ends the text where plain decoding's ends
    small = len(PROMPT) + 13
    want = list(generate(target, PROMPT, new_cache(target, small), max_new_tokens=30))
    assert list(generate_speculative(target, PROMPT, new_cache(target, small), Speculation(ModelDrafter(target), 5),
                                     max_new_tokens=30)) == want


def test_greedy_speculative_decoding_of_an_int4_model_gives_the_plain_tokens():
    from mobilellm.quant import QuantConfig, quantize_

    scheme = QuantConfig.from_scheme("cpu")  # int4 weights, int8 activations and KV
    model = quantize_(build_model(TINY, seed=0).eval(), scheme).fuse_projections()
    plain = list(generate(model, PROMPT, new_cache(model, 64, int8=True), max_new_tokens=40))
    spec = Speculation(NgramDrafter(), 4)
    assert list(generate_speculative(model, PROMPT, new_cache(model, 64, int8=True), spec, max_new_tokens=40)) == plain
    assert spec.accepted


# ---- sampling: the plain distribution -----------------------------------------------------------
def peaky(rows: int, V: int, seed: int) -> torch.Tensor:
    return (torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 2).softmax(-1)


def emitted_frequencies(p: torch.Tensor, q: torch.Tensor | None, trials: int) -> torch.Tensor:
    """Counts (3, V) of the 1st, 2nd, 3rd token one round emits, over `trials` rounds: drafts drawn from q (rows
    (3, V)), or (q None, a deterministic drafter) always each row's likeliest token. Row i of p is the target's
    distribution after the first i drafts, the same whatever the earlier tokens were."""
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(3, p.shape[1])
    target = p.log()  # processed logits whose softmax is p
    drawn = (torch.multinomial(q, trials, replacement=True, generator=gen).T.tolist() if q is not None
             else [p[:3].argmax(-1).tolist()] * trials)
    for tokens in drawn:
        kept, after = accept_drafts(target, Draft(tokens, q), SamplingConfig(temperature=1.0), gen)
        for i, token in enumerate((tokens[:kept] + [after])[:3]):
            counts[i, token] += 1
    return counts


@pytest.mark.parametrize("deterministic", [False, True])
def test_speculative_sampling_emits_each_token_from_the_target_distribution(deterministic, monkeypatch):
    V, trials = 6, 4000
    p, q = peaky(4, V, seed=1), None if deterministic else peaky(3, V, seed=2)
    counts = emitted_frequencies(p, q, trials)
    for i in range(3):  # the i-th token (emitted only after i drafts were kept) is distributed as p[i]
        assert chi2_pvalue(counts[i], p[i]) > 1e-3, (i, counts[i] / counts[i].sum(), p[i])
    # The test has the power to see a wrong rule: resampling a rejected draft from p instead of the residual.
    monkeypatch.setattr(speculative, "residual_distribution", lambda p, q: p)
    broken = emitted_frequencies(p, q, trials)
    assert chi2_pvalue(broken[0], p[0]) < 1e-6


def exact_first_tokens(model, prompt: list[int], temperature: float) -> list[torch.Tensor]:
    """The target's own probabilities of the 1st, 2nd and 3rd sampled token (marginals), by enumeration."""
    V = model.config.vocab_size
    with torch.no_grad():
        p1 = (model(torch.tensor([prompt]))[0, -1] / temperature).softmax(-1)
        p2 = (model(torch.tensor([prompt + [a] for a in range(V)]))[:, -1] / temperature).softmax(-1)
        p3 = (model(torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)]))[:, -1]
              / temperature).softmax(-1).view(V, V, V)
    joint = p1[:, None, None] * p2[:, :, None] * p3
    return [joint.sum((1, 2)), joint.sum((0, 2)), joint.sum((0, 1))]


def test_speculative_sampling_end_to_end_matches_the_target_probabilities():
    """Whole generations (prefill, drafts, one verify forward, rollback) of a model with an 8-token vocabulary:
    the 2nd and 3rd tokens (the 1st comes from prefill) against the target's exact marginals."""
    cfg = TINY.replace(vocab_size=8, n_layers=2, layer_types=("sliding_attention", "full_attention"),
                       sliding_window=4, init_std=0.3)  # peaked distributions, a draft model far from the target
    model = build_model(cfg, seed=0).eval()
    prompt, runs = [3, 4, 5, 3, 4], 300
    exact = exact_first_tokens(model, prompt, temperature=1.0)
    for drafter in (NgramDrafter(), ModelDrafter(build_model(cfg, seed=1).eval())):
        spec, counts = Speculation(drafter, 2), torch.zeros(3, 8)
        for seed in range(runs):
            stream = generate_speculative(model, prompt, new_cache(model, 16), spec, max_new_tokens=4,
                                          sampling=SamplingConfig(temperature=1.0, seed=seed))
            for i, token in enumerate(itertools.islice(stream, 3)):
                counts[i, token] += 1
        assert spec.accepted and spec.drafted > spec.accepted
        for i in (1, 2):
            assert chi2_pvalue(counts[i], exact[i]) > 1e-3, (type(drafter).__name__, i, counts[i], exact[i] * runs)


# ---- the command -------------------------------------------------------------------------------
TEXT = ["the cat sat on the mat. the dog ate the bone. hello world, hello there!"] * 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny target and a draft near it (its weights perturbed), sharing one tokenizer, as checkpoints."""
    root = tmp_path_factory.mktemp("spec")
    tokenizer = Tokenizer.train_bpe(TEXT, vocab_size=300, show_progress=False)
    model = build_model(TINY.replace(vocab_size=320), seed=0)
    for name, m in (("tiny", model), ("draft", perturbed(model, 0.005))):
        save_pretrained(m, root / name)
        tokenizer.save(root / name)
    return root / "tiny", root / "draft"


def test_generate_command_speculative_prints_the_plain_text_and_its_acceptance(checkpoint, capsys):
    folder, draft = checkpoint
    args = ["generate", str(folder), "--prompt", "hello world, hello", "--max-new-tokens", "24"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    for spec in ("ngram", str(draft)):
        assert main(args + ["--speculative", spec, "--draft-tokens", "3"]) == 0
        out = capsys.readouterr()
        assert out.out == plain
        assert f"speculative {spec}: decode" in out.err and "acceptance" in out.err


def test_generate_command_refuses_a_draft_that_does_not_share_the_tokenizer(checkpoint, tmp_path, capsys):
    folder, _ = checkpoint
    other_tokenizer = Tokenizer.train_bpe(["a completely different text, with other words in it"] * 20,
                                          vocab_size=300, show_progress=False)
    wider = Tokenizer.load(folder)
    for name, vocab, tokenizer in (("other", 320, other_tokenizer), ("wider", 384, wider)):
        save_pretrained(build_model(TINY.replace(vocab_size=vocab), seed=0), tmp_path / name)
        tokenizer.save(tmp_path / name)
    run = ["generate", str(folder), "--prompt", "hello", "--speculative"]
    assert main(run + [str(tmp_path / "other")]) == 2
    assert "must share the target's tokenizer" in capsys.readouterr().err
    assert main(run + [str(tmp_path / "wider")]) == 2
    assert "vocabulary has 384 entries, the target's 320" in capsys.readouterr().err
    assert main(run + ["ngram", "--draft-tokens", "0"]) == 2
    assert "draft_tokens must be >= 1" in capsys.readouterr().err


# ---- int8 caches: verification is a decode step, bit for bit ------------------------------------
def test_int8_verification_logits_are_the_decode_steps_logits_exactly():
    """The cpu scheme (int4 weights, int8 activations and KV), local/global through the ring's wrap: a forward
    over 9 tokens gives each token the logits one-token decode steps give, to the bit."""
    from mobilellm.quant import QuantConfig, quantize_

    model = quantize_(build_model(TINY, seed=0).eval(), QuantConfig.from_scheme("cpu")).fuse_projections()
    tokens = torch.randint(0, TINY.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
    steps, chunk = new_cache(model, 40, int8=True), new_cache(model, 40, int8=True)
    for cache in (steps, chunk):
        with torch.no_grad():
            model.hidden_states(tokens[:, :21], cache=cache)
    with torch.no_grad():
        want = torch.cat([model(tokens[:, t:t + 1], cache=steps)[0] for t in range(21, 30)])
    got = speculative.verify_logits(model, tokens[:, 21:30], chunk)
    assert torch.equal(got, want)


@pytest.mark.slow
def test_speculative_smollm2_int4_gives_the_plain_greedy_text(smollm2_dir):
    """The real SmolLM2-135M, cpu scheme: a HumanEval prompt and a summary request, prompt lookup and a draft
    model (the same SmolLM2, weight-only int4 with float KV: a different model that often agrees)."""
    from mobilellm.eval.tasks.humaneval import load_humaneval
    from mobilellm.infer.chat import encode_prompt
    from mobilellm.loading import load
    from mobilellm.quant import QuantConfig, quantize_

    loaded = load(smollm2_dir)
    draft = quantize_(load(smollm2_dir).model.eval(), QuantConfig.from_scheme("accelerator")).fuse_projections()
    model = quantize_(loaded.model.eval(), QuantConfig.from_scheme("cpu")).fuse_projections()
    code = load_humaneval()[2].prompt
    summary = "Summarize in one sentence.\n\n" + code
    for ids in (encode_prompt(loaded.tokenizer, code, chat=False), encode_prompt(loaded.tokenizer, summary, chat=True)):
        plain = list(generate(model, ids, new_cache(model, len(ids) + 48, int8=True), max_new_tokens=48))
        for drafter in (NgramDrafter(), ModelDrafter(draft)):
            spec = Speculation(drafter, 6)
            out = list(generate_speculative(model, ids, new_cache(model, len(ids) + 48, int8=True), spec,
                                            max_new_tokens=48))
            assert out == plain, (type(drafter).__name__, loaded.tokenizer.decode(out), loaded.tokenizer.decode(plain))
            assert spec.accepted and spec.drafted > spec.accepted
