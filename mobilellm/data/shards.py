"""Token shards: each document tokenized once into memory-mapped arrays, with a JSON manifest.

Layout of a shard folder:
    manifest.json                          dtype, tokenizer identity, per domain its shards
    <domain>-00000.train.tokens.npy        all tokens of the shard's train documents, each ending in EOS
    <domain>-00000.train.offsets.npy       int64 (n_docs + 1,): document d is tokens[offsets[d]:offsets[d+1]]
    <domain>-00000.val.tokens.npy / .val.offsets.npy   the held-out documents of the same input chunk

The input of a domain is cut into chunks of about `shard_chars` characters (a pure function of the
input), one shard each. A document goes to validation when the hash of its text falls below
`val_fraction`: a stable choice that survives re-runs and reorderings and keeps duplicates together.
Every file is written to a temp name and renamed, and the manifest is rewritten after each shard, so a
killed run leaves only finished shards; re-running the same command skips them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..atomic import atomic_file, write_json_atomic
from ..tokenizer import Tokenizer, TokenizerError
from .sources import DataError, Source, SourceStats, read_documents
from ..errors import UserError
from ..schema import Schema, read_json_object

MANIFEST = "manifest.json"
FORMAT = "mobilellm-token-shards/1"
SPLITS = ("train", "val")
_DOMAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ---- identity and small helpers -------------------------------------------------------------------
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


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_file(path, "wb") as fh:
        np.save(fh, array)


def chunk_documents(documents: Iterable[str], shard_chars: int) -> Iterator[list[str]]:
    """Group documents into chunks of at least `shard_chars` characters (the last may be smaller)."""
    chunk, size = [], 0
    for text in documents:
        chunk.append(text)
        size += len(text)
        if size >= shard_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _chunk_digest(texts: list[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


# ---- writing ---------------------------------------------------------------------------------------
def encode_documents(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype, eos_id: int,
                     batch_docs: int = 64, progress: tqdm | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of all `texts` back to back, each followed by EOS, and their offsets (n + 1,)."""
    pieces, lengths = [], []
    for start in range(0, len(texts), batch_docs):
        batch = texts[start:start + batch_docs]
        for ids in tokenizer.encode_batch(batch):
            ids.append(eos_id)
            pieces.append(np.asarray(ids, dtype=dtype))
            lengths.append(len(ids))
        if progress is not None:
            progress.update(sum(map(len, batch)))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return tokens, offsets


def _write_shard(out: Path, name: str, texts: list[str], tokenizer: Tokenizer, dtype, eos_id: int,
                 val_fraction: float, progress: tqdm | None = None) -> dict:
    entry = {"name": name, "input_digest": _chunk_digest(texts), "characters": sum(map(len, texts))}
    held_out = [is_validation(t, val_fraction) for t in texts]
    for split in SPLITS:
        chosen = [t for t, v in zip(texts, held_out) if v == (split == "val")]
        tokens, offsets = encode_documents(tokenizer, chosen, dtype, eos_id, progress=progress)
        files = {"tokens": f"{name}.{split}.tokens.npy", "offsets": f"{name}.{split}.offsets.npy"}
        _save_npy_atomic(out / files["tokens"], tokens)
        _save_npy_atomic(out / files["offsets"], offsets)
        entry[split] = {**files, "documents": len(chosen), "tokens_count": int(tokens.size)}
    return entry


def _shard_done(out: Path, entry: dict | None, digest: str) -> bool:
    return (entry is not None and entry["input_digest"] == digest
            and all((out / entry[s][f]).exists() for s in SPLITS for f in ("tokens", "offsets")))


def _load_or_start_manifest(out: Path, identity: dict, val_fraction: float) -> dict:
    path = out / MANIFEST
    if not path.exists():
        return {"format": FORMAT, "dtype": token_dtype(identity["vocab_size"]).name, "tokenizer": identity,
                "val_fraction": val_fraction, "domains": {}}
    manifest = read_manifest(out)
    if manifest["tokenizer"] != identity:
        raise DataError(f"{out} holds shards made with another tokenizer ({manifest['tokenizer']['vocab_size']:,} "
                        f"tokens, sha256 {manifest['tokenizer']['sha256'][:12]}); use a new --out folder")
    if manifest["val_fraction"] != val_fraction:
        raise DataError(f"{out} was split with val_fraction {manifest['val_fraction']}, not {val_fraction}; "
                        "use the same value or a new --out folder")
    return manifest


def tokenize_to_shards(domains: dict[str, list[Source]], tokenizer: Tokenizer, out: str | Path, *,
                       val_fraction: float = 0.01, shard_chars: int = 16_000_000,
                       progress: bool = True) -> dict:
    """Tokenize each domain's sources into shards under `out`; returns the manifest.

    Domains already in `out` with the same sources are skipped; an interrupted domain resumes after
    its last finished shard. New domains are added beside existing ones (same tokenizer required).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_chars <= 0:
        raise DataError(f"shard_chars must be positive, got {shard_chars}")
    if not domains:
        raise DataError("no inputs given")
    for name in domains:
        if not _DOMAIN_NAME.match(name):
            raise DataError(f"domain name {name!r} must be letters, digits, '_', '-' or '.'")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    identity = tokenizer_identity(tokenizer)
    manifest = _load_or_start_manifest(out, identity, val_fraction)
    for leftover in [*out.glob(".*.npy.*"), *out.glob(f".{MANIFEST}.*")]:
        leftover.unlink()  # the temp file a killed run was writing
    dtype = np.dtype(manifest["dtype"])
    for name, sources in domains.items():
        described = [s.describe() for s in sources]
        previous = manifest["domains"].get(name)
        if previous and previous["sources"] == described and previous["complete"]:
            if progress:
                print(f"{name}: already tokenized, skipped")
            continue
        old_shards = previous["shards"] if previous and previous["sources"] == described else []
        record = {"sources": described, "complete": False, "shards": []}
        manifest["domains"][name] = record
        stats = SourceStats()
        documents = (text for source in sources for text in read_documents(source, stats))
        bar = tqdm(desc=f"tokenize {name}", unit="char", unit_scale=True, disable=not progress)
        for k, texts in enumerate(chunk_documents(documents, shard_chars)):
            old = old_shards[k] if k < len(old_shards) else None
            if _shard_done(out, old, _chunk_digest(texts)):
                record["shards"].append(old)
                bar.update(old["characters"])
            else:
                record["shards"].append(_write_shard(out, f"{name}-{k:05d}", texts, tokenizer, dtype,
                                                     identity["eos_id"], val_fraction, bar))
                write_json_atomic(out / MANIFEST, manifest)
        bar.close()
        _remove_stale_files(out, name, {f for e in record["shards"] for s in SPLITS
                                        for f in (e[s]["tokens"], e[s]["offsets"])})
        record.update(complete=True, documents=stats.documents, characters=stats.characters,
                      empty_skipped=len(stats.empty_skipped),
                      **{f"{s}_tokens": sum(e[s]["tokens_count"] for e in record["shards"]) for s in SPLITS},
                      **{f"{s}_documents": sum(e[s]["documents"] for e in record["shards"]) for s in SPLITS})
        write_json_atomic(out / MANIFEST, manifest)
        if progress:
            print(f"{name}: {stats.summary()} -> {record['train_tokens']:,} train / "
                  f"{record['val_tokens']:,} val tokens")
    return manifest


def _remove_stale_files(out: Path, domain: str, keep: set[str]) -> None:
    """Shards of an earlier, longer input of this domain that the new manifest no longer names."""
    for path in out.glob(f"{domain}-[0-9]*.*.npy"):
        if path.name not in keep and re.fullmatch(rf"{re.escape(domain)}-\d{{5}}\.(train|val)\.(tokens|offsets)\.npy", path.name):
            path.unlink()


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
