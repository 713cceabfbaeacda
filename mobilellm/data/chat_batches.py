"""SFT batches: chat conversations packed into rows with document masks, loss on the assistant's tokens only.

A row holds whole conversations (`rows.PackPlan`), each a document of its own: positions restart at 0 and
`doc_ids` keep attention inside it, so a packed row gives each conversation exactly the logits it gets alone.
A target is the next token where that token is the assistant's (`chat.render`), IGNORE_INDEX elsewhere, so
plain CE (or KD on the same positions) learns the assistant turns only.

A conversation longer than a row (seq_len + 1 tokens) is truncated to its first seq_len + 1 tokens, or dropped
(`overflow`); one left with no assistant token to learn is dropped. The counts go into the run's data report.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..tokenizer import Tokenizer
from .batch_source import BatchLayout, BatchSource, BuiltBatches
from .chat import ChatDataError, Rendered, read_conversations, render
from .packing import IGNORE_INDEX, PAD, window_example
from .rows import PackPlan, RowStream, validation_rows

OVERFLOW = ("truncate", "drop")


def file_sha256(path: str | Path) -> str:
    """A data file's content hash: a loader's saved state continues only the same data."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fit(example: Rendered, capacity: int, overflow: str) -> tuple[Rendered | None, bool]:
    """(the example cut to `capacity` tokens, or None when dropped; whether it was cut)."""
    if len(example.tokens) <= capacity:
        return example, False
    if overflow == "drop":
        return None, False
    return Rendered(example.tokens[:capacity], example.learned[:capacity]), True


def learns_something(example: Rendered) -> bool:
    return bool(example.learned[1:].any())  # the first token is never a target


def masked_row(segments: list[Rendered], capacity: int) -> dict[str, np.ndarray]:
    """One packed row of `capacity` tokens: each segment a document, targets only on learned tokens."""
    pad = capacity - sum(len(s.tokens) for s in segments)
    tokens = [s.tokens for s in segments] + ([np.full(pad, PAD, dtype=np.int64)] if pad else [])
    learned = np.concatenate([s.learned for s in segments] + [np.zeros(pad, dtype=bool)])
    row = window_example(tokens)
    row["targets"] = np.where(learned[1:], row["targets"], IGNORE_INDEX)
    return row


def empty_row(capacity: int) -> dict[str, np.ndarray]:
    return window_example([np.full(capacity, PAD, dtype=np.int64)])


def chat_tokenizer(path: str, tokenizer: Tokenizer | None, vocab_size: int) -> Tokenizer:
    """The run's tokenizer, which chat data needs (its chat template), checked against the model."""
    if tokenizer is None:
        raise ChatDataError(f"chat data {path} needs the run's tokenizer and its chat template: the checkpoint has no "
                            "tokenizer.json; name a tokenizer folder in the recipe")
    tokenizer.check_fits(vocab_size)
    return tokenizer


def rendered_file(path: str, tokenizer: Tokenizer | None, vocab_size: int) -> list[Rendered]:
    return render(chat_tokenizer(path, tokenizer, vocab_size), read_conversations(path))


def check_overflow(overflow: str) -> None:
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {', '.join(OVERFLOW)}, got {overflow!r}")


def check_packing_masks(recipe, packing: bool) -> None:
    """Packed examples stay apart only through document masks."""
    if packing and not recipe.train.document_masking:
        raise ValueError(f"recipe {recipe.name!r} packs examples into rows: keep document_masking on, or turn "
                         "packing off, so that examples never attend to each other")


@dataclass(frozen=True)
class ChatData(BatchSource):
    """Conversations (`messages` or prompt/completion JSONL) for SFT: assistant-only targets, packed."""

    path: str
    val_path: str | None = None  # held-out conversations for the loop's validation loss
    packing: bool = True  # False: one conversation per row, padded
    overflow: str = "truncate"  # a conversation longer than a row: "truncate" or "drop"

    def check(self, recipe) -> None:
        check_overflow(self.overflow)
        check_packing_masks(recipe, self.packing)

    def build(self, layout: BatchLayout, tokenizer, vocab_size, val_batches):
        capacity = layout.seq_len + 1
        examples, report = [], {"examples": 0, "truncated": 0, "dropped_too_long": 0, "dropped_nothing_to_learn": 0}
        for example in rendered_file(self.path, tokenizer, vocab_size):
            report["examples"] += 1
            kept, cut = fit(example, capacity, self.overflow)
            report["truncated"] += cut
            if kept is None:
                report["dropped_too_long"] += 1
            elif not learns_something(kept):
                report["dropped_nothing_to_learn"] += 1
            else:
                examples.append(kept)
        if not examples:
            raise ChatDataError(f"{self.path}: no conversation left to train on ({report})")
        plan = PackPlan(np.array([len(e.tokens) for e in examples]), capacity, layout.seed, packing=self.packing)
        report.update(trained_examples=len(examples), learned_tokens=int(sum(e.learned[1:].sum() for e in examples)),
                      rows_per_epoch=len(plan.epoch_rows(0)))
        setting = {"data_sha256": file_sha256(self.path), "seq_len": layout.seq_len, "seed": layout.seed,
                   "packing": self.packing, "overflow": self.overflow}
        loader = RowStream(lambda i: masked_row([examples[j] for j in plan.row(i)], capacity), setting,
                           global_batch_size=layout.global_batch_rows, grad_accum=layout.grad_accum,
                           rank=layout.rank, world_size=layout.world_size)
        return BuiltBatches(loader, self._validation(layout, tokenizer, vocab_size, val_batches), report)

    def _validation(self, layout, tokenizer, vocab_size, val_batches):
        if val_batches is None or self.val_path is None:
            return None
        capacity = layout.seq_len + 1
        examples = [kept for e in rendered_file(self.val_path, tokenizer, vocab_size)
                    if (kept := fit(e, capacity, "truncate")[0]) is not None and learns_something(kept)]
        if not examples:
            raise ChatDataError(f"{self.val_path}: no validation conversation with an assistant token to score")
        plan = PackPlan(np.array([len(e.tokens) for e in examples]), capacity, 0, packing=self.packing, shuffle=False)
        rows = [masked_row([examples[j] for j in row], capacity) for row in plan.epoch_rows(0)]
        return validation_rows(rows, layout.micro_rows, val_batches, layout.rank, layout.world_size,
                               empty_row(capacity))
