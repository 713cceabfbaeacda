"""Whole examples packed into rows, epoch by epoch, served as a global stream of micro-batches.

An SFT conversation or a DPO pair is never cut across rows (a completion without its prompt teaches nothing).
Each epoch the examples are shuffled, seeded by (seed, epoch), then packed block by block: within a block of
`PACK_BLOCK` examples, longest first, each goes into the first row with room (first-fit decreasing), and the
block's rows are shuffled again so long and short rows mix. The plan is a pure function of (lengths, seed,
epoch), so the stream is addressed by a row counter: global row i is the same on every process and after any
resume, and a loader's state is that counter.

The global stream is laid out as `MixtureLoader`'s: optimizer step k takes global rows [k G, (k + 1) G), and
process r of W its contiguous share, in `grad_accum` micro-batches of G / (W grad_accum) rows, in order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from .mixture import check_layout, check_partial, check_setting
from .packing import collate

PACK_BLOCK = 1024  # examples packed together: larger fills rows better, costs a little more per epoch


def pack_rows(lengths: np.ndarray, capacity: int, order: np.ndarray, rng: np.random.Generator | None,
              block: int = PACK_BLOCK) -> list[list[int]]:
    """Example indices per row (first-fit decreasing within blocks of `order`; rows shuffled by `rng` if given)."""
    rows: list[list[int]] = []
    for start in range(0, len(order), block):
        chunk = order[start:start + block]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        room = np.empty(len(chunk), dtype=np.int64)  # free tokens of each open row of the block
        packed: list[list[int]] = []
        for index in chunk.tolist():
            fits = np.flatnonzero(room[:len(packed)] >= lengths[index])
            if len(fits):
                packed[fits[0]].append(index)
                room[fits[0]] -= lengths[index]
            else:
                room[len(packed)] = capacity - lengths[index]
                packed.append([index])
        if rng is not None:
            packed = [packed[i] for i in rng.permutation(len(packed))]
        rows += packed
    return rows


class PackPlan:
    """Rows of every epoch: global row i -> the example indices it holds."""

    def __init__(self, lengths: np.ndarray, capacity: int, seed: int, *, packing: bool = True, shuffle: bool = True):
        if len(lengths) == 0:
            raise ValueError("nothing to pack: no examples")
        if lengths.max() > capacity:
            raise ValueError(f"an example of {lengths.max()} tokens does not fit a row of {capacity}")
        self.lengths, self.capacity, self.seed = np.asarray(lengths, dtype=np.int64), capacity, seed
        self.packing, self.shuffle = packing, shuffle
        self._starts = [0]  # first global row of each planned epoch, then the end of the last one
        self._epoch, self._rows = -1, []

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
            order = rng.permutation(len(self.lengths)) if rng is not None else np.arange(len(self.lengths))
            self._rows = (pack_rows(self.lengths, self.capacity, order, rng) if self.packing
                          else [[int(i)] for i in order])
            self._epoch = epoch
        return self._rows

    def row(self, i: int) -> list[int]:
        while i >= self._starts[-1]:  # plan epochs in order until one holds row i
            self._starts.append(self._starts[-1] + len(self.epoch_rows(len(self._starts) - 1)))
        epoch = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.epoch_rows(epoch)[i - self._starts[epoch]]


class RowStream:
    """Endless micro-batches over a global stream of rows; `row(i)` builds global row i (a dict of (T,) arrays).

    `setting` describes the stream (data, seq_len, seed...): a state saved under another setting is refused.
    """

    def __init__(self, row: Callable[[int], dict[str, np.ndarray]], setting: dict, *, global_batch_size: int,
                 grad_accum: int = 1, rank: int = 0, world_size: int = 1,
                 collate_rows: Callable[[list[dict]], dict[str, torch.Tensor]] = collate):
        check_layout(global_batch_size, grad_accum, rank, world_size, unit="rows")
        self.row, self.setting, self.collate_rows = row, setting, collate_rows
        self.global_batch_size, self.grad_accum = global_batch_size, grad_accum
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size = global_batch_size // (world_size * grad_accum)
        self.rows = 0  # global rows of completed global batches
        self.micro = 0  # micro-batches of the current global batch already given out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        m = self.micro_batch_size
        first = self.rows + self.rank * (self.global_batch_size // self.world_size) + self.micro * m
        batch = self.collate_rows([self.row(first + j) for j in range(m)])
        self.micro += 1
        if self.micro == self.grad_accum:
            self.rows, self.micro = self.rows + self.global_batch_size, 0
        return batch

    def _layout(self) -> dict:
        return {"global_batch_size": self.global_batch_size, "world_size": self.world_size,
                "grad_accum": self.grad_accum}

    def state_dict(self) -> dict:
        """The global row counter (the same on every process between optimizer steps)."""
        partial = {"micro": self.micro, **self._layout()} if self.micro else None
        return {"setting": self.setting, "rows": self.rows, "partial": partial}

    def load_state_dict(self, state: dict) -> None:
        check_setting(state["setting"], self.setting)
        check_partial(state["partial"], self._layout())
        self.rows = state["rows"]
        self.micro = state["partial"]["micro"] if state["partial"] else 0


def validation_rows(rows: list[dict[str, np.ndarray]], batch_size: int, max_batches: int | None, rank: int,
                    world_size: int, empty_row: dict[str, np.ndarray]) -> list[dict[str, torch.Tensor]]:
    """Row i to process i % world_size, every process the same number of rows (short ones get `empty_row`, which
    has no targets), in batches of `batch_size`; at most `max_batches` batches."""
    mine = rows[rank::world_size]
    if len(mine) < -(-len(rows) // world_size):
        mine = mine + [empty_row]
    batches = [collate(mine[i:i + batch_size]) for i in range(0, len(mine), batch_size)]
    return batches if max_batches is None else batches[:max_batches]
