"""Choosing the next token from logits (greedy, temperature, top-k, top-p, repetition penalty) and stop rules.

A checkpoint may ship its own sampling defaults (`generation_config.json`, as transformers reads it):
`SamplingConfig.from_generation_config` reads them, and a config whose fields are left unset (None) takes
them with `over(defaults)`, so a flag or a request's value always wins over the checkpoint's.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..tokenizer import GENERATION_CONFIG_FILE


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen.

    Unset fields (None) take the checkpoint's generation_config.json values where it ships them, else
    greedy decoding without penalty.

    Args:
        temperature: 0 for greedy decoding (default: the checkpoint's, else 0)
        top_k: sample among the k most likely tokens (0: no top-k; default: the checkpoint's)
        top_p: sample among the most likely tokens holding probability p (default: the checkpoint's)
        repetition_penalty: > 1 discourages repeating tokens of the context (CTRL / HF rule; default: the
            checkpoint's, else 1)
        seed: random seed for sampling
    """

    temperature: float | None = None  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self):
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return not self.temperature

    @property
    def penalty(self) -> float:
        return 1.0 if self.repetition_penalty is None else self.repetition_penalty

    def over(self, defaults: "SamplingConfig") -> "SamplingConfig":
        """This config with its unset fields taken from `defaults` (e.g. the checkpoint's)."""
        return SamplingConfig(**{f.name: getattr(defaults, f.name) if getattr(self, f.name) is None
                                 else getattr(self, f.name) for f in dataclasses.fields(self)})

    @classmethod
    def from_generation_config(cls, gen: dict) -> "SamplingConfig":
        """The defaults a transformers `generation_config.json` sets, read as transformers does: temperature,
        top_k and top_p only when `do_sample` is true (else greedy), the repetition penalty either way."""
        def number(key, kind):
            value = gen.get(key)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{GENERATION_CONFIG_FILE}: {key} must be a number, got {value!r}")
            return kind(value)

        sample = bool(gen.get("do_sample", False))
        return cls(temperature=number("temperature", float) if sample else 0.0,
                   top_k=number("top_k", int) if sample else None,
                   top_p=number("top_p", float) if sample else None,
                   repetition_penalty=number("repetition_penalty", float))

    @classmethod
    def of_checkpoint(cls, folder: str | Path | None) -> "SamplingConfig":
        """A checkpoint folder's sampling defaults: its generation_config.json, or none (all unset)."""
        path = Path(folder) / GENERATION_CONFIG_FILE if folder is not None else None
        if path is None or not path.is_file():
            return cls()
        try:
            gen = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(gen, dict):
            raise ValueError(f"{path} must hold a JSON object")
        return cls.from_generation_config(gen)

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
    if config.penalty != 1.0 and history is not None and history.numel():
        logits = apply_repetition_penalty(logits, history, config.penalty)
    if config.greedy:
        return logits.argmax(-1)
    logits = logits / config.temperature
    if config.top_k:
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
