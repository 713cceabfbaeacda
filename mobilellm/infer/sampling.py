"""Choosing the next token from logits (greedy, temperature, top-k, top-p, repetition penalty) and stop rules."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen.

    Args:
        temperature: 0 for greedy decoding
        top_k: sample among the k most likely tokens
        top_p: sample among the most likely tokens holding probability p
        repetition_penalty: > 1 discourages repeating tokens of the context (CTRL / HF rule)
        seed: random seed for sampling
    """

    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator | None:
        return torch.Generator().manual_seed(self.seed) if self.seed is not None else None


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V); history (B, n) token ids seen so far. Positive logits divided, negative multiplied."""
    seen = logits.gather(-1, history)
    return logits.scatter(-1, history, torch.where(seen > 0, seen / penalty, seen * penalty))


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (the top token always stays)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= p  # mass before this token already reaches p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: torch.Tensor, config: SamplingConfig, history: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V)."""
    logits = logits.float()
    if config.repetition_penalty != 1.0 and history is not None and history.numel():
        logits = apply_repetition_penalty(logits, history, config.repetition_penalty)
    if config.greedy:
        return logits.argmax(-1)
    logits = logits / config.temperature
    if config.top_k is not None:
        logits = filter_top_k(logits, config.top_k)
    if config.top_p is not None and config.top_p < 1:
        logits = filter_top_p(logits, config.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def find_stop(text: str, stop_strings: Sequence[str]) -> int | None:
    """Index where the first stop string begins in text, or None."""
    hits = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    return min(hits) if hits else None


def safe_prefix(text: str, stop_strings: Sequence[str]) -> int:
    """How much of text can be shown now: hold back a tail that could still grow into a stop string,
    and a trailing U+FFFD (half of a multi-byte character)."""
    end = len(text.rstrip("\ufffd")) if text.endswith("\ufffd") else len(text)
    for s in stop_strings:
        for n in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:n]):
                end = min(end, len(text[:end]) - n)
                break
    return end
