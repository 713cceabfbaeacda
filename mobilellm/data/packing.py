"""Packing documents into fixed windows of seq_len + 1 tokens, with per-document positions and ids.

A row is a window of T + 1 tokens cut from documents laid end to end; inputs are its first T tokens,
targets its last T. Each document (or the part of one that starts the row, when a document runs over
a row's end) is a *segment*: positions restart at 0 and the segment gets the next id, so attention
never crosses segments (see mobilellm.attention.attention_mask) and no target belongs to another
document: where the next token starts a new segment the target is IGNORE_INDEX. The model sees
exactly what it would see running each segment alone.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import numpy as np
import torch

IGNORE_INDEX = -100
PAD = -1  # marks filler tokens in a window (the end of a finite stream): never a target
# How documents share a row: "documents" masks each to itself (window_example's default), "window" makes the
# row one causal sequence (mask_documents=False).
PACKINGS = ("documents", "window")


def window_example(segments: list[np.ndarray], mask_documents: bool = True) -> dict[str, np.ndarray]:
    """One packed row from segments whose lengths sum to T + 1; each array of the result is (T,).

    mask_documents=False packs GPT-style instead: the row is one causal sequence (positions 0..T-1,
    one doc id, EOS -> next document is a target), as phase-2 long-window training wants.
    """
    lengths = [len(s) for s in segments]
    window = np.concatenate([np.asarray(s, dtype=np.int64) for s in segments])  # (T + 1,)
    if mask_documents:
        seg_id = np.repeat(np.arange(len(segments)), lengths)
    else:  # only the padding tail of a finite stream stands apart
        seg_id = (window == PAD).astype(np.int64)
    index = np.arange(window.size)
    starts_here = np.concatenate([[True], seg_id[1:] != seg_id[:-1]])
    position = index - np.maximum.accumulate(np.where(starts_here, index, 0))
    same_doc = (seg_id[1:] == seg_id[:-1]) & (window[1:] != PAD)
    return {
        "tokens": np.where(window[:-1] == PAD, 0, window[:-1]),
        "targets": np.where(same_doc, window[1:], IGNORE_INDEX),
        "positions": position[:-1],
        "doc_ids": seg_id[:-1],
    }


def collate(examples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack rows into the batch the model and losses read: int64 tensors (B, T) (float arrays, such as
    cached reference log-probabilities, as float32)."""
    stacked = {key: np.stack([e[key] for e in examples]) for key in examples[0]}
    return {key: torch.from_numpy(a.astype(np.float32 if a.dtype.kind == "f" else np.int64))
            for key, a in stacked.items()}


Draw = Callable[[], tuple[Hashable, np.ndarray] | None]  # -> (document key, its tokens), None when exhausted


class Packer:
    """Fills rows from a stream of documents, carrying the rest of a cut document into the next row."""

    def __init__(self, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        self.seq_len = seq_len
        self.pending: tuple[Hashable, np.ndarray, int] | None = None  # (key, document, tokens already used)

    def next_row(self, draw: Draw) -> list[np.ndarray] | None:
        """Segments of the next row (T + 1 tokens), padded with PAD once `draw` runs dry; None if empty."""
        need, segments = self.seq_len + 1, []
        while need > 0:
            if self.pending is None:
                drawn = draw()
                if drawn is None:
                    break
                self.pending = (drawn[0], drawn[1], 0)
            key, doc, used = self.pending
            piece = doc[used:used + need]
            segments.append(piece)
            need -= len(piece)
            self.pending = (key, doc, used + len(piece)) if used + len(piece) < len(doc) else None
        if not segments:
            return None
        if need > 0:
            segments.append(np.full(need, PAD, dtype=np.int64))
        return segments

    def state_dict(self) -> dict:
        if self.pending is None:
            return {"pending": None}
        key, _, used = self.pending
        return {"pending": {"key": list(key) if isinstance(key, tuple) else key, "used": used}}

    def load_state_dict(self, state: dict, fetch: Callable[[Hashable], np.ndarray]) -> None:
        pending = state["pending"]
        if pending is None:
            self.pending = None
        else:
            key = tuple(pending["key"]) if isinstance(pending["key"], list) else pending["key"]
            self.pending = (key, fetch(key), pending["used"])
