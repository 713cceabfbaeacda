"""Standard errors of task metrics, and paired comparisons of two models on the same items.

Standard errors are computed as lm-evaluation-harness computes them (lm_eval/api/metrics.py): the mean of
per-item scores gets `sample_stddev / sqrt(n)` (Bessel-corrected); a corpus-level metric (BLEU, perplexity)
gets the standard deviation of the metric over bootstrap resamples drawn exactly as lm-eval draws them
(chunks of at most 1,000 resamples, chunk i from `random.Random(i)`), so the same items give the same number.

Two models scored on the same items are compared item by item: the per-item differences of a mean metric
have their own standard error (the paired test is far tighter than two independent intervals, since the
items' difficulty cancels); a corpus metric gets a paired bootstrap (the same resampled items for both).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054  # two-sided 95% normal quantile
BOOTSTRAP_ITERS = 1000


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def sample_stddev(values: Sequence[float]) -> float:
    if len(values) < 2:
        return float("nan")
    mu = mean(values)
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (len(values) - 1))


def mean_stderr(values: Sequence[float]) -> float:
    """lm-eval's `mean_stderr`: the Bessel-corrected standard deviation over sqrt(n); nan below 2 items."""
    return sample_stddev(values) / math.sqrt(len(values)) if len(values) >= 2 else float("nan")


def bootstrap_replicates(f: Callable[[list], float], xs: Sequence, iters: int = BOOTSTRAP_ITERS) -> list[float]:
    """f over `iters` resamples of xs, drawn as lm-eval's `bootstrap_stderr` draws them."""
    xs, out = list(xs), []
    chunk = min(1000, iters)
    for i in range(iters // chunk):
        rnd = random.Random(i)
        out.extend(f(rnd.choices(xs, k=len(xs))) for _ in range(chunk))
    return out


def bootstrap_stderr(f: Callable[[list], float], xs: Sequence, iters: int = BOOTSTRAP_ITERS) -> float:
    return sample_stddev(bootstrap_replicates(f, xs, iters)) if len(xs) >= 2 else float("nan")


@dataclass(frozen=True)
class PairedDifference:
    diff: float  # metric(B) - metric(A)
    stderr: float
    low: float  # 95% interval of the difference
    high: float
    method: str  # "paired t" (mean metrics) or "paired bootstrap" (corpus metrics)

    @property
    def within_noise(self) -> bool:
        """The 95% interval holds 0 (identical scores, zero spread, are within noise too)."""
        if self.diff == 0:
            return True
        return not (math.isnan(self.low) or math.isnan(self.high)) and self.low <= 0 <= self.high


def paired_mean_difference(a: Sequence[float], b: Sequence[float]) -> PairedDifference:
    """Mean of b_i - a_i with its standard error (the paired test on per-item scores)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired scores need the same items: {len(a)} vs {len(b)}")
    d = [y - x for x, y in zip(a, b)]
    diff = mean(d)
    if len(d) < 2:
        return PairedDifference(diff, float("nan"), float("nan"), float("nan"), "paired t")
    se = mean_stderr(d)
    return PairedDifference(diff, se, diff - Z95 * se, diff + Z95 * se, "paired t")


def paired_bootstrap_difference(f: Callable[[list], float], a: Sequence, b: Sequence,
                                iters: int = BOOTSTRAP_ITERS) -> PairedDifference:
    """f(B) - f(A) for a corpus metric f, with the 2.5/97.5 percentiles over resamples of the same items."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired scores need the same items: {len(a)} vs {len(b)}")
    pairs = list(zip(a, b))
    diff_of = lambda sample: f([y for _, y in sample]) - f([x for x, _ in sample])
    replicates = sorted(bootstrap_replicates(diff_of, pairs, iters))
    lo = replicates[int(0.025 * (len(replicates) - 1))]
    hi = replicates[int(math.ceil(0.975 * (len(replicates) - 1)))]
    return PairedDifference(diff_of(pairs), sample_stddev(replicates), lo, hi, "paired bootstrap")
