"""Shared by the tests/test_eval_*.py files: a tiny checkpoint folder with a trained tokenizer, the real SmolLM2."""

from __future__ import annotations

from pathlib import Path

import pytest

from mobilellm.artifacts import FetchError, fetch_smollm2
from mobilellm.config import ModelConfig
from mobilellm.hf import save_pretrained
from mobilellm.model import build_model
from mobilellm.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Question: what is the answer? Answer: yes, no.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5\n",
    "Paris is the capital of France. The passkey is 12345. Remember it.",
]


def tiny_checkpoint(folder: Path, config: str = "tiny", seed: int = 0) -> Path:
    """The `tiny` config (local/global layers, window 8) or another named one, with a 300-token BPE trained on CORPUS."""
    trained = Tokenizer.train_bpe(CORPUS * 20, vocab_size=300, show_progress=False)
    # One end-of-sequence token: transformers cannot read the list Tokenizer.save writes for several.
    tokenizer = Tokenizer(trained.backend, trained.bos_token, trained.eos_tokens[:1], trained.pad_token, trained.chat_template)
    cfg = ModelConfig.from_name(config).replace(vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id,
                                                eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id)
    save_pretrained(build_model(cfg, seed=seed), folder)
    tokenizer.save(folder)
    return folder


def smollm2_or_skip() -> Path:
    try:
        return fetch_smollm2()
    except FetchError as err:
        pytest.skip(f"the real SmolLM2-135M is not available: {err}")
