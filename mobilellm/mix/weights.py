"""Utilities to sampling weights: the pure math of the mixer, apart from any model or data.

A domain's utility at one checkpoint of the proxy run is the alignment of its loss gradient with the
target's (see `influence.py`). Two steps turn per-checkpoint utilities into weights:

1. `aggregate`: the checkpoints' utilities averaged with weights proportional to the step (later
   checkpoints, closer to the trained model, count more: AutoMixer's aggregation);
2. `MixMapping.weights`: the aggregated utilities standardized across domains (z = (u - mean) / std, all
   zeros when every domain scores alike), a softmax at `temperature` (w ~ exp(z / T)), then clipped into
   [floor / n, cap] with the mass moved to the free domains, repeated until every weight is in bounds.

The floor keeps every domain above `floor` times the uniform weight 1/n, so the weights never collapse to
one-hot (DoReMi's users' complaint) unless asked for with floor=0 and cap=1. Standardizing makes the
mapping invariant to the scale and offset of the utilities, so `temperature` means the same on any proxy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class MixMapping:
    """How utilities become weights: softmax of standardized utilities, then floor and cap.

    Args:
        temperature: softmax temperature over the z-scored utilities (smaller: sharper weights)
        floor: every weight is at least floor / n, a fraction of the uniform weight (0 to 1)
        cap: no weight exceeds cap (1/n to 1)
    """
    temperature: float = 1.0
    floor: float = 0.2
    cap: float = 0.6

    def check(self, n: int) -> None:
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"floor must be in [0, 1] (a fraction of the uniform weight), got {self.floor}")
        if not 1.0 / n - 1e-12 <= self.cap <= 1.0:
            raise ValueError(f"cap must be in [1/n, 1] = [{1 / n:.4f}, 1] for {n} domains, got {self.cap}")

    def weights(self, utilities: dict[str, float]) -> dict[str, float]:
        """Weights summing to 1, in the order of `utilities`; higher utility never gets less weight."""
        names = list(utilities)
        if not names:
            raise ValueError("no domains to weigh")
        self.check(len(names))
        values = [float(utilities[n]) for n in names]
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"utilities must be finite numbers, got {utilities}")
        z = standardize(values)
        top = max(z)
        raw = [math.exp((v - top) / self.temperature) for v in z]
        total = sum(raw)
        bounded = clip_to_bounds([r / total for r in raw], self.floor / len(names), self.cap)
        return dict(zip(names, bounded))


def standardize(values: list[float]) -> list[float]:
    """(v - mean) / std over the list (population std); all zeros when the values are (nearly) equal."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    scale = max(abs(mean), max(abs(v) for v in values), 1e-30)
    if std <= 1e-9 * scale:
        return [0.0] * len(values)
    return [(v - mean) / std for v in values]


def clip_to_bounds(probs: list[float], low: float, high: float) -> list[float]:
    """The distribution `probs` with each entry in [low, high], sum 1: entries out of bounds are pinned
    to the bound and the others rescaled to the remaining mass, until none is out (order is kept)."""
    n = len(probs)
    if low * n > 1 + 1e-12 or high * n < 1 - 1e-12:
        raise ValueError(f"no distribution over {n} entries fits in [{low}, {high}]")
    pinned: dict[int, float] = {}
    while True:
        free = [i for i in range(n) if i not in pinned]
        mass = 1.0 - sum(pinned.values())
        free_total = sum(probs[i] for i in free)
        current = {i: (probs[i] / free_total * mass if free_total > 0 else mass / len(free)) for i in free}
        over = [i for i in free if current[i] > high + 1e-15]
        under = [i for i in free if current[i] < low - 1e-15]
        if not over and not under:
            out = [pinned.get(i, current.get(i)) for i in range(n)]
            total = sum(out)
            return [p / total for p in out]
        for i in over or under:  # pin one side at a time: pinning the cap can lift others over the floor
            pinned[i] = high if over else low


def aggregate(per_checkpoint: list[dict[str, float]], steps: list[int]) -> dict[str, float]:
    """Each domain's utilities over the checkpoints, averaged with weights proportional to the step."""
    if not per_checkpoint or len(per_checkpoint) != len(steps):
        raise ValueError(f"need one utility table per checkpoint step, got {len(per_checkpoint)} for {len(steps)}")
    if any(s <= 0 for s in steps):
        raise ValueError(f"checkpoint steps must be positive, got {steps}")
    names = list(per_checkpoint[0])
    if any(list(u) != names for u in per_checkpoint):
        raise ValueError("every checkpoint must score the same domains")
    total = sum(steps)
    return {n: sum(s * u[n] for s, u in zip(steps, per_checkpoint)) / total for n in names}
