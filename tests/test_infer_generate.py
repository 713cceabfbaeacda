"""Sampling rules, streaming generation, multi-turn chat in the cache, and the generate/chat commands."""

import io
import subprocess
import sys

import pytest
import torch

from mobilellm.cli import main
from mobilellm.config import ModelConfig
from mobilellm.hf import save_pretrained
from mobilellm.infer.chat import ChatSession, generate_text, run_chat, stream_text
from mobilellm.infer.engine import ContextError, decode_one_token, generate, new_cache
from mobilellm.infer.sampling import SamplingConfig, filter_top_p, find_stop, safe_prefix, sample
from mobilellm.model import build_model
from mobilellm.tokenizer import Tokenizer

TEXT = ["the cat sat on the mat. the dog ate the bone. hello world, hello there!"] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_bpe(TEXT, vocab_size=300, show_progress=False)


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig.from_name("tiny").replace(vocab_size=320), seed=0).eval()


def greedy_without_cache(model, ids, n):
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            ids.append(out[-1])
    return out


# ---- sampling ----------------------------------------------------------------------------------
def test_greedy_and_degenerate_sampling_pick_argmax():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(-1)
    assert torch.equal(sample(logits, SamplingConfig()), best)
    assert torch.equal(sample(logits, SamplingConfig(temperature=1.0, top_k=1, seed=0)), best)
    assert torch.equal(sample(logits, SamplingConfig(temperature=1.0, top_p=1e-6, seed=0)), best)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    cfg = SamplingConfig(temperature=1.0, top_k=2)
    gen = torch.Generator().manual_seed(0)
    drawn = {int(sample(logits, cfg, generator=gen)) for _ in range(200)}
    assert drawn == {0, 1}
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, ...: p = 0.8 needs the top two
    kept = torch.isfinite(filter_top_p(logits, 0.8))[0].tolist()
    assert kept == [True, True, False, False, False], probs


def test_seed_makes_sampling_reproducible():
    logits = torch.randn(1, 100)
    cfg = SamplingConfig(temperature=1.0, seed=7)
    a = [int(sample(logits, cfg, generator=g)) for g in [cfg.generator()] for _ in range(20)]
    b = [int(sample(logits, cfg, generator=g)) for g in [cfg.generator()] for _ in range(20)]
    assert a == b and len(set(a)) > 1


def test_repetition_penalty_follows_the_ctrl_rule():
    logits = torch.tensor([[2.0, -2.0, 1.9]])
    history = torch.tensor([[0, 1]])
    # token 0: 2.0 / 2 = 1.0 < 1.9, so greedy now picks token 2
    assert int(sample(logits, SamplingConfig(repetition_penalty=2.0), history)) == 2
    assert int(sample(logits, SamplingConfig(), history)) == 0


def test_bad_sampling_settings_are_rejected():
    for bad in (dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5), dict(repetition_penalty=0)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


def test_stop_strings():
    assert find_stop("hello END there", ["END", "there"]) == 6
    assert find_stop("hello", ["END"]) is None
    assert safe_prefix("hello EN", ["END"]) == 6  # "EN" may become "END": hold it back
    assert safe_prefix("hello \ufffd", []) == 6


# ---- generation --------------------------------------------------------------------------------
@pytest.mark.parametrize("int8", [False, True])
def test_generate_greedy_matches_recomputing_the_full_forward(model, int8):
    prompt = list(range(3, 23))  # 20 tokens: past tiny's window of 8
    want = greedy_without_cache(model, prompt, 15)
    cache = new_cache(model, max_len=64, int8=int8)
    got = list(generate(model, prompt, cache, max_new_tokens=15, prefill_chunk=7))
    if int8:  # int8 KV may flip a near-tie; the first tokens must agree
        assert got[:5] == want[:5]
    else:
        assert got == want
    assert cache.next_position == len(prompt) + 14  # the last token is yielded, not fed


def test_generate_stops_at_eos_and_at_a_full_cache(model):
    prompt = [5, 6, 7]
    free = greedy_without_cache(model, prompt, 6)
    got = list(generate(model, prompt, new_cache(model, max_len=64), max_new_tokens=6, stop_ids=[free[2]]))
    assert got == free[: free.index(free[2]) + 1]
    got = list(generate(model, prompt, new_cache(model, max_len=6), max_new_tokens=50))
    assert len(got) == 4  # 3 prompt tokens + 3 fed tokens fill the cache; the 4th is yielded


def test_prompt_too_long_is_a_clear_error(model, tokenizer):
    with pytest.raises(ContextError, match="context"):
        next(generate(model, [1] * 10, new_cache(model, max_len=8), max_new_tokens=1))
    with pytest.raises(ContextError, match="shorten it"):
        next(generate_text(model, tokenizer, "hello world " * 200, max_new_tokens=5))


# ---- text and chat -----------------------------------------------------------------------------
def test_stream_text_reassembles_the_decoded_text_and_honours_stop_strings(tokenizer):
    ids = tokenizer.encode("hello world, the cat sat on the mat.")
    pieces = list(stream_text(tokenizer, iter(ids)))
    assert len(pieces) > 1 and "".join(pieces) == tokenizer.decode(ids)
    assert "".join(stream_text(tokenizer, iter(ids), ["cat"])) == "hello world, the "


def test_chat_feeds_only_the_new_turn_and_matches_a_fresh_run(model, tokenizer):
    session = ChatSession(model, tokenizer, max_context=200, max_new_tokens=6)
    assert isinstance("".join(session.reply("hello there")), str)
    n_before = len(session.ids)
    fed = []  # tokens per forward call during turn 2
    original = model.hidden_states
    model.hidden_states = lambda tokens, **kw: fed.append(tokens.shape[1]) or original(tokens, **kw)
    try:
        list(session.reply("the cat"))
    finally:
        del model.hidden_states
    n_reply = len(fed)  # one prefill, then one decode step per further token
    n_new_turn = len(session.ids) - n_reply - n_before
    assert fed[0] == n_new_turn + 1  # the new turn's tokens plus the last reply token, never the history
    assert fed[1:] == [1] * (n_reply - 1)
    assert session.cache.next_position == len(session.ids) - 1
    # The second reply equals greedy decoding of the whole conversation from scratch.
    prefix = session.ids[:-n_reply]
    assert session.ids[-n_reply:] == greedy_without_cache(model, prefix, n_reply)


def test_chat_session_decodes_through_the_given_step(model, tokenizer):
    caches = []

    def step(m, token, cache):
        caches.append(cache)
        return decode_one_token(m, token, cache)

    session = ChatSession(model, tokenizer, max_context=200, max_new_tokens=6, decode_step=step)
    plain = ChatSession(model, tokenizer, max_context=200, max_new_tokens=6)
    for text in ("hello there", "the cat"):
        assert "".join(session.reply(text)) == "".join(plain.reply(text))
    assert len(caches) >= 2 and all(cache is session.cache for cache in caches)


def test_run_chat_loop_with_a_fake_terminal(model, tokenizer):
    session = ChatSession(model, tokenizer, max_context=120, max_new_tokens=4)
    out = io.StringIO()
    run_chat(session, io.StringIO("hello\n\n/reset\nthe dog\n" + "hello world " * 40 + "\n/quit\n"), out)
    text = out.getvalue()
    assert text.count("> ") == 6 and "(new conversation)" in text
    assert "start a new conversation" in text  # the over-long turn is refused, the loop goes on


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model, tokenizer):
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_pretrained(model, folder)
    tokenizer.save(folder)
    return folder


def cli(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "mobilellm.cli", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_cli_generate(checkpoint, capsys):
    args = ["generate", str(checkpoint), "--prompt", "hello world", "--max-new-tokens", "5", "--temperature", "0.8",
            "--top-k", "20", "--seed", "3", "--int8-kv", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        assert main(args) == 0
        first = capsys.readouterr().out
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    assert capsys.readouterr().out == first  # seeded sampling is reproducible
    assert main(["generate", str(checkpoint), "--prompt", "hello world " * 300, "--chat"]) == 2
    assert "context is 256" in capsys.readouterr().err


def test_cli_chat_driven_through_stdin(checkpoint):
    chat = cli("chat", checkpoint, "--max-new-tokens", "3", stdin="hello\nthe cat\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("> ") == 3


@pytest.mark.slow  # compiles the decode step
def test_cli_chat_compiled_replies_like_eager(checkpoint):
    runs = [cli("chat", checkpoint, "--max-new-tokens", "6", *flag, stdin="hello\nthe cat\n") for flag in ((), ("--compile",))]
    assert all(run.returncode == 0 for run in runs), runs[1].stderr
    assert runs[0].stdout == runs[1].stdout


def test_smollm2_answers_paris(capsys):
    from mobilellm.artifacts import FetchError, fetch_smollm2
    try:
        folder = fetch_smollm2()
    except FetchError as err:
        pytest.skip(f"SmolLM2-135M unavailable: {err}")
    args = ["generate", str(folder), "--prompt", "What is the capital of France?", "--chat", "--max-new-tokens", "12"]
    assert main(args) == 0
    assert "Paris" in capsys.readouterr().out


def test_compiled_step_refuses_another_model():
    from mobilellm.infer.engine import compiled_decode_step, new_cache

    model, other = (build_model(ModelConfig.from_name("tiny"), seed=s).eval() for s in (0, 1))
    step = compiled_decode_step(model)  # compiles lazily: refusing costs no compilation
    with pytest.raises(ValueError, match="another model"):
        step(other, torch.zeros(1, 1, dtype=torch.long), new_cache(other, max_len=8))
