"""Sampling documents from several domains with fixed weights, packed into training batches.

Every choice is a pure function of (seed, a counter), so the whole stream is reproducible and the
loader's state is a handful of counters: a loader restored from `state_dict()` yields exactly the
batches the uninterrupted one would.

Data parallelism: there is one global stream of windows, the same on every process (domain choices,
each domain's document order per epoch, packing). Each optimizer step takes the next *global batch* of
`global_batch_size` windows; of it, process r of W takes the contiguous rows
[r * G/W, (r + 1) * G/W), cut into `grad_accum` micro-batches of G / (W * grad_accum) rows, in order.
So the windows an optimizer step sees, and the saved state (counters of the global stream), do not
depend on the number of processes or micro-batches: a run checkpointed on 2 processes resumes on 1 or 4
and sees exactly the windows the uninterrupted run would have. Every process packs the whole global
batch, but packing only slices the memory-mapped shards; tokens are read for its own rows alone.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .packing import PAD, Packer, collate, window_example
from .shards import DocumentStore, TokenDataset
from .sources import DataError

_CHOICE_BLOCK = 4096  # domain choices are generated this many at a time


def normalize_weights(weights: dict[str, float], known: list[str]) -> dict[str, float]:
    """Weights scaled to sum to 1; unknown domains, negative or non-finite weights are errors."""
    unknown = sorted(set(weights) - set(known))
    if unknown:
        raise DataError(f"unknown domain(s) {', '.join(unknown)} in the mixture; known: {', '.join(known)} (tokenize "
                        "the missing domains into the shard folder too, or weight only the domains it has)")
    for name, w in weights.items():
        if not math.isfinite(w) or w < 0:
            raise DataError(f"weight of domain {name!r} must be a finite number >= 0, got {w}")
    total = sum(weights.values())
    if total <= 0:
        raise DataError("the mixture weights sum to 0: give at least one domain a positive weight")
    return {name: w / total for name, w in sorted(weights.items()) if w > 0}


def _domain_seed(name: str) -> int:
    return zlib.crc32(name.encode())  # stable across runs, unlike hash()


@dataclass(frozen=True)
class DocLengths:
    """Which documents a stream draws, by length in tokens: shorter than `min_tokens` dropped (long-document
    data), longer than `max_tokens` cut into pieces of that many tokens, each drawn as a document of its own
    (short-document data: phase 2 packs the phase-1-length pieces of unrelated documents into one window)."""

    min_tokens: int | None = None
    max_tokens: int | None = None

    def __post_init__(self):
        for name in ("min_tokens", "max_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise DataError(f"{name} must be a positive number of tokens, got {value!r}")

    def setting(self) -> dict:
        """For a loader's saved setting: empty when every document is drawn whole (the default)."""
        return {} if self == DocLengths() else {"doc_lengths": [self.min_tokens, self.max_tokens]}


class DocumentPieces:
    """A domain's documents seen through `DocLengths`: piece i is a slice of one stored document."""

    def __init__(self, store: DocumentStore, lengths: DocLengths):
        self.store = store
        sizes = np.concatenate([np.diff(o) for o in store.offsets]) if store.offsets else np.zeros(0, np.int64)
        kept = np.flatnonzero(sizes >= (lengths.min_tokens or 1))
        step = lengths.max_tokens or max(int(sizes.max(initial=1)), 1)
        counts = -(-sizes[kept] // step)  # ceil: pieces per kept document
        self.doc = np.repeat(kept, counts)  # (pieces,)
        self.start = (np.arange(len(self.doc)) - np.repeat(np.cumsum(counts) - counts, counts)) * step
        self.end = np.minimum(self.start + step, sizes[self.doc])

    def __len__(self) -> int:
        return len(self.doc)

    def document(self, index: int) -> np.ndarray:
        return self.store.document(int(self.doc[index]))[int(self.start[index]):int(self.end[index])]


class ShuffledDocuments:
    """One domain's documents in a seeded order that changes every epoch."""

    def __init__(self, store: DocumentStore | DocumentPieces, name: str, seed: int):
        if len(store) == 0:
            raise DataError(f"domain {name!r} has no documents in this split"
                            + (" of the requested length (leave it out of the domain weights)"
                               if isinstance(store, DocumentPieces) else ""))
        self.store, self.key = store, [seed, _domain_seed(name)]
        self._epoch, self._order = -1, None

    def index(self, n: int) -> int:
        """Document index of the domain's n-th draw."""
        epoch, i = divmod(n, len(self.store))
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([*self.key, epoch]).permutation(len(self.store))
        return int(self._order[i])


class DomainSampler:
    """Draws (domain, document) pairs: the domain by weight, then that domain's next document."""

    def __init__(self, dataset: TokenDataset, weights: dict[str, float], *, seed: int = 0, split: str = "train",
                 lengths: DocLengths = DocLengths()):
        self.weights = normalize_weights(weights, dataset.domains)
        self.names = list(self.weights)
        self.probs = np.array([self.weights[n] for n in self.names])
        self.seed = seed

        def store(name):
            whole = dataset.documents(name, split)
            return whole if lengths == DocLengths() else DocumentPieces(whole, lengths)

        self.docs = {n: ShuffledDocuments(store(n), n, seed) for n in self.names}
        self.draws = 0
        self.drawn = {n: 0 for n in self.names}
        self._block, self._choices = -1, None

    def _domain(self, draw: int) -> str:
        block, i = divmod(draw, _CHOICE_BLOCK)
        if block != self._block:
            rng = np.random.default_rng([self.seed, block])
            self._block, self._choices = block, rng.choice(len(self.names), size=_CHOICE_BLOCK, p=self.probs)
        return self.names[self._choices[i]]

    def draw(self) -> tuple[tuple[str, int], np.ndarray]:
        """The next document: its key and its tokens, a memory-mapped view (nothing is read until used)."""
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


def check_layout(global_batch_size: int, grad_accum: int, rank: int, world_size: int, unit: str = "windows") -> None:
    """A global batch must split evenly over the processes and each process's micro-batches."""
    if not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if global_batch_size < 1 or grad_accum < 1:
        raise DataError(f"global_batch_size ({global_batch_size}) and grad_accum ({grad_accum}) must be at least 1")
    if global_batch_size % (world_size * grad_accum):
        raise DataError(f"a global batch of {global_batch_size} {unit} does not split evenly over {world_size} "
                        f"process(es) x {grad_accum} micro-batch(es) (needs a multiple of {world_size * grad_accum})")


def check_setting(saved: dict, setting: dict) -> None:
    """A saved stream position continues only the stream it was saved from."""
    if saved != setting:
        changed = sorted(k for k in setting if saved.get(k) != setting[k])
        raise DataError(f"loader state was saved with other settings ({', '.join(changed)}): "
                        f"saved {[saved.get(k) for k in changed]}, now {[setting[k] for k in changed]}")


def check_partial(partial: dict | None, layout: dict) -> None:
    """A state saved in the middle of a global batch resumes only on the batch layout that saved it."""
    if partial is not None and {k: partial[k] for k in layout} != layout:
        raise DataError(f"loader state was saved in the middle of a global batch (micro-batch {partial['micro']} "
                        f"of {partial['grad_accum']} on {partial['world_size']} process(es)): it resumes only with "
                        "the same batch layout; another one needs a state saved between optimizer steps")


class MixtureLoader:
    """Endless training micro-batches: dicts of int64 tensors `tokens`, `targets`, `positions`, `doc_ids` (B, T).

    `global_batch_size` windows per optimizer step over all processes; each `next()` gives this process's
    next micro-batch, B = global_batch_size / (world_size * grad_accum) rows, so `grad_accum` calls make
    its share of one step. `model(batch["tokens"], batch["positions"], batch["doc_ids"])` gives logits
    whose cross-entropy against batch["targets"] (ignore_index=-100) is the loss.
    mask_documents=False: see window_example; `lengths`: which documents are drawn (see DocLengths).
    """

    def __init__(self, dataset: TokenDataset, weights: dict[str, float], *, seq_len: int, global_batch_size: int,
                 grad_accum: int = 1, seed: int = 0, rank: int = 0, world_size: int = 1, mask_documents: bool = True,
                 lengths: DocLengths = DocLengths()):
        check_layout(global_batch_size, grad_accum, rank, world_size)
        self.sampler = DomainSampler(dataset, weights, seed=seed, lengths=lengths)
        self.packer = Packer(seq_len)
        self.global_batch_size, self.grad_accum = global_batch_size, grad_accum
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size = global_batch_size // (world_size * grad_accum)
        self.mask_documents = mask_documents
        self.windows = 0  # windows of the global stream in completed global batches
        self._micro = 0  # micro-batches of the current global batch already given out
        self._rows: list[dict[str, np.ndarray]] | None = None  # this process's rows of the current global batch
        self._batch_start: dict | None = None  # stream position where the current global batch began
        self.setting = {"seq_len": seq_len, "seed": seed, "weights": self.sampler.weights,
                        "mask_documents": mask_documents, **lengths.setting()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._rows is None:
            self._batch_start = self._position()
            self._rows = self._pack_global_batch()
        m = self.micro_batch_size
        batch = collate(self._rows[self._micro * m:(self._micro + 1) * m])
        self._micro += 1
        if self._micro == self.grad_accum:  # this process's share of the global batch is done
            self._rows, self._micro = None, 0
            self.windows += self.global_batch_size
        return batch

    def _pack_global_batch(self) -> list[dict[str, np.ndarray]]:
        """Packs all rows of the next global batch (every process alike) and builds only this process's."""
        share = self.global_batch_size // self.world_size
        mine = range(self.rank * share, (self.rank + 1) * share)
        rows = []
        for row in range(self.global_batch_size):
            segments = self.packer.next_row(self.sampler.draw)  # (T + 1,) in memory-mapped pieces
            if row in mine:
                rows.append(window_example(segments, self.mask_documents))
        return rows

    def _position(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "packer": self.packer.state_dict()}

    def _layout(self) -> dict:
        return {"global_batch_size": self.global_batch_size, "world_size": self.world_size,
                "grad_accum": self.grad_accum}

    def state_dict(self) -> dict:
        """JSON-serialisable position in the global stream (a few counters), the same on every process.

        Between optimizer steps it depends on nothing but the stream; in the middle of a global batch it
        points at the batch's start and records how far this layout of processes had got.
        """
        if self._rows is None:
            return {"setting": self.setting, "windows": self.windows, **self._position(), "partial": None}
        return {"setting": self.setting, "windows": self.windows, **self._batch_start,
                "partial": {"micro": self._micro, **self._layout()}}

    def load_state_dict(self, state: dict) -> None:
        missing = sorted({"setting", "partial", "windows", "sampler"} - set(state))
        if missing:
            raise DataError(f"loader state lacks {', '.join(missing)}: it was saved by an older mobilellm, whose "
                            "per-process data streams cannot be continued; restart the data stream")
        check_setting(state["setting"], self.setting)
        partial = state["partial"]
        check_partial(partial, self._layout())
        self.windows = state["windows"]
        self.sampler.load_state_dict(state["sampler"])
        self.packer.load_state_dict(state["packer"], self.sampler.fetch)
        self._rows, self._micro = None, 0
        if partial is not None:  # re-pack the interrupted global batch, skip what was given out
            self._batch_start = self._position()
            self._rows, self._micro = self._pack_global_batch(), partial["micro"]


def validation_batches(dataset: TokenDataset, *, seq_len: int, batch_size: int, domains: list[str] | None = None,
                       rank: int = 0, world_size: int = 1, max_batches: int | None = None,
                       mask_documents: bool = True, part: tuple[int, int] = (0, 1)) -> Iterator[dict[str, torch.Tensor]]:
    """The held-out documents packed like training batches, every domain in turn: fixed and finite.

    Each domain's documents are packed in stored order and the rows are dealt round-robin over the domains
    (`packed_rows`), so any first batches, however few, measure every domain with a held-out row left.
    Row i goes to rank i % world_size; each domain's last row is padded (targets -100) and every rank gets
    the same number of rows (a rank short of one gets a row of padding), so all ranks run the same number
    of batches; the last batch may be smaller. Pass `domains` to measure one domain at a time. `part=(k, n)`
    keeps the held-out documents whose index is k modulo n: disjoint parts for a search and its report.
    """
    domains = dataset.domains if domains is None else domains
    stores = [(name, dataset.documents(name, "val")) for name in domains]
    if sum(len(s) for _, s in stores) == 0:
        raise DataError(f"no validation documents in {', '.join(domains)} of {dataset.folder} "
                        "(tokenized with --val-fraction 0?)")
    k, n = part
    if not 0 <= k < n:
        raise ValueError(f"part must be (k, n) with 0 <= k < n, got {part}")
    if not any(i % n == k for _, s in stores for i in range(len(s))):
        raise DataError(f"part {k} of {n} of the validation documents of {', '.join(domains)} is empty")
    rows = packed_rows(stores, seq_len, rank, world_size, mask_documents, part)
    for count in itertools.count():
        if max_batches is not None and count >= max_batches:
            return
        batch = list(itertools.islice(rows, batch_size))
        if not batch:
            return
        yield collate(batch)


def packed_rows(stores: list[tuple[str, DocumentStore]], seq_len: int, rank: int = 0, world_size: int = 1,
                mask_documents: bool = True, part: tuple[int, int] = (0, 1)) -> Iterator[dict[str, np.ndarray]]:
    """Every document of `stores` (any objects with `len()` and `document(i)`) packed into rows of `seq_len`:
    each store's documents in order into its own rows, the rows dealt one store after another (round-robin; a
    store that runs out drops out). This process takes every `world_size`-th row (a short last round is padded
    for the ranks it misses)."""

    def store_rows(name, store):
        keys = iter([(name, i) for i in range(len(store)) if i % part[1] == part[0]])

        def draw():
            key = next(keys, None)
            return None if key is None else (key, store.document(key[1]))

        packer = Packer(seq_len)
        while (segments := packer.next_row(draw)) is not None:
            yield segments

    active = [store_rows(name, store) for name, store in stores]
    row_index = 0
    while active:
        for rows in list(active):
            segments = next(rows, None)
            if segments is None:
                active.remove(rows)
                continue
            if row_index % world_size == rank:
                yield window_example(segments, mask_documents)
            row_index += 1
    if row_index % world_size and rank >= row_index % world_size:  # the last round missed this rank
        yield window_example([np.full(seq_len + 1, PAD)], mask_documents)
