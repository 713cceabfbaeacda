"""Where documents come from: folders of text files, JSONL, Parquet, and HF `datasets` saved on disk.

Every reader yields plain strings, one per document, in a deterministic order (files sorted by path).
Bad input raises `DataError` naming the file (and line): a malformed JSON line, a missing text field,
text that is not UTF-8. Empty documents carry nothing to learn, so they are skipped and counted in
`SourceStats` (the caller reports the count once), as datatrove and the HF tokenizers scripts do.
An input that yields no document at all is an error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError

KINDS = ("text", "jsonl", "parquet", "hf")
DEFAULT_PATTERNS = ("**/*.txt", "**/*.md")
_SUFFIX_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".txt": "text", ".md": "text"}


@dataclass
class SourceStats:
    documents: int = 0
    characters: int = 0
    empty_skipped: list[str] = field(default_factory=list)  # where each skipped empty document came from

    def summary(self) -> str:
        line = f"{self.documents:,} documents, {self.characters:,} characters"
        if self.empty_skipped:
            shown = ", ".join(self.empty_skipped[:3]) + (", ..." if len(self.empty_skipped) > 3 else "")
            line += f"; skipped {len(self.empty_skipped):,} empty documents ({shown})"
        return line


@dataclass(frozen=True)
class Source:
    """One input: a path, how to read it (kind=None: from the path), and the text field / file patterns."""
    path: Path
    kind: str | None = None
    text_field: str = "text"
    patterns: tuple[str, ...] = DEFAULT_PATTERNS

    def resolved_kind(self) -> str:
        if self.kind is not None:
            if self.kind not in KINDS:
                raise DataError(f"unknown source kind {self.kind!r}; expected one of {KINDS}")
            return self.kind
        path = Path(self.path)
        if not path.exists():
            raise DataError(f"input {path} does not exist")
        if path.is_dir():
            # `Dataset.save_to_disk` writes these two files; any other folder is read as text files.
            is_hf = (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
            return "hf" if is_hf else "text"
        if path.suffix.lower() not in _SUFFIX_KINDS:
            raise DataError(f"cannot tell the format of {path} from its suffix; known: "
                            f"{', '.join(sorted(_SUFFIX_KINDS))} (or pass a kind)")
        return _SUFFIX_KINDS[path.suffix.lower()]

    def describe(self) -> dict:
        """What identifies this input in a manifest (a changed description means re-tokenizing)."""
        kind, path = self.resolved_kind(), Path(self.path)  # the former checks that the path exists
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        stats = [p.stat() for p in files]
        return {"path": str(path.resolve()), "kind": kind, "text_field": self.text_field,
                "patterns": list(self.patterns), "files": len(files), "bytes": sum(s.st_size for s in stats),
                "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}


def read_documents(source: Source, stats: SourceStats | None = None) -> Iterator[str]:
    """Yield the non-empty documents of `source`; raises DataError if there are none."""
    stats = stats if stats is not None else SourceStats()
    readers = {"text": _read_text_files, "jsonl": _read_jsonl, "parquet": _read_parquet, "hf": _read_hf}
    before = stats.documents
    for where, text in readers[source.resolved_kind()](source):
        if not text or not text.strip():
            stats.empty_skipped.append(where)
            continue
        stats.documents += 1
        stats.characters += len(text)
        yield text
    if stats.documents == before:
        raise DataError(f"no documents in {source.path}" +
                        (f" ({len(stats.empty_skipped)} empty skipped)" if stats.empty_skipped else ""))


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{where} is not UTF-8 text (bad byte at offset {err.start}); "
                        "convert it (e.g. iconv -t utf-8) or leave it out") from None


def _text_files(source: Source) -> list[Path]:
    root = Path(source.path)
    if root.is_file():
        return [root]
    files = sorted({p for pattern in source.patterns for p in root.glob(pattern) if p.is_file()})
    if not files:
        raise DataError(f"no files matching {', '.join(source.patterns)} under {root}")
    return files


def _read_text_files(source: Source) -> Iterator[tuple[str, str]]:
    for path in _text_files(source):
        yield str(path), _decode(path.read_bytes(), str(path))


def _read_jsonl(source: Source) -> Iterator[tuple[str, str]]:
    path = Path(source.path)
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            where = f"{path}:{number}"
            line = _decode(raw, where).strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg})") from None
            yield where, _field(record, source.text_field, where)


def _field(record, name: str, where: str) -> str:
    if not isinstance(record, dict) or name not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where}: no text field {name!r} (has: {keys})")
    text = record[name]
    if text is not None and not isinstance(text, str):
        raise DataError(f"{where}: field {name!r} is {type(text).__name__}, not text")
    return text or ""


def _read_parquet(source: Source) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    path = Path(source.path)
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own ArrowInvalid / OSError on a bad file
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    columns = parquet.schema_arrow.names
    if source.text_field not in columns:
        raise DataError(f"{path}: no text column {source.text_field!r} (has: {columns})")
    row = 0
    for batch in parquet.iter_batches(columns=[source.text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            yield f"{path}:row {row}", _checked_text(text, source.text_field, f"{path}:row {row}")
            row += 1


def _read_hf(source: Source) -> Iterator[tuple[str, str]]:
    import datasets

    path = Path(source.path)
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(f"{path} holds several splits ({', '.join(dataset)}); point at one of them, "
                        f"e.g. {path / next(iter(dataset))}")
    if source.text_field not in dataset.column_names:
        raise DataError(f"{path}: no text column {source.text_field!r} (has: {dataset.column_names})")
    column = dataset.select_columns([source.text_field])
    for row, batch in enumerate(column.iter(batch_size=1024)):
        for i, text in enumerate(batch[source.text_field]):
            where = f"{path}:row {row * 1024 + i}"
            yield where, _checked_text(text, source.text_field, where)


def _checked_text(text, name: str, where: str) -> str:
    if text is not None and not isinstance(text, str):
        raise DataError(f"{where}: column {name!r} holds {type(text).__name__}, not text")
    return text or ""
