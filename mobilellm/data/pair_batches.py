"""DPO batches: preference pairs packed into rows, each pair's two sequences side by side as documents of their own.

A pair is prompt + chosen and prompt + rejected, rendered with the chat template (`chat.render`, the completion's
tokens learned). Both sequences of a pair go into the same row, so a micro-batch always holds whole pairs, and
rows hold as many pairs as fit (`rows.PackPlan`); document masks keep every sequence to itself, so packing
changes no log-probability (TRL's DPOTrainer pads one pair per row instead). A batch carries, besides the usual
`tokens`, `targets` (the completions' tokens), `positions` and `doc_ids`:
- `sequence` (B, T): at each target position, 2 j + side for pair j of the micro-batch (side 0 chosen, 1 rejected),
  -1 elsewhere: a loss sums token log-probs per sequence with it;
- `ref_logps` (B, T) float, once reference log-probabilities are attached (`set_reference`): each sequence's summed
  reference log-probability at its first target position, 0 elsewhere.

A pair longer than a row is truncated (the longer side first, neither below half a row) or dropped (`overflow`);
a pair left without a completion token on either side is dropped. The counts go into the run's data report.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .batch_source import BatchLayout, BatchSource, BuiltBatches
from .chat import ChatDataError, Rendered, read_pairs, render
from .chat_batches import (check_overflow, check_packing_masks, chat_tokenizer, file_sha256, learns_something,
                           masked_row)
from .packing import IGNORE_INDEX, collate
from .rows import PackPlan, RowStream

Pair = tuple[Rendered, Rendered]  # (chosen, rejected)


def cut(example: Rendered, length: int) -> Rendered:
    return Rendered(example.tokens[:length], example.learned[:length])


def fit_pair(pair: Pair, capacity: int, overflow: str) -> tuple[Pair | None, bool]:
    """(the pair within `capacity` tokens, or None when dropped; whether it was cut)."""
    chosen, rejected = pair
    a, b = len(chosen.tokens), len(rejected.tokens)
    if a + b <= capacity:
        return pair, False
    if overflow == "drop":
        return None, False
    half = capacity // 2
    if min(a, b) <= half:  # the shorter side stays whole, the longer takes the rest
        a, b = (a, capacity - a) if a <= b else (capacity - b, b)
    else:
        a, b = capacity - half, half
    return (cut(chosen, a), cut(rejected, b)), True


def pair_row(pairs: list[Pair], capacity: int, reference: np.ndarray | None) -> dict[str, np.ndarray]:
    """One row: chosen_0, rejected_0, chosen_1, ... as documents; `reference` (len(pairs), 2) summed log-probs."""
    row = masked_row([side for pair in pairs for side in pair], capacity)
    target = row["targets"] != IGNORE_INDEX
    row["sequence"] = np.where(target, row["doc_ids"], -1)  # segment k is pair k // 2, side k % 2
    if reference is not None:
        ids, first = np.unique(row["sequence"], return_index=True)  # each sequence's first target position
        row["ref_logps"] = np.zeros(len(target), dtype=np.float32)
        row["ref_logps"][first[ids >= 0]] = reference.reshape(-1)[ids[ids >= 0]]
    return row


def collate_pairs(rows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Rows into a micro-batch, the pairs numbered through it (row after row)."""
    offset, numbered = 0, []
    for row in rows:
        sequence = row["sequence"]
        numbered.append({**row, "sequence": np.where(sequence >= 0, sequence + offset, -1)})
        offset += int(sequence.max()) + 1 if (sequence >= 0).any() else 0
    return collate(numbered)


def pairs_in(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Pairs in a micro-batch (sequences are numbered 0, 1, ... 2P - 1 through it)."""
    return (batch["sequence"].max() + 1) // 2


class PairBatches(RowStream):
    """The global stream of packed pairs, plus what computing per-pair values once needs (`every_pair`)."""

    def __init__(self, pairs: list[Pair], plan: PackPlan, capacity: int, setting: dict, **layout):
        super().__init__(self._row, setting, collate_rows=collate_pairs, **layout)
        self.pairs, self.plan, self.capacity = pairs, plan, capacity
        self.reference: np.ndarray | None = None  # (pairs, 2) summed reference log-probs, once attached

    def _row(self, i: int) -> dict[str, np.ndarray]:
        indices = self.plan.row(i)
        reference = None if self.reference is None else self.reference[indices]
        return pair_row([self.pairs[j] for j in indices], self.capacity, reference)

    def every_pair(self, rows_per_batch: int) -> Iterator[tuple[dict[str, torch.Tensor], np.ndarray]]:
        """Every pair once, packed in file order: (micro-batch, the dataset index of each of its pairs)."""
        lengths = np.array([len(c.tokens) + len(r.tokens) for c, r in self.pairs])
        rows = PackPlan(lengths, self.capacity, 0, packing=self.plan.packing, shuffle=False).epoch_rows(0)
        for start in range(0, len(rows), rows_per_batch):
            chunk = rows[start:start + rows_per_batch]
            batch = collate_pairs([pair_row([self.pairs[j] for j in row], self.capacity, None) for row in chunk])
            yield batch, np.array([j for row in chunk for j in row])

    def set_reference(self, values: np.ndarray) -> None:
        """Attach summed reference log-probs (pairs, 2): batches carry them as `ref_logps` from now on."""
        if values.shape != (len(self.pairs), 2):
            raise ValueError(f"reference log-probs of shape {values.shape} for {len(self.pairs)} pairs")
        self.reference = values.astype(np.float32)


@dataclass(frozen=True)
class PreferenceData(BatchSource):
    """Preference pairs (prompt/chosen/rejected JSONL) for DPO, packed pair by pair."""

    kind = "pairs"
    path: str
    packing: bool = True  # False: one pair per row, padded
    overflow: str = "truncate"  # a pair longer than a row: "truncate" or "drop"

    def check(self, recipe) -> None:
        check_overflow(self.overflow)
        check_packing_masks(recipe, self.packing)
        if recipe.train.eval_every:
            raise ValueError(f"recipe {recipe.name!r}: the loop's validation loss is a CE and preference pairs have "
                             "no single target; set eval_every to 0 and read reward_accuracy in metrics.jsonl")

    def build(self, layout: BatchLayout, tokenizer, vocab_size, val_batches):
        tokenizer = chat_tokenizer(self.path, tokenizer, vocab_size)
        pairs_read = read_pairs(self.path)
        sides = render(tokenizer, [c for pair in pairs_read for c in pair.conversations()])
        capacity = layout.seq_len + 1
        pairs, report = [], {"pairs": len(pairs_read), "truncated": 0, "dropped_too_long": 0,
                             "dropped_nothing_to_learn": 0}
        for pair in zip(sides[0::2], sides[1::2]):
            kept, was_cut = fit_pair(pair, capacity, self.overflow)
            report["truncated"] += was_cut
            if kept is None:
                report["dropped_too_long"] += 1
            elif not all(learns_something(side) for side in kept):
                report["dropped_nothing_to_learn"] += 1
            else:
                pairs.append(kept)
        if not pairs:
            raise ChatDataError(f"{self.path}: no preference pair left to train on ({report})")
        plan = PackPlan(np.array([len(c.tokens) + len(r.tokens) for c, r in pairs]), capacity, layout.seed,
                        packing=self.packing)
        report.update(trained_pairs=len(pairs), rows_per_epoch=len(plan.epoch_rows(0)))
        setting = {"data_sha256": file_sha256(self.path), "seq_len": layout.seq_len, "seed": layout.seed,
                   "packing": self.packing, "overflow": self.overflow}
        loader = PairBatches(pairs, plan, capacity, setting, global_batch_size=layout.global_batch_rows,
                             grad_accum=layout.grad_accum, rank=layout.rank, world_size=layout.world_size)
        return BuiltBatches(loader, None, report)
