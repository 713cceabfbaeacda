"""Where speculative decoding's drafts come from: the context itself (prompt lookup), or a smaller model.

A drafter proposes up to k tokens that may follow a context, with the distribution each was drawn from (None
when chosen deterministically: a point mass on the token). `infer.speculative` verifies them against the target
model; the drafter is told nothing about the outcome but sees it in the next context it is given.

- `NgramDrafter` (prompt lookup decoding, no extra model): find the latest earlier occurrence of the context's
  last n tokens (longest n first) and propose what followed it. Code completion and summaries repeat long
  spans of their prompt, so drafts are often right.
- `ModelDrafter`: a draft model sharing the target's tokenizer decodes k tokens from its own KV cache, which is
  rolled back to what the next context keeps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from .cache import KVCache
from .engine import decode_one_token, new_cache, prefill_chunks
from .sampling import SamplingConfig, processed_logits


@dataclass
class Draft:
    tokens: list[int]
    probs: torch.Tensor | None = None  # (n, V) the distribution tokens[i] was drawn from; None: point masses


class Drafter(ABC):
    @abstractmethod
    def propose(self, context: list[int], k: int, sampling: SamplingConfig,
                generator: torch.Generator | None) -> Draft:
        """Up to k tokens that may follow `context` (every token so far); an empty draft when it has no guess."""


class NgramDrafter(Drafter):
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the context's last n tokens,
    n from max_ngram down to min_ngram. The n-gram index grows with the context instead of being rebuilt."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        self.sizes = range(max_ngram, min_ngram - 1, -1)
        self.tokens: list[int] = []
        self.index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}  # n-gram -> its latest end
        self.indexed = 0  # n-grams ending at 1..indexed are in the index

    def _sync(self, context: list[int]) -> None:
        known = len(self.tokens)
        if len(context) < known or context[:known] != self.tokens:  # a new context: start over
            self.tokens, self.indexed = [], 0
            self.index = {n: {} for n in self.sizes}
        self.tokens = list(context)
        # Index every n-gram except those ending at the context's end: the suffix must match an earlier one.
        for end in range(self.indexed + 1, len(context)):
            for n in self.sizes:
                if end >= n:
                    self.index[n][tuple(context[end - n:end])] = end
        self.indexed = max(self.indexed, len(context) - 1)

    def propose(self, context, k, sampling, generator) -> Draft:
        self._sync(context)
        for n in self.sizes:
            if len(context) >= n:
                end = self.index[n].get(tuple(context[-n:]))
                if end is not None:  # copy what followed, overlapping into the copy itself (a loop repeats)
                    extended = list(context)
                    for i in range(k):
                        extended.append(extended[end + i])
                    return Draft(extended[len(context):])
        return Draft([])


class ModelDrafter(Drafter):
    """A draft model decoding from its own cache. Between proposals the cache keeps the longest prefix of the
    tokens it was fed that the new context still has; the rest is rolled back (KVCache.mark / rollback). The
    cache is allocated at first use and again, twice as long, when a context outgrows it."""

    def __init__(self, model, int8_kv: bool = False, decode_step=decode_one_token):
        self.model, self.int8_kv, self.decode_step = model, int8_kv, decode_step
        self.cache: KVCache | None = None
        self.fed: list[int] = []  # the tokens in the cache, in order
        self.device = model.norm.weight.device

    def _reserve(self, tokens: int) -> None:
        if self.cache is None or self.cache.max_len < tokens:
            context = self.model.config.max_seq_len
            self.cache = new_cache(self.model, min(context, max(256, 2 * tokens)), int8=self.int8_kv)
            self.fed = []

    def _keep_prefix_of(self, context: list[int]) -> None:
        common = 0
        for a, b in zip(self.fed, context[:-1]):  # the context's last token is fed again to get logits after it
            if a != b:
                break
            common += 1
        if common < len(self.fed):
            if self.cache.can_rollback(common):
                self.cache.rollback(common)
            else:
                self.cache.reset()
                common = 0
            self.fed = self.fed[:common]

    @torch.no_grad()
    def propose(self, context, k, sampling, generator) -> Draft:
        self._reserve(len(context) + k)
        self._keep_prefix_of(context)
        k = min(k, self.cache.max_rollback, self.cache.max_len - len(context) + 1)
        if k < 1:
            return Draft([])
        new = context[len(self.fed):-1]
        if new:
            for _ in prefill_chunks(self.model, torch.tensor([new], device=self.device), self.cache):
                pass
            self.fed += new
        self.cache.mark(k)  # the next k tokens fed (the context's last, k - 1 drafts) may be rolled back
        token, tokens, probs = context[-1], [], []
        for _ in range(k):
            logits = self.decode_step(self.model, torch.tensor([[token]], device=self.device), self.cache)
            self.fed.append(token)
            history = (torch.tensor([context + tokens], device=self.device) if sampling.penalty != 1.0 else None)
            logits = processed_logits(logits, sampling, history)
            if sampling.greedy:
                token = int(logits.argmax(-1))
            else:
                q = logits.softmax(-1)
                token = int(torch.multinomial(q, 1, generator=generator))
                probs.append(q[0])
            tokens.append(token)
        return Draft(tokens, torch.stack(probs) if probs else None)
