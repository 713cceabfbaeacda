"""Small fixtures shared by the tests/test_data_*.py files: a corpus and a tiny BPE tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

from mobilellm.tokenizer import Tokenizer

WORDS = "the a of to and in is it you that he was for on are with as his they be at one have this".split()


def make_texts(n: int, seed: int = 0, min_words: int = 3, max_words: int = 60) -> list[str]:
    """n distinct documents of varied length."""
    rng = random.Random(seed)
    return [f"doc {seed}-{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
            for i in range(n)]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def tiny_tokenizer(folder: Path | None = None, vocab_size: int = 300) -> Tokenizer:
    tokenizer = Tokenizer.train_bpe(make_texts(200, seed=99), vocab_size, show_progress=False)
    if folder is not None:
        tokenizer.save(folder)
    return tokenizer
