"""A tiny in-memory batch source with the data pipeline's protocol, for tests and benchmarks.

Rows are arithmetic sequences modulo the vocabulary (random start and stride), so a model can learn
them and the loss falls. The stream is global, laid out like `mobilellm.data.MixtureLoader`'s: each
optimizer step draws a global batch of `batch_size` rows; process `rank` of `world_size` takes its
contiguous slice of it, in `grad_accum` micro-batches. The state (counters) is the same on every process.
"""

from __future__ import annotations

import torch


class SyntheticBatches:
    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, n_docs: int = 1, grad_accum: int = 1):
        if batch_size % (world_size * grad_accum):
            raise ValueError(f"global batch {batch_size} does not split over {world_size} processes x "
                             f"{grad_accum} micro-batches")
        self.vocab_size, self.batch_size, self.seq_len, self.seed = vocab_size, batch_size, seq_len, seed
        self.rank, self.world_size, self.grad_accum, self.n_docs = rank, world_size, grad_accum, n_docs
        self.step, self.micro = 0, 0  # global batches completed, micro-batches given out of the current one

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        B, T = self.batch_size, self.seq_len
        start = torch.randint(0, self.vocab_size, (B, 1), generator=g)
        stride = torch.randint(1, 4, (B, 1), generator=g)
        seq = (start + stride * torch.arange(T + 1)) % self.vocab_size  # (B, T+1)
        doc_len = -(-T // self.n_docs)
        doc_ids = (torch.arange(T) // doc_len).expand(B, T)
        positions = torch.arange(T) % doc_len
        micro = B // (self.world_size * self.grad_accum)
        first = self.rank * B // self.world_size + self.micro * micro
        rows = slice(first, first + micro)
        self.micro += 1
        if self.micro == self.grad_accum:
            self.step, self.micro = self.step + 1, 0
        return {"tokens": seq[rows, :-1].clone(), "targets": seq[rows, 1:].clone(), "positions": positions.expand(B, T)[rows],
                "doc_ids": doc_ids[rows]}

    def state_dict(self) -> dict:
        return {"step": self.step, "micro": self.micro}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.micro = state["step"], state["micro"]
