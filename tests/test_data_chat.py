"""Chat data: assistant masks against hand-marked spans (ChatML and the real SmolLM2 template, multi-turn), any
template without generation markers, and bad files refused naming the file and line."""

import json

import numpy as np
import pytest

from mobilellm.data.chat import (ChatDataError, Conversation, read_conversations, read_pairs, render)
from mobilellm.tokenizer import Tokenizer
from tests.data_helpers import tiny_tokenizer

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And its second city, with accents: é ü?"},
        {"role": "assistant", "content": "Lyon, on the Rhône."}]


@pytest.fixture(scope="module")
def chatml():
    return tiny_tokenizer()


def learned_runs(tokenizer, rendered) -> list[str]:
    """The learned tokens as text, one string per contiguous run."""
    runs, run = [], []
    for token, learned in zip(rendered.tokens.tolist(), rendered.learned.tolist()):
        if learned:
            run.append(token)
        elif run:
            runs, run = runs + [tokenizer.decode(run)], []
    return runs + ([tokenizer.decode(run)] if run else [])


def one(tokenizer, messages, learn_from=0):
    return render(tokenizer, [Conversation(tuple(messages), learn_from, "test")])[0]


def test_chatml_marks_every_assistant_turn_up_to_its_end_token(chatml):
    rendered = one(chatml, CHAT)
    assert learned_runs(chatml, rendered) == ["Paris.<|im_end|>", "Lyon, on the Rhône.<|im_end|>"]
    # Everything else is the prompt side, hand-written: the template's headers, the user turns, the newlines.
    prompt = chatml.decode(rendered.tokens[~rendered.learned].tolist())
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
                      "<|im_start|>assistant\n\n<|im_start|>user\nAnd its second city, with accents: é ü?<|im_end|>\n"
                      "<|im_start|>assistant\n\n")
    assert chatml.decode(rendered.tokens.tolist()) == chatml.apply_chat_template(CHAT, add_generation_prompt=False)


def test_smollm2_template_with_its_default_system_prompt(smollm2_dir):
    tokenizer = Tokenizer.load(smollm2_dir)
    rendered = one(tokenizer, CHAT[1:])  # no system turn: the template adds SmolLM2's own
    assert learned_runs(tokenizer, rendered) == ["Paris.<|im_end|>", "Lyon, on the Rhône.<|im_end|>"]
    text = tokenizer.decode(rendered.tokens.tolist())
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    # Before the first learned token stand exactly the tokens the chat engine sends for the first question.
    first = int(np.argmax(rendered.learned))
    assert rendered.tokens[:first].tolist() == tokenizer.encode(tokenizer.apply_chat_template(CHAT[1:2]))


def test_a_completion_learns_only_the_completion(chatml):
    rendered = one(chatml, CHAT, learn_from=4)  # prompt = the first four messages
    assert learned_runs(chatml, rendered) == ["Lyon, on the Rhône.<|im_end|>"]


def test_a_template_without_end_tokens_or_markers_learns_the_whole_turn(chatml):
    plain = Tokenizer(chatml.backend, chatml.bos_token, chatml.eos_tokens, chatml.pad_token,
                      "{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
                      "{% elif m['role'] == 'assistant' %}Bot: {{ m['content'] }}\n\n{% endif %}{% endfor %}"
                      "{% if add_generation_prompt %}Bot:{% endif %}")
    rendered = one(plain, CHAT)
    assert learned_runs(plain, rendered) == [" Paris.\n\n", " Lyon, on the Rhône.\n\n"]


def test_a_template_that_rewrites_earlier_turns_is_refused(chatml):
    # Shows only the last assistant turn (as templates that drop earlier reasoning do).
    odd = Tokenizer(chatml.backend, chatml.bos_token, chatml.eos_tokens, chatml.pad_token,
                    "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}\n"
                    "{% endif %}{% endfor %}")
    with pytest.raises(ChatDataError, match="test: the chat template does not render this conversation prefix"):
        one(odd, CHAT)


def write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_both_formats_read_with_string_or_message_fields(tmp_path):
    path = write(tmp_path / "chat.jsonl", [{"messages": CHAT}, "", {"prompt": "2+2?", "completion": "4"},
                                           {"prompt": CHAT[:2], "completion": [CHAT[2]]}])
    conversations = read_conversations(path)
    assert [len(c.messages) for c in conversations] == [5, 2, 3]
    assert [c.learn_from for c in conversations] == [0, 1, 2]
    assert conversations[1].messages == ({"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"})
    assert conversations[2].where == f"{path}:4"  # the blank line still counts
    pair = read_pairs(write(tmp_path / "pairs.jsonl", [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}]))[0]
    chosen, rejected = pair.conversations()
    assert chosen.messages[-1]["content"] == "Hello!" and rejected.learn_from == 1


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]},
     r"messages message 2 has unknown role 'bot' \(expected system, user, assistant\)"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn in messages"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ["yo"]}]},
     r"messages message 2 \(assistant\) has list content, not a string"),
    ({"prompt": "hi", "completion": [{"role": "user", "content": "again"}]}, "no assistant turn in the completion"),
    ({"text": "hi"}, "expected a 'messages' list, or 'prompt' and 'completion' \\(got keys text\\)"),
    ("{not json", "not JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
])
def test_bad_conversations_name_the_file_and_line(tmp_path, record, message):
    path = write(tmp_path / "bad.jsonl", [{"messages": CHAT}, record])
    with pytest.raises(ChatDataError, match=f"bad.jsonl:2: {message}"):
        read_conversations(path)


def test_bad_pairs_and_empty_files(tmp_path):
    path = write(tmp_path / "pairs.jsonl", [{"prompt": "hi", "chosen": "yo"}])
    with pytest.raises(ChatDataError, match=r"pairs.jsonl:1: .*\(missing rejected\)"):
        read_pairs(path)
    path = write(tmp_path / "pairs.jsonl", [{"prompt": "hi", "chosen": "yo", "rejected": 3}])
    with pytest.raises(ChatDataError, match="pairs.jsonl:1: 'rejected' must be a string or a non-empty list"):
        read_pairs(path)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ChatDataError, match="empty.jsonl: empty file, no examples"):
        read_conversations(tmp_path / "empty.jsonl")
    with pytest.raises(ChatDataError, match="no chat data file"):
        read_pairs(tmp_path / "missing.jsonl")
