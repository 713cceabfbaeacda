"""Token shards: each document tokenized once into memory-mapped arrays, with a JSON manifest (reading them).

Layout of a shard folder:
    manifest.json                          dtype, tokenizer identity, per domain its shards
    <domain>-00000-00000.train.tokens.npy  all tokens of the shard's train documents, each ending in EOS
    <domain>-00000-00000.train.offsets.npy int64 (n_docs + 1,): document d is tokens[offsets[d]:offsets[d+1]]
    <domain>-00000-00000.val.tokens.npy / .val.offsets.npy   the held-out documents of the same input chunk
    tasks/                                 per-piece records and progress counts of the writers

Shards are written by mobilellm.data.sharding (`tokenize_to_shards`, on every core or as cluster tasks):
the input of a domain is cut into chunks (a pure function of the input), one shard each, named
<domain>-<piece>-<chunk>. A document goes to validation when the hash of its text falls below
`val_fraction`: a stable choice that survives re-runs and reorderings and keeps duplicates together.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..schema import Schema, read_json_object
from ..tokenizer import Tokenizer, TokenizerError
from .sources import DataError

MANIFEST = "manifest.json"
FORMAT = "mobilellm-token-shards/1"
SPLITS = ("train", "val")


# ---- identity -------------------------------------------------------------------
def tokenizer_identity(tokenizer: Tokenizer) -> dict:
    """What must match between the shards and the tokenizer (and model) that later reads them."""
    if not tokenizer.eos_ids or tokenizer.eos_ids[0] is None:
        raise TokenizerError("the tokenizer has no EOS token: documents could not be delimited")
    digest = hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest()
    return {"vocab_size": tokenizer.vocab_size, "sha256": digest, "eos_id": tokenizer.eos_ids[0]}


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def is_validation(text: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return h < val_fraction * 2**64


# ---- reading ---------------------------------------------------------------------------------------
_RETOKENIZE = "tokenize the corpus again (mobilellm tokenize)"
MANIFEST_SCHEMA = Schema({"format": (str,), "dtype": (str,), "tokenizer": (dict,), "val_fraction": (int, float),
                          "domains": (dict,)}, ("format", "domains"), fix=_RETOKENIZE)


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise DataError(f"no {MANIFEST} in {folder}: not a token shard folder (make one with `mobilellm tokenize`)")
    try:
        manifest = MANIFEST_SCHEMA.check(read_json_object(path, fix=_RETOKENIZE), path)
    except UserError as err:
        raise DataError(str(err)) from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


class DocumentStore:
    """The documents of one domain and split, across its shards, memory-mapped."""

    def __init__(self, folder: Path, shards: list[dict], split: str):
        self.tokens = [np.load(folder / s[split]["tokens"], mmap_mode="r") for s in shards]
        self.offsets = [np.load(folder / s[split]["offsets"]) for s in shards]
        counts = [len(o) - 1 for o in self.offsets]
        self.first_doc = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # (n_shards + 1,)

    def __len__(self) -> int:
        return int(self.first_doc[-1])

    @property
    def num_tokens(self) -> int:
        return sum(int(t.size) for t in self.tokens)

    def document(self, index: int) -> np.ndarray:
        """Tokens of document `index` (ending with EOS), a read-only view into the shard."""
        if not 0 <= index < len(self):
            raise IndexError(f"document {index} out of range ({len(self)} documents)")
        shard = int(np.searchsorted(self.first_doc, index, side="right")) - 1
        local = index - int(self.first_doc[shard])
        offsets = self.offsets[shard]
        return self.tokens[shard][offsets[local]:offsets[local + 1]]


class TokenDataset:
    """A finished shard folder: its domains, each with train and val documents."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        for name, record in self.manifest["domains"].items():
            if not record["complete"]:
                raise DataError(f"domain {name!r} in {self.folder} was not finished (interrupted?); "
                                "re-run the same tokenize command to complete it")
        self._stores: dict[tuple[str, str], DocumentStore] = {}

    @property
    def domains(self) -> list[str]:
        return sorted(self.manifest["domains"])

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    @property
    def eos_id(self) -> int:
        return self.manifest["tokenizer"]["eos_id"]

    def documents(self, domain: str, split: str = "train") -> DocumentStore:
        if domain not in self.manifest["domains"]:
            raise DataError(f"unknown domain {domain!r}; {self.folder} has: {', '.join(self.domains)}")
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
        if (domain, split) not in self._stores:
            self._stores[domain, split] = DocumentStore(self.folder, self.manifest["domains"][domain]["shards"], split)
        return self._stores[domain, split]

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Refuse a tokenizer other than the one these shards were made with."""
        want, got = self.manifest["tokenizer"], tokenizer_identity(tokenizer)
        if want != got:
            raise TokenizerError(
                f"the shards in {self.folder} were tokenized with another tokenizer "
                f"(vocab {want['vocab_size']:,}, sha256 {want['sha256'][:12]}, eos {want['eos_id']}) than the one "
                f"given (vocab {got['vocab_size']:,}, sha256 {got['sha256'][:12]}, eos {got['eos_id']})")

    def check_model_vocab(self, vocab_size: int) -> None:
        if self.vocab_size > vocab_size:
            raise TokenizerError(f"the shards' tokenizer has {self.vocab_size:,} tokens but the model's "
                                 f"vocabulary is {vocab_size:,}")
