"""Speculative decoding: a drafter guesses k tokens, the target checks them all in one forward.

Each round feeds the pending token and the k drafts through the target at once (T = k + 1, the chunked-prefill
path), so the target's logits after every draft come from one pass over the weights instead of k + 1 decode
steps. The drafts the target agrees with are kept, plus one token of the target's own; the KV cache is rolled
back past the rest (KVCache.mark / rollback, ring slots of sliding-window layers restored).

Agreement is decided so that the output is the target's own:
- greedy: a draft is kept while it is the argmax of the target's (penalized) logits, so the text is plain greedy
  decoding's. With an int8 CPU cache (the cpu scheme) every verified token attends through the decode step's
  kernel (KVCache.one_token_chunks) and the other ops are row by row, so its logits are a decode step's bit for
  bit: the scheme's int8 activations would turn the 1e-6 differences of a batched attention into other tokens
  within a few dozen. Float caches attend the chunk at once (prefill's path): equal up to float rounding;
- sampling: standard speculative sampling (Leviathan et al. 2023; Chen et al. 2023): draft x drawn from q is
  kept with probability min(1, p(x) / q(x)); at the first rejection the token is drawn from the residual
  max(p - q, 0) normalized, and after k kept drafts from p. Every token is then distributed exactly as plain
  sampling's. A deterministic draft (prompt lookup, greedy draft model) is a point mass q = one-hot(x).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .cache import KVCache
from .drafters import Draft, Drafter
from .engine import PREFILL_CHUNK, decode_one_token, prefill
from .sampling import SamplingConfig, processed_logits, sample


@dataclass
class Speculation:
    """A drafter and how many tokens it drafts per round; counts what happened (over every generate it serves)."""

    drafter: Drafter
    draft_tokens: int = 4
    drafted: int = 0  # draft tokens the target checked
    accepted: int = 0  # of those, kept
    rounds: int = 0  # target forwards over drafts
    steps: int = 0  # plain one-token target steps (no draft)
    decoded: int = 0  # tokens yielded after each generate's first (which prefill gives)
    decode_s: float = 0.0  # seconds from each generate's first token to its last

    def __post_init__(self):
        if self.draft_tokens < 1:
            raise ValueError(f"draft_tokens must be >= 1, got {self.draft_tokens}")

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        forwards = self.rounds + self.steps
        return (self.accepted + forwards) / forwards if forwards else 0.0

    def summary(self) -> str:
        speed = f"decode {self.decoded / self.decode_s:.1f} tok/s | " if self.decode_s > 0 else ""
        return (f"{speed}acceptance {100 * self.acceptance_rate:.0f}% ({self.accepted}/{self.drafted} drafted "
                f"tokens), {self.tokens_per_forward:.2f} tokens per target forward")


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """What a rejected draft is replaced from: max(p - q, 0) normalized (p itself where p <= q everywhere,
    i.e. p == q up to rounding, where a rejection has probability ~0)."""
    residual = (p - q).clamp_min(0)
    total = residual.sum()
    return residual / total if total > 0 else p


def accept_drafts(target: torch.Tensor, draft: Draft, sampling: SamplingConfig,
                  generator: torch.Generator | None) -> tuple[int, int]:
    """(drafts kept, the token after them) from the target's processed logits (n + 1, V) after the pending token
    and each of the n drafts (sampling.processed_logits)."""
    n = len(draft.tokens)
    if sampling.greedy:
        best = target.argmax(-1).tolist()
        kept = next((i for i in range(n) if best[i] != draft.tokens[i]), n)
        return kept, best[kept]
    p = target.softmax(-1)
    for i, x in enumerate(draft.tokens):
        q = draft.probs[i] if draft.probs is not None else torch.nn.functional.one_hot(
            torch.tensor(x), p.shape[-1]).to(p.dtype)
        if torch.rand((), generator=generator) * q[x] < p[i, x]:  # kept with probability min(1, p(x) / q(x))
            continue
        return i, int(torch.multinomial(residual_distribution(p[i], q), 1, generator=generator))
    return n, int(torch.multinomial(p[n], 1, generator=generator))


@torch.no_grad()
def verify_logits(model, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """tokens (1, T) -> the logits after each of them (T, V), in one forward (every position through the head)."""
    return model.lm_head(model.hidden_states(tokens, cache=cache))[0].float()


def target_logits(logits: torch.Tensor, seen: list[int], drafts: list[int], sampling: SamplingConfig) -> torch.Tensor:
    """processed_logits of each row: row i as plain decoding would see it, after `seen` and the first i drafts."""
    if sampling.penalty == 1.0:
        return processed_logits(logits, sampling)
    return torch.cat([processed_logits(logits[i:i + 1], sampling,
                                       torch.tensor([seen + drafts[:i]], device=logits.device))
                      for i in range(logits.shape[0])])


@torch.no_grad()
def generate_speculative(model, prompt: Sequence[int] | torch.Tensor, cache: KVCache, speculation: Speculation, *,
                         max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                         stop_ids: Sequence[int] = (), history: Sequence[int] | None = None,
                         prefill_chunk: int = PREFILL_CHUNK, decode_step=decode_one_token) -> Iterator[int]:
    """engine.generate with speculative decoding: the same contract and the same tokens (greedy) or the same
    distribution of tokens (sampling). One sequence (a batch-1 cache). `decode_step` runs the target's plain
    steps, when the drafter has no guess; `history` is also what the drafter sees before the prompt."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if cache.stores[0].k.shape[0] != 1:
        raise ValueError("speculative decoding runs one sequence: give it a batch-1 cache")
    if max_new_tokens == 0:
        return
    device = model.norm.weight.device
    tokens = torch.as_tensor(prompt, dtype=torch.long).reshape(1, -1).to(device)
    logits = prefill(model, tokens, cache, prefill_chunk)
    generator = sampling.generator()
    seen = list(history if history is not None else tokens[0].tolist())
    stop = set(stop_ids)
    past = torch.tensor([seen], device=device) if sampling.penalty != 1.0 else None
    token = int(sample(logits, sampling, past, generator))
    produced = 1
    seen.append(token)
    yield token
    first_at, decode_s_before = time.perf_counter(), speculation.decode_s
    while token not in stop and produced < max_new_tokens and cache.next_position < cache.max_len:
        start = cache.next_position  # where the pending token goes
        k = min(speculation.draft_tokens, cache.max_rollback - 1, cache.max_len - start - 1,
                max_new_tokens - produced - 1)
        if cache.attends_one_token:  # verified token by token, as decode steps attend (the same numbers)
            k = min(k, cache.one_token_chunks - 1)
        draft = speculation.drafter.propose(seen, k, sampling, generator) if k > 0 else Draft([])
        draft = Draft(draft.tokens[:k], None if draft.probs is None else draft.probs[:k])
        if not draft.tokens:  # a plain step
            speculation.steps += 1
            logits = decode_step(model, torch.tensor([[token]], device=device), cache)
            past = torch.tensor([seen], device=device) if sampling.penalty != 1.0 else None
            new = [int(sample(logits, sampling, past, generator))]
        else:
            cache.mark(1 + len(draft.tokens))
            logits = verify_logits(model, torch.tensor([[token] + draft.tokens], device=device), cache)
            kept, after = accept_drafts(target_logits(logits, seen, draft.tokens, sampling), draft, sampling,
                                        generator)
            speculation.rounds += 1
            speculation.drafted += len(draft.tokens)
            speculation.accepted += kept
            new = draft.tokens[:kept] + [after]
        new = new[:max_new_tokens - produced]
        cut = next((i for i, t in enumerate(new) if t in stop), None)
        if cut is not None:
            new = new[:cut + 1]
        if cache.next_position != start + len(new):  # the cache keeps the pending token and all new but the last
            cache.rollback(start + len(new))
        for t in new:
            seen.append(t)
            yield t
        produced += len(new)
        token = new[-1]
        speculation.decoded += len(new)
        speculation.decode_s = decode_s_before + time.perf_counter() - first_at
