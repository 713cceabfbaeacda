"""Per-item metrics, defined as lm-eval defines them so that scores are comparable."""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def multiple_choice(logliks: Sequence[float], choice_texts: Sequence[str], gold: Sequence[int]) -> dict:
    """acc: the most likely choice is a gold one. acc_norm: the same after dividing each log-likelihood
    by its choice's length in characters (lm-eval's `acc_norm`). choice: the index of the most likely one."""
    best = max(range(len(logliks)), key=lambda i: logliks[i])
    normed = [ll / max(len(text), 1) for ll, text in zip(logliks, choice_texts)]
    best_norm = max(range(len(normed)), key=lambda i: normed[i])
    return {"acc": float(best in gold), "acc_norm": float(best_norm in gold), "choice": best}


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


# ---- BIG-bench's generative metrics (bigbench/api/task_metrics.py, through t5.evaluation.metrics) -------------

def _bleu_scorer():
    from sacrebleu.metrics import BLEU  # the `eval` extra; imported only by tasks that ask for BLEU
    # t5.evaluation.metrics.bleu, which BIG-bench calls: exp smoothing, intl tokenizer, no effective order.
    return BLEU(tokenize="intl", smooth_method="exp", smooth_value=0.0, force=False, lowercase=False,
                effective_order=False)


def bleu_statistics(prediction: str, references: Sequence[str]) -> list[int]:
    """One sentence's BLEU sufficient statistics (n-gram matches and totals, lengths): summed over a corpus they
    give corpus BLEU, so a bootstrap resamples sums instead of re-tokenizing."""
    return [int(x) for x in _bleu_scorer()._extract_corpus_statistics([prediction], [[r] for r in references])[0]]


def corpus_bleu(statistics: Sequence[Sequence[int]]) -> float:
    """Corpus BLEU (0-100) from per-sentence `bleu_statistics`: sacrebleu's `corpus_bleu` of those sentences."""
    summed = [sum(column) for column in zip(*statistics)]
    return float(_bleu_scorer()._compute_score_from_stats(summed).score)


ROUGE_TYPES = ("rouge1", "rouge2", "rougeLsum")


def rouge(prediction: str, references: Sequence[str]) -> dict[str, float]:
    """BIG-bench's `rouge_fn` for one item: per ROUGE type the F-measure (0-100) against the best reference.

    BIG-bench averages these per-item scores through t5's bootstrap aggregator (its "mid" estimate of the
    mean); here the plain mean is taken, which that estimate approximates.
    """
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES))
    prepare = lambda text: text.replace(" . ", " .\n")  # t5 puts sentences on lines for rougeLsum
    scores = [scorer.score(target=prepare(r), prediction=prepare(prediction)) for r in references]
    return {t: 100 * max(s[t].fmeasure for s in scores) for t in ROUGE_TYPES}


def numeric_match(prediction: str, references: Sequence[str], rel_error: float = 0.1) -> float:
    """BIG-bench's numeric_match_with_0_1_relative_error (absolute error when the target is 0)."""
    try:
        value, target = float(prediction), float(references[0])
    except ValueError:
        return 0.0
    return float(abs(value - target) / (target if target != 0 else 1) <= rel_error)
