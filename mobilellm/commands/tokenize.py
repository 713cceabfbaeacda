"""`mobilellm tokenize`: documents -> memory-mapped token shards with a validation split."""

from __future__ import annotations

from pathlib import Path

from ..data.sharding import tokenize_to_shards
from ..data.sources import DEFAULT_PATTERNS, Source
from ..tokenizer import Tokenizer


def parse_inputs(inputs: list[str], kind: str | None, text_field: str, patterns: list[str]) -> dict[str, list[Source]]:
    """`domain=path` or `path` (domain: the file's stem or the folder's name) -> {domain: sources}."""
    domains: dict[str, list[Source]] = {}
    for item in inputs:
        name, sep, path = item.partition("=")
        path = Path(path if sep else item)
        name = name if sep else path.stem
        domains.setdefault(name, []).append(Source(path, kind, text_field, tuple(patterns)))
    return domains


def tokenize(inputs: list[str], *, tokenizer: Path, out: Path, val_fraction: float = 0.01,
             shard_chars: int = 16_000_000, text_field: str = "text", kind: str | None = None,
             patterns: list[str] = list(DEFAULT_PATTERNS), progress: bool = True) -> None:
    """Tokenize documents into token shards (one domain per input) for training and validation.

    Each input is DOMAIN=PATH or PATH (domain = file stem / folder name); several inputs may share a
    domain. PATH is a folder of text files, a .jsonl file, a .parquet file, or a folder saved by
    `datasets.save_to_disk`. Re-running resumes after the last finished shard; new domains are added
    to an existing --out folder made with the same tokenizer.

    Args:
        inputs: DOMAIN=PATH or PATH, one or more
        tokenizer: folder with tokenizer.json (and tokenizer_config.json naming the EOS token)
        out: output folder for the shards and manifest.json
        val_fraction: share of documents held out for validation (chosen by a hash of each text)
        shard_chars: characters of input per shard
        text_field: JSON field / Parquet or dataset column holding the text
        kind: read every input as this kind (text, jsonl, parquet, hf) instead of guessing from the path
        patterns: glob patterns for the files of a text folder
        progress: show progress bars
    """
    domains = parse_inputs(inputs, kind, text_field, patterns)
    manifest = tokenize_to_shards(domains, Tokenizer.load(tokenizer), out, val_fraction=val_fraction,
                                  shard_chars=shard_chars, progress=progress)
    for name in domains:
        record = manifest["domains"][name]
        print(f"{name}: {record['train_documents']:,} train / {record['val_documents']:,} val documents, "
              f"{record['train_tokens']:,} train / {record['val_tokens']:,} val tokens ({manifest['dtype']})")
    print(f"shards: {out}")
