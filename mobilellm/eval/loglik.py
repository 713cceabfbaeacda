"""Log-likelihood of continuations given contexts, batched, each distinct context run once.

lm-eval feeds `(context + continuation)[:-1]` and reads the continuation's log-probabilities. We split
that input into a shared prefix (`context[:-1]`) and a per-request tail (`context[-1:] + continuation[:-1]`):
the prefixes of a batch go through the model once (only their keys/values are kept), then every
continuation of every prefix runs as one batch row attending to its prefix's cached keys. The result
is the same arithmetic as the full forward, with the context's cost paid once per distinct context.

Only the model's forward API is used (`hidden_states`, `lm_head`, the KV-cache protocol), so quantized
models whose Linear modules were swapped are scored unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..cache_protocol import AttentionCache

HEAD_CHUNK = 1024  # positions per LM-head call: bounds the (n, vocab) logits in memory


class PrefixCache(AttentionCache):
    """The KV-cache protocol for two passes: store prefix keys, then serve them to continuation rows.

    Pass 1 (`rows is None`): the padded prefixes (G, Lp) are cached; padding slots get position -1,
    which the model's mask treats as empty, and zero keys/values so nothing undefined is ever read.
    Pass 2 (`rows` = the prefix index of each continuation row): keys are [prefix of the row, row].
    """

    def __init__(self, valid: torch.Tensor):  # (G, Lp) bool: real prefix tokens
        self.valid = valid
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.rows: torch.Tensor | None = None
        self.next_position = 0  # unused: positions are always passed explicitly

    def prefix_positions(self) -> torch.Tensor:  # (G, Lp), -1 at padding
        positions = torch.arange(self.valid.shape[1], device=self.valid.device).expand_as(self.valid)
        return positions.masked_fill(~self.valid, -1)

    def update(self, layer: int, k, v, positions):  # k, v (B, n_kv, T, hd); positions (B, T)
        if self.rows is None:
            keep = self.valid[:, None, :, None]
            self.k[layer], self.v[layer] = k.masked_fill(~keep, 0), v.masked_fill(~keep, 0)
            return self.k[layer], self.v[layer], self.prefix_positions()
        if layer not in self.k:  # no prefix at all (every context was one token long)
            return k, v, positions
        k_all = torch.cat((self.k[layer][self.rows], k), dim=2)
        v_all = torch.cat((self.v[layer][self.rows], v), dim=2)
        return k_all, v_all, torch.cat((self.prefix_positions()[self.rows], positions), dim=1)

    def advance(self, T: int) -> None:
        pass


@dataclass(frozen=True)
class TokenRequest:
    context: tuple[int, ...]  # at least one token
    continuation: tuple[int, ...]  # at least one token


def truncate(request: TokenRequest, max_len: int) -> TokenRequest:
    """Drop the oldest context tokens so that context[:-1] + continuation fits max_len (as lm-eval does)."""
    excess = len(request.context) + len(request.continuation) - 1 - max_len
    if excess <= 0:
        return request
    if len(request.continuation) > max_len:
        raise ValueError(f"a continuation of {len(request.continuation)} tokens does not fit the "
                         f"{max_len}-token context")
    return TokenRequest(request.context[excess:], request.continuation)


def plan_batches(requests: Sequence[TokenRequest], batch_tokens: int) -> list[list[list[int]]]:
    """Group request indices by shared prefix, longest prefixes first, into batches of groups.

    A batch holds whole groups while (prefix tokens + continuation-row tokens incl. padding) fits
    batch_tokens; a group bigger than that still gets a batch of its own.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.context[:-1], []).append(i)
    ordered = sorted(groups.items(), key=lambda item: -len(item[0]))
    batches, current, max_prefix, max_tail, n_rows = [], [], 0, 0, 0
    for prefix, members in ordered:
        tail = max(len(requests[i].continuation) for i in members)
        new_prefix, new_tail, new_rows = max(max_prefix, len(prefix)), max(max_tail, tail), n_rows + len(members)
        cost = new_prefix * (len(current) + 1) + new_rows * (new_prefix + new_tail)
        if current and cost > batch_tokens:
            batches.append(current)
            current, new_prefix, new_tail, new_rows = [], len(prefix), tail, len(members)
        current.append(members)
        max_prefix, max_tail, n_rows = new_prefix, new_tail, new_rows
    if current:
        batches.append(current)
    return batches


def _pad(seqs: Sequence[Sequence[int]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.zeros(len(seqs), length, dtype=torch.long)
    valid = torch.zeros(len(seqs), length, dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        valid[i, :len(s)] = True
    return tokens, valid


@torch.no_grad()
def score_batch(model, requests: Sequence[TokenRequest], groups: list[list[int]]) -> dict[int, tuple[float, bool]]:
    """(sum log p(continuation | context), whether greedy decoding yields it) for each request of the batch."""
    device = model.norm.weight.device
    prefixes = [requests[g[0]].context[:-1] for g in groups]
    prefix_tokens, prefix_valid = _pad(prefixes, max(map(len, prefixes)))  # (G, Lp)
    cache = PrefixCache(prefix_valid.to(device))
    if prefix_tokens.shape[1] > 0:
        G, Lp = prefix_tokens.shape
        model.hidden_states(prefix_tokens.to(device), positions=torch.arange(Lp, device=device).expand(G, Lp),
                            cache=cache)

    order = [i for g in groups for i in g]
    rows = torch.tensor([gi for gi, g in enumerate(groups) for _ in g], device=device)
    tails = [requests[i].context[-1:] + requests[i].continuation[:-1] for i in order]
    tail_tokens, tail_valid = _pad(tails, max(map(len, tails)))  # (N, Tc)
    starts = torch.tensor([len(prefixes[gi]) for gi, g in enumerate(groups) for _ in g], device=device)
    positions = starts[:, None] + torch.arange(tail_tokens.shape[1], device=device)  # (N, Tc)
    cache.rows = rows
    hidden = model.hidden_states(tail_tokens.to(device), positions=positions, cache=cache)  # (N, Tc, dim)

    targets, _ = _pad([requests[i].continuation for i in order], tail_tokens.shape[1])
    tail_valid = tail_valid.to(device)
    logprobs, greedy = token_logprobs(model, hidden[tail_valid], targets.to(device)[tail_valid])
    counts = tail_valid.sum(1).tolist()
    out, start = {}, 0
    for i, n in zip(order, counts):
        out[i] = (float(logprobs[start:start + n].sum()), bool(greedy[start:start + n].all()))
        start += n
    return out


def token_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (M, dim), targets (M,) -> log p(target) (M,) in fp32 and whether target is the argmax (M,)."""
    logprobs, greedy = [], []
    for start in range(0, hidden.shape[0], HEAD_CHUNK):
        logits = model.lm_head(hidden[start:start + HEAD_CHUNK]).float()  # (m, V)
        t = targets[start:start + HEAD_CHUNK]
        logprobs.append(logits.log_softmax(-1).gather(-1, t[:, None])[:, 0])
        greedy.append(logits.argmax(-1) == t)
    if not logprobs:
        return torch.zeros(0), torch.zeros(0, dtype=torch.bool)
    return torch.cat(logprobs), torch.cat(greedy)


def loglikelihood_tokens(model, requests: Sequence[TokenRequest], *, max_len: int, batch_tokens: int = 2048,
                         on_batch: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """Score every request; on_batch(n) is told how many requests each finished batch covered."""
    for r in requests:
        if not r.context or not r.continuation:
            raise ValueError("a log-likelihood request needs a non-empty context and continuation")
    requests = [truncate(r, max_len) for r in requests]
    results: dict[int, tuple[float, bool]] = {}
    for groups in plan_batches(requests, batch_tokens):
        results.update(score_batch(model, requests, groups))
        if on_batch is not None:
            on_batch(sum(map(len, groups)))
    return [results[i] for i in range(len(requests))]
