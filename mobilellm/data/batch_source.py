"""Where a recipe's batches come from: a small frozen value that builds the loop's batch source once the run is set up.

Every source built here keeps `MixtureLoader`'s contract: an endless iterator of dict micro-batches (int64
`tokens`, `targets`, `positions`, `doc_ids` (B, T), plus whatever its objective reads), `state_dict()` /
`load_state_dict()` for exact resume, and `world_size` / `grad_accum` attributes. There is one global stream;
each process takes its rows of every global batch, so a run resumes on another number of processes.

`kind` says what the batches hold, and a recipe pairs its data with an objective that reads that kind:
"sequences" (next-token targets: pretraining, SFT) or "pairs" (preference pairs: DPO).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import DataError
from ..tokenizer import Tokenizer
from .mixture import DocLengths, MixtureLoader, validation_batches
from .packing import PACKINGS
from .shards import TokenDataset


@dataclass(frozen=True)
class BatchLayout:
    """How the run cuts its global stream, the same on every process but for `rank`."""
    seq_len: int
    global_batch_rows: int  # rows per optimizer step, all processes together
    grad_accum: int  # micro-batches per optimizer step on one process
    micro_rows: int  # rows per micro-batch (validation batches too)
    rank: int = 0
    world_size: int = 1
    seed: int = 0


@dataclass
class BuiltBatches:
    train: Iterator[dict]  # the loop's batch source
    validation: list[dict] | dict[str, list[dict]] | None  # this process's, by domain or not; None: none measured
    report: dict  # what reading the data found (examples, truncated, dropped): printed and kept beside the run


class BatchSource:
    kind = "sequences"

    def check(self, recipe) -> None:
        """Problems visible before anything is read (raise ValueError naming the fix)."""

    def build(self, layout: BatchLayout, tokenizer: Tokenizer | None, vocab_size: int,
              val_batches: int | None) -> BuiltBatches:
        """The source for this process; `val_batches`: at most that many validation batches (None: none)."""
        raise NotImplementedError

    def summary(self) -> dict:
        return {"kind": type(self).__name__, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class TokenShards(BatchSource):
    """Token shards (`mobilellm tokenize`), domains sampled by weight and packed (`MixtureLoader`).

    `packing`: "documents" (the default: each document attends only to itself, positions restart per document)
    or "window" (one causal sequence per row, positions continuous across it, attention across documents: how
    a long-context teacher sees a packed window in positional distillation). `min_doc_tokens` keeps only
    documents of at least that many tokens (long-document data); `max_doc_tokens` cuts documents into pieces
    of at most that many, each drawn apart (short-document data).
    """

    folder: str
    domain_weights: dict[str, float] | str | None = None  # None: every domain equally; a str: a mix.json's weights
    packing: str = "documents"
    min_doc_tokens: int | None = None
    max_doc_tokens: int | None = None

    def check(self, recipe) -> None:
        if not self.folder:
            raise ValueError(f"recipe {recipe.name!r} needs token shards (--data, made by `mobilellm tokenize`)")
        if self.packing not in PACKINGS:
            raise ValueError(f"recipe {recipe.name!r}: packing must be one of {', '.join(PACKINGS)}, got {self.packing!r}")
        self.lengths()  # refuses non-positive lengths
        self.weights()

    def weights(self) -> dict[str, float] | None:
        if isinstance(self.domain_weights, str):
            from ..mix.mixfile import read_mix  # mix.json, written by `mobilellm mix`

            return read_mix(self.domain_weights)
        return self.domain_weights

    def build(self, layout, tokenizer, vocab_size, val_batches):
        dataset = TokenDataset(self.folder)
        dataset.check_model_vocab(vocab_size)
        if tokenizer is not None:
            dataset.check_tokenizer(tokenizer)
        weights = self.weights() or {name: 1.0 for name in dataset.domains}
        processes = dict(rank=layout.rank, world_size=layout.world_size)
        masked = self.packing == "documents"
        loader = MixtureLoader(dataset, weights, seq_len=layout.seq_len, global_batch_size=layout.global_batch_rows,
                               grad_accum=layout.grad_accum, seed=layout.seed, mask_documents=masked,
                               lengths=self.lengths(), **processes)
        val = None if val_batches is None else self.validation(dataset, list(weights), layout, val_batches, masked)
        return BuiltBatches(loader, val, {})

    @staticmethod
    def validation(dataset, domains, layout, val_batches, masked) -> dict[str, list[dict]]:
        """Each domain's held-out batches apart ({domain: batches}, `val_batches` split over the domains), so
        the loop can report every domain's loss; domains without held-out documents are left out."""
        held_out = [d for d in domains if len(dataset.documents(d, "val"))]
        if not held_out:
            raise DataError(f"no validation documents in {', '.join(domains)} of {dataset.folder} "
                            "(tokenized with --val-fraction 0?)")
        return {domain: list(validation_batches(dataset, seq_len=layout.seq_len, batch_size=layout.micro_rows,
                                                domains=[domain], max_batches=-(-val_batches // len(held_out)),
                                                mask_documents=masked, rank=layout.rank,
                                                world_size=layout.world_size))
                for domain in held_out}

    def lengths(self) -> DocLengths:
        return DocLengths(self.min_doc_tokens, self.max_doc_tokens)
