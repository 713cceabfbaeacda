"""Sampling documents from several domains with fixed weights, packed into training batches.

Every choice is a pure function of (seed, rank, a counter), so the whole stream is reproducible and
the loader's state is a handful of counters: a loader restored from `state_dict()` yields exactly the
batches the uninterrupted one would.

Data parallelism: each domain's documents are dealt once into `world_size` disjoint parts (a seeded
permutation, part r = every world_size-th document), and rank r only ever draws from part r, in a fresh
order each epoch of that part; domain choices are seeded per rank. Streams of different ranks never
share a document.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator

import numpy as np
import torch

from .packing import Packer, collate, window_example
from .shards import DocumentStore, TokenDataset
from .sources import DataError

_CHOICE_BLOCK = 4096  # domain choices are generated this many at a time


def normalize_weights(weights: dict[str, float], known: list[str]) -> dict[str, float]:
    """Weights scaled to sum to 1; unknown domains, negative or non-finite weights are errors."""
    unknown = sorted(set(weights) - set(known))
    if unknown:
        raise DataError(f"unknown domain(s) {', '.join(unknown)} in the mixture; known: {', '.join(known)}")
    for name, w in weights.items():
        if not math.isfinite(w) or w < 0:
            raise DataError(f"weight of domain {name!r} must be a finite number >= 0, got {w}")
    total = sum(weights.values())
    if total <= 0:
        raise DataError("the mixture weights sum to 0: give at least one domain a positive weight")
    return {name: w / total for name, w in sorted(weights.items()) if w > 0}


def _domain_seed(name: str) -> int:
    return zlib.crc32(name.encode())  # stable across runs, unlike hash()


class RankDocuments:
    """One domain's documents owned by one rank, in a seeded order that changes every epoch."""

    def __init__(self, store: DocumentStore, name: str, seed: int, rank: int, world_size: int):
        self.store, self.key = store, [seed, _domain_seed(name), rank]
        dealt = np.random.default_rng([seed, _domain_seed(name)]).permutation(len(store))
        self.owned = dealt[rank::world_size]  # this rank's documents
        if len(self.owned) == 0:
            raise DataError(f"domain {name!r} has {len(store)} documents: too few for {world_size} ranks")
        self._epoch, self._order = -1, None

    def index(self, n: int) -> int:
        """Document index of this rank's n-th draw from the domain."""
        epoch, i = divmod(n, len(self.owned))
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([*self.key, epoch]).permutation(len(self.owned))
        return int(self.owned[self._order[i]])


class DomainSampler:
    """Draws (domain, document) pairs: the domain by weight, then that domain's next document."""

    def __init__(self, dataset: TokenDataset, weights: dict[str, float], *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, split: str = "train"):
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.weights = normalize_weights(weights, dataset.domains)
        self.names = list(self.weights)
        self.probs = np.array([self.weights[n] for n in self.names])
        self.seed, self.rank = seed, rank
        self.docs = {n: RankDocuments(dataset.documents(n, split), n, seed, rank, world_size) for n in self.names}
        self.draws = 0
        self.drawn = {n: 0 for n in self.names}
        self._block, self._choices = -1, None

    def _domain(self, draw: int) -> str:
        block, i = divmod(draw, _CHOICE_BLOCK)
        if block != self._block:
            rng = np.random.default_rng([self.seed, self.rank, block])
            self._block, self._choices = block, rng.choice(len(self.names), size=_CHOICE_BLOCK, p=self.probs)
        return self.names[self._choices[i]]

    def draw(self) -> tuple[tuple[str, int], np.ndarray]:
        name = self._domain(self.draws)
        index = self.docs[name].index(self.drawn[name])
        self.draws += 1
        self.drawn[name] += 1
        return (name, index), self.fetch((name, index))

    def fetch(self, key: tuple[str, int]) -> np.ndarray:
        return self.docs[key[0]].store.document(key[1])

    def state_dict(self) -> dict:
        return {"draws": self.draws, "drawn": dict(self.drawn)}

    def load_state_dict(self, state: dict) -> None:
        self.draws, self.drawn = state["draws"], {n: state["drawn"].get(n, 0) for n in self.names}


class MixtureLoader:
    """Endless training batches: dicts of int64 tensors `tokens`, `targets`, `positions`, `doc_ids` (B, T).

    `model(batch["tokens"], batch["positions"], batch["doc_ids"])` gives logits whose cross-entropy
    against batch["targets"] (ignore_index=-100) is the loss.
    """

    def __init__(self, dataset: TokenDataset, weights: dict[str, float], *, seq_len: int, batch_size: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        self.sampler = DomainSampler(dataset, weights, seed=seed, rank=rank, world_size=world_size)
        self.packer = Packer(seq_len)
        self.batch_size = batch_size
        self.batches = 0
        self.setting = {"seq_len": seq_len, "seed": seed, "rank": rank, "world_size": world_size,
                        "weights": self.sampler.weights}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = [window_example(self.packer.next_row(self.sampler.draw)) for _ in range(self.batch_size)]
        self.batches += 1
        return collate(rows)

    def state_dict(self) -> dict:
        """JSON-serialisable position in the stream (a few counters)."""
        return {"setting": self.setting, "batches": self.batches, "sampler": self.sampler.state_dict(),
                "packer": self.packer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        saved = state["setting"]
        if saved != self.setting:
            changed = sorted(k for k in self.setting if saved.get(k) != self.setting[k])
            raise DataError(f"loader state was saved with other settings ({', '.join(changed)}): "
                            f"saved {[saved.get(k) for k in changed]}, now {[self.setting[k] for k in changed]}")
        self.batches = state["batches"]
        self.sampler.load_state_dict(state["sampler"])
        self.packer.load_state_dict(state["packer"], self.sampler.fetch)


def validation_batches(dataset: TokenDataset, *, seq_len: int, batch_size: int, domains: list[str] | None = None,
                       rank: int = 0, world_size: int = 1, max_batches: int | None = None
                       ) -> Iterator[dict[str, torch.Tensor]]:
    """The held-out documents, in stored order, packed like training batches: fixed and finite.

    Row i goes to rank i % world_size; the last row is padded (targets -100) and the last batch may be
    smaller. Pass `domains` to measure one domain at a time.
    """
    domains = dataset.domains if domains is None else domains
    stores = [(name, dataset.documents(name, "val")) for name in domains]
    if sum(len(s) for _, s in stores) == 0:
        raise DataError(f"no validation documents in {', '.join(domains)} of {dataset.folder} "
                        "(tokenized with --val-fraction 0?)")
    keys = iter([(name, i) for name, store in stores for i in range(len(store))])
    by_name = dict(stores)

    def draw():
        key = next(keys, None)
        return None if key is None else (key, by_name[key[0]].document(key[1]))

    packer, rows, row_index, yielded = Packer(seq_len), [], 0, 0
    while max_batches is None or yielded < max_batches:
        segments = packer.next_row(draw)
        if segments is None:
            break
        if row_index % world_size == rank:
            rows.append(window_example(segments))
        row_index += 1
        if len(rows) == batch_size:
            yield collate(rows)
            rows, yielded = [], yielded + 1
    if rows and (max_batches is None or yielded < max_batches):
        yield collate(rows)
