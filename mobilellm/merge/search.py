"""Searching merge weights on validation data: a simplex grid for few models, CMA-ES for more.

The caller gives `score(weights) -> float` (lower is better, e.g. the merged model's validation loss on the
target domains); every candidate lies on the simplex (w_b >= 0, sum 1), as MobileLLM-Pro's merge requires.
CMA-ES (the `cma` package) searches unconstrained logits mapped through a softmax, so every point it asks
for is a valid weight vector. Every trial is kept, in order, for the record and the plot.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .methods import MergeError

STRATEGIES = ("grid", "cma")


@dataclass
class SearchResult:
    trials: list[tuple[list[float], float]] = field(default_factory=list)  # (weights, score) in trial order

    @property
    def best(self) -> tuple[list[float], float]:
        return min(self.trials, key=lambda t: t[1])

    def to_dict(self) -> dict:
        weights, score = self.best
        return {"best_weights": weights, "best_score": score,
                "trials": [{"weights": w, "score": s} for w, s in self.trials]}


def simplex_grid(n: int, step: float) -> list[list[float]]:
    """Every weight vector of n entries on the grid of `step` (1/step an integer) that sums to 1."""
    parts = round(1 / step)
    if n < 1 or parts < 1 or not math.isclose(parts * step, 1.0):
        raise MergeError(f"grid step must divide 1 (e.g. 0.1, 0.125, 0.25), got {step}")
    return [[c / parts for c in counts] for counts in itertools.product(range(parts + 1), repeat=n)
            if sum(counts) == parts]


def softmax(x: Sequence[float]) -> list[float]:
    z = np.exp(np.asarray(x, dtype=np.float64) - np.max(x))
    return (z / z.sum()).tolist()


def search_weights(score: Callable[[list[float]], float], n: int, *, strategy: str = "grid", step: float = 0.1,
                   budget: int = 60, seed: int = 0, on_trial: Callable[[list[float], float], None] | None = None
                   ) -> SearchResult:
    """Minimise `score` over merge weights of `n` models. grid: every simplex point of `step` (for n <= 4 or
    so: the count grows as C(1/step + n - 1, n - 1)); cma: about `budget` evaluations of CMA-ES (whole
    generations), starting from the uniform merge."""
    if strategy not in STRATEGIES:
        raise MergeError(f"unknown search strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    result = SearchResult()

    def evaluate(weights: list[float]) -> float:
        value = float(score(weights))
        result.trials.append((weights, value))
        if on_trial is not None:
            on_trial(weights, value)
        return value

    if strategy == "grid":
        for weights in simplex_grid(n, step):
            evaluate(weights)
        return result
    import cma

    options = {"seed": seed + 1, "maxfevals": budget, "verbose": -9, "popsize": max(4, 4 + int(3 * math.log(n)))}
    es = cma.CMAEvolutionStrategy([0.0] * n, 1.0, options)  # logits 0: the uniform merge first
    while not es.stop() and len(result.trials) < budget:  # whole generations: may pass budget by < popsize
        logits = es.ask()
        es.tell(logits, [evaluate(softmax(x)) for x in logits])
    return result
