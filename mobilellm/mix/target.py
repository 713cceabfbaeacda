"""What the mix is for: the target whose loss the chosen domains should lower, as fixed token rows.

A `Target` names any of three kinds of part, each scored alike (the target's loss is the mean of its parts'):
- `domains`: the held-out split of domains of the shard folder (`mobilellm tokenize --val-fraction`);
- `files`: text or JSONL files (`mobilellm.data.read_documents` formats), tokenized with the run's tokenizer;
- `bigbench`: BIG-bench tasks rendered as text (each example's prompt followed by its answer).

Rows are packed like the validation batches (documents in order, EOS-delimited, document-masked) and built
for the whole job on every process, so each process can take its share of the same rows.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import DataError, MixtureLoader, Source, TokenDataset, collate, read_documents
from ..data.mixture import DocLengths, packed_rows
from ..tokenizer import Tokenizer

Rows = dict[str, torch.Tensor]  # a collated block of rows: tokens, targets, positions, doc_ids (R, T)


@dataclass(frozen=True)
class Target:
    """The target data of a mix: held-out domains, text/JSONL files, BIG-bench tasks (any combination).

    domains: domains of the shard folder whose held-out split is the target
    files: text or JSONL files whose documents are the target
    bigbench: BIG-bench task names, rendered as text, as the target
    rows: at most this many sequences per part
    part: (k, n): of the held-out documents, those whose index is k modulo n (another part stays unseen for reports)
    """
    domains: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    bigbench: tuple[str, ...] = ()
    rows: int = 16
    part: tuple[int, int] = (0, 1)

    def check(self, dataset: TokenDataset) -> None:
        """Problems visible without tokenizing: an empty target, unknown domains, domains with no held-out data."""
        if not (self.domains or self.files or self.bigbench):
            raise DataError("the target is empty: name held-out domains, a text/JSONL file or BIG-bench tasks")
        if self.rows <= 0:
            raise DataError(f"target rows must be positive, got {self.rows}")
        unknown = sorted(set(self.domains) - set(dataset.domains))
        if unknown:
            raise DataError(f"unknown target domain(s) {', '.join(unknown)}; {dataset.folder} has: "
                            f"{', '.join(dataset.domains)}")
        for name in self.domains:
            if len(dataset.documents(name, "val")) == 0:
                raise DataError(f"target domain {name!r} has no held-out documents in {dataset.folder}: tokenize it "
                                "with a --val-fraction above 0, or give the target as a file")
        for path in self.files:
            if not Path(path).is_file():
                raise DataError(f"target file {path} does not exist")

    def summary(self) -> dict:
        return {"domains": list(self.domains), "files": list(self.files), "bigbench": list(self.bigbench),
                "rows": self.rows, "part": list(self.part)}

    def parts(self, dataset: TokenDataset, tokenizer: Tokenizer | None, seq_len: int) -> dict[str, Rows]:
        """Each part's rows, named `domain:NAME`, `file:PATH`, `bigbench:TASK`."""
        self.check(dataset)
        parts = {f"domain:{d}": pack(dataset.documents(d, "val"), seq_len, self.rows, self.part) for d in self.domains}
        texts = {f"file:{p}": list(read_documents(Source(p))) for p in self.files}
        if self.bigbench:
            from ..eval.tasks.bigbench import rendered_texts
            texts.update({f"bigbench:{t}": rendered_texts(t) for t in self.bigbench})
        for name, documents in texts.items():
            if not documents:
                raise DataError(f"target {name} holds no documents")
            if tokenizer is None:
                raise DataError(f"target {name} is text: the run needs a tokenizer (the recipe's `tokenizer`)")
            parts[name] = pack(TextDocuments(documents, tokenizer, dataset.eos_id), seq_len, self.rows)
        return parts


class TextDocuments:
    """Texts tokenized on demand, EOS-terminated: the `len()` / `document(i)` of a shard's DocumentStore."""

    def __init__(self, texts: list[str], tokenizer: Tokenizer, eos_id: int):
        self.texts, self.tokenizer, self.eos_id = texts, tokenizer, eos_id

    def __len__(self) -> int:
        return len(self.texts)

    def document(self, index: int) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(self.texts[index]) + [self.eos_id], dtype=np.int64)


def pack(store, seq_len: int, rows: int, part: tuple[int, int] = (0, 1)) -> Rows:
    """The first `rows` rows of `store`'s documents (of `part`) packed in order."""
    packed = list(itertools.islice(packed_rows([("target", store)], seq_len, part=part), rows))
    if not packed:
        raise DataError("the target holds no tokens")
    return collate(packed)


def domain_probes(dataset: TokenDataset, domains: list[str], seq_len: int, rows: int, seed: int,
                  lengths: DocLengths = DocLengths()):
    """Per domain, an endless stream of blocks of `rows` training rows (a new block per checkpoint): the data
    whose gradient is compared with the target's, drawn as the proxy draws it (`lengths`: the recipe's document
    pieces, so a block spans many documents rather than one long one). Seeded, the same for every number of
    processes."""
    loaders = {d: MixtureLoader(dataset, {d: 1.0}, seq_len=seq_len, global_batch_size=rows, seed=seed,
                                lengths=lengths) for d in domains}
    while True:
        yield {d: next(loader) for d, loader in loaders.items()}


def share(rows: Rows, rank: int, world_size: int, micro_rows: int) -> list[Rows]:
    """This process's rows (every `world_size`-th) in micro-batches of at most `micro_rows`."""
    mine = {k: v[rank::world_size] for k, v in rows.items()}
    n = len(mine["tokens"])
    return [{k: v[i:i + micro_rows] for k, v in mine.items()} for i in range(0, n, micro_rows)]
