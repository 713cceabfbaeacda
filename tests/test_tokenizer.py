import pytest

from mobilellm.tokenizer import Tokenizer

CORPUS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.", "x = 3 * (4 + 5)"] * 50


def test_trained_bpe_round_trips_text_and_saves(tmp_path):
    tok = Tokenizer.train_bpe(CORPUS, vocab_size=400, show_progress=False)
    text = "def jumps(fox):\n    return 'über' + fox  # unseen bytes too"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("The quick brown fox")) < len("The quick brown fox")  # merges were learned
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.encode(text) == tok.encode(text)
    assert (again.bos_id, again.eos_ids, again.pad_id) == (tok.bos_id, tok.eos_ids, tok.pad_id)
    chat = again.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode("hi", bos=True)[0] == tok.bos_id


def test_saved_tokenizer_loads_in_transformers_with_every_end_token_kept(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer.train_bpe(CORPUS, vocab_size=400, show_progress=False)
    assert len(tok.eos_ids) == 2
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.eos_token == "<|eos|>"
    assert hf("def add(a, b)", add_special_tokens=False)["input_ids"] == tok.encode("def add(a, b)")
    assert Tokenizer.load(tmp_path).eos_ids == tok.eos_ids
