"""Per-item metrics, defined as lm-eval defines them so that scores are comparable."""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def multiple_choice(logliks: Sequence[float], choice_texts: Sequence[str], gold: Sequence[int]) -> dict[str, float]:
    """acc: the most likely choice is a gold one. acc_norm: the same after dividing each log-likelihood
    by its choice's length in characters (lm-eval's `acc_norm`)."""
    best = max(range(len(logliks)), key=lambda i: logliks[i])
    normed = [ll / max(len(text), 1) for ll, text in zip(logliks, choice_texts)]
    best_norm = max(range(len(normed)), key=lambda i: normed[i])
    return {"acc": float(best in gold), "acc_norm": float(best_norm in gold)}


def normalize_answer(text: str, ignore_case: bool, ignore_punctuation: bool,
                     regexes_to_ignore: Sequence[str] = ()) -> str:
    for pattern in regexes_to_ignore:
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(_PUNCTUATION)
    return text


def exact_match(prediction: str, answers: Sequence[str], *, ignore_case: bool = True, ignore_punctuation: bool = True,
                regexes_to_ignore: Sequence[str] = ()) -> float:
    """1.0 when the stripped prediction equals any answer after lm-eval's normalisation."""
    pred = normalize_answer(prediction.strip(), ignore_case, ignore_punctuation, regexes_to_ignore)
    return float(any(pred == normalize_answer(a, ignore_case, ignore_punctuation, regexes_to_ignore) for a in answers))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of the Codex paper from n samples of which c passed."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
