"""Perplexity of a text set, per token, per word and per byte (lm-eval's rolling log-likelihood metrics).

Token perplexity depends on the tokenizer; word and byte perplexity (and bits per byte) do not, so
they compare models with different vocabularies.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from tqdm import tqdm

from .base import DataError, TaskResult

WINDOW, STRIDE = 2048, 1024


def load_texts(path: Path) -> list[str]:
    """A .txt file is one document; a .jsonl file holds one document per line in its "text" field."""
    if path.suffix == ".jsonl":
        texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        texts = [path.read_text(encoding="utf-8")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"{path} holds no text")
    return texts


def evaluate_perplexity(lm, texts: list[str], window: int = WINDOW, stride: int = STRIDE) -> TaskResult:
    window = min(window, lm.max_len)
    stride = min(stride, window)
    total_ll, tokens, words, n_bytes, samples = 0.0, 0, 0, 0, []
    for text in tqdm(texts, desc="perplexity", disable=not lm.progress, leave=False):
        ll, n = lm.rolling_loglikelihood(text, window, stride)
        n_words, n_text_bytes = len(re.split(r"\s+", text)), len(text.encode("utf-8"))
        total_ll, tokens, words, n_bytes = total_ll + ll, tokens + n, words + n_words, n_bytes + n_text_bytes
        samples.append({"loglik": ll, "tokens": n, "words": n_words, "bytes": n_text_bytes})
    return TaskResult({"token_perplexity": math.exp(-total_ll / tokens),
                       "word_perplexity": math.exp(-total_ll / words),
                       "byte_perplexity": math.exp(-total_ll / n_bytes),
                       "bits_per_byte": -total_ll / n_bytes / math.log(2)}, samples)
