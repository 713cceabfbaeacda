"""A deliberately useless domain for testing a mixer: another domain's documents with their tokens shuffled.

Each document keeps its tokens (so its unigram statistics) and its EOS, in a seeded random order: nothing left
to learn but token frequencies. A mixer that works ranks it last. The domain is added to a new shard folder
whose manifest names the original shards by symbolic link, so the user's folder is never written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..atomic import atomic_folder
from ..data import DataError, TokenDataset
from ..data.shards import MANIFEST, SPLITS

JUNK_PREFIX = "shuffled-"


def shuffle_documents(tokens: np.ndarray, offsets: np.ndarray, seed: int) -> np.ndarray:
    """Every document's tokens but its last (EOS) permuted in place of each other."""
    rng = np.random.default_rng(seed)
    out = np.array(tokens)
    for start, end in zip(offsets[:-1], offsets[1:]):
        if end - start > 2:
            out[start:end - 1] = out[start:end - 1][rng.permutation(end - 1 - start)]
    return out


def with_junk_domain(shards: str | Path, source: str, out: str | Path, *, seed: int = 0) -> Path:
    """A shard folder at `out`: every domain of `shards` (linked) plus `shuffled-SOURCE`; reused when complete."""
    dataset = TokenDataset(shards)
    if source not in dataset.domains:
        raise DataError(f"unknown domain {source!r} to shuffle into a junk domain; {shards} has: "
                        f"{', '.join(dataset.domains)}")
    name, out = JUNK_PREFIX + source, Path(out)
    if name in dataset.domains:
        raise DataError(f"{shards} already has a domain named {name!r}")
    manifest = json.loads((dataset.folder / MANIFEST).read_text())
    record = json.loads(json.dumps(manifest["domains"][source]))
    record["sources"] = [{"junk": f"tokens of {source} shuffled within each document", "seed": seed}]
    if (out / MANIFEST).exists() and json.loads((out / MANIFEST).read_text())["domains"].get(name) == record:
        return out
    with atomic_folder(out) as tmp:
        for path in sorted(dataset.folder.glob("*.npy")):
            os.symlink(path.resolve(), tmp / path.name)
        for k, shard in enumerate(record["shards"]):
            for split in SPLITS:
                files = shard[split]
                tokens = np.load(dataset.folder / files["tokens"])
                offsets = np.load(dataset.folder / files["offsets"])
                files["tokens"] = f"{name}-{k:05d}.{split}.tokens.npy"
                np.save(tmp / files["tokens"], shuffle_documents(tokens, offsets, seed * 1_000_003 + k))
        manifest["domains"][name] = record
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out
