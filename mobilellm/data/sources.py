"""Where documents come from: text files, JSONL (plain, .gz, .zst), Parquet, and HF `datasets` saved on disk.

Every reader streams: it yields one document at a time, in a deterministic order (files sorted by path), and
never holds a whole file or source in memory (a text file is one document and is read whole). A folder is
read file by file: each file matching the patterns is read by its suffix (.jsonl / .jsonl.gz / .jsonl.zst /
.parquet; any other file is one text document) unless a kind is given. Bad input raises `DataError` naming the
file (and line): a malformed JSON line, a missing text field, text that is not UTF-8, a damaged archive.
Empty documents carry nothing to learn, so they are skipped and counted by reason in `SourceStats` (the
caller reports the counts once), as datatrove and the HF tokenizers scripts do. An input that yields no
document at all is an error.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError

KINDS = ("text", "jsonl", "parquet", "hf")
DEFAULT_PATTERNS = ("**/*.txt", "**/*.md")
_SUFFIX_KINDS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".jsonl.zst": "jsonl", ".ndjson": "jsonl",
                 ".ndjson.gz": "jsonl", ".ndjson.zst": "jsonl", ".parquet": "parquet", ".txt": "text", ".md": "text"}
EMPTY = "empty"  # the reason a document is skipped: no text, or only whitespace
_EXAMPLES = 3  # where the first few skipped documents of each reason came from


@dataclass
class SourceStats:
    """Documents read and skipped; memory stays constant (counts, and a few examples of each skip reason)."""
    documents: int = 0
    characters: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> documents
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> where the first few came from

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < _EXAMPLES:
            shown.append(where)

    def add(self, other: "SourceStats") -> None:
        self.documents += other.documents
        self.characters += other.characters
        for reason, count in other.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count
            shown = self.examples.setdefault(reason, [])
            shown.extend(other.examples.get(reason, [])[:_EXAMPLES - len(shown)])

    def to_json(self) -> dict:
        return {"documents": self.documents, "characters": self.characters, "skipped": dict(self.skipped),
                "skipped_examples": {k: list(v) for k, v in self.examples.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "SourceStats":
        return cls(data["documents"], data["characters"], dict(data["skipped"]),
                   {k: list(v) for k, v in data["skipped_examples"].items()})

    def summary(self) -> str:
        line = f"{self.documents:,} documents, {self.characters:,} characters"
        for reason, count in sorted(self.skipped.items()):
            shown = ", ".join(self.examples[reason]) + (", ..." if count > len(self.examples[reason]) else "")
            line += f"; skipped {count:,} {reason} documents ({shown})"
        return line


def suffix_kind(path: Path) -> str | None:
    """The kind a file's suffix names (.jsonl.gz -> jsonl), or None."""
    name = path.name.lower()
    return next((kind for suffix, kind in sorted(_SUFFIX_KINDS.items(), key=lambda s: -len(s[0]))
                 if name.endswith(suffix)), None)


def default_domain(path: Path) -> str:
    """The domain an input is named after: a folder's name, or a file's name less its format suffix."""
    path = Path(path)
    kind_suffix = next((suffix for suffix in sorted(_SUFFIX_KINDS, key=len, reverse=True)
                        if path.name.lower().endswith(suffix)), None)
    if path.is_dir() or not path.suffix:
        return path.name
    return path.name[:-len(kind_suffix)] if kind_suffix else path.stem


@dataclass(frozen=True)
class Source:
    """One input: a path, how to read it (kind=None: from the path), and the text field / file patterns."""
    path: Path
    kind: str | None = None
    text_field: str = "text"
    patterns: tuple[str, ...] = DEFAULT_PATTERNS

    def resolved_kind(self) -> str:
        """The kind of every file of this input, or "folder" for a folder read file by file by suffix."""
        if self.kind is not None:
            if self.kind not in KINDS:
                raise DataError(f"unknown source kind {self.kind!r}; expected one of {KINDS}")
            return self.kind
        path = Path(self.path)
        if not path.exists():
            raise DataError(f"input {path} does not exist")
        if path.is_dir():
            # `Dataset.save_to_disk` writes these two files; any other folder is read file by file.
            is_hf = (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
            return "hf" if is_hf else "folder"
        kind = suffix_kind(path)
        if kind is None:
            raise DataError(f"cannot tell the format of {path} from its suffix; known: "
                            f"{', '.join(sorted(_SUFFIX_KINDS))} (or pass a kind)")
        return kind

    def files(self) -> list[tuple[Path, str]]:
        """The files to read, in order, each with its kind (an HF dataset is one folder of kind "hf")."""
        kind, root = self.resolved_kind(), Path(self.path)
        if not root.exists():
            raise DataError(f"input {root} does not exist")
        if kind == "hf" or not root.is_dir():
            return [(root, kind)]
        files = sorted({p for pattern in self.patterns for p in root.glob(pattern) if p.is_file()})
        if not files:
            raise DataError(f"no files matching {', '.join(self.patterns)} under {root}")
        return [(p, (suffix_kind(p) or "text") if kind == "folder" else kind) for p in files]

    def describe(self) -> dict:
        """What identifies this input in a manifest (a changed description means re-tokenizing)."""
        kind, path = self.resolved_kind(), Path(self.path)  # the former checks that the path exists
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        stats = [p.stat() for p in files]
        return {"path": str(path.resolve()), "kind": kind, "text_field": self.text_field,
                "patterns": list(self.patterns), "files": len(files), "bytes": sum(s.st_size for s in stats),
                "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}


def read_documents(source: Source, stats: SourceStats | None = None) -> Iterator[str]:
    """Yield the non-empty documents of `source`, streaming; raises DataError if there are none."""
    stats = stats if stats is not None else SourceStats()
    before, skipped_before = stats.documents, sum(stats.skipped.values())
    for path, kind in source.files():
        for text, _ in read_file(path, kind, source.text_field, stats):
            yield text
    if stats.documents == before:
        raise no_documents_error(source.path, sum(stats.skipped.values()) - skipped_before)


def no_documents_error(path, skipped: int) -> DataError:
    return DataError(f"no documents in {path}" + (f" ({skipped} empty skipped)" if skipped else ""))


def read_file(path: Path, kind: str, text_field: str, stats: SourceStats) -> Iterator[tuple[str, int]]:
    """The non-empty documents of one file (or HF dataset folder), each with the bytes of the file read so
    far (for progress: compressed bytes for .gz / .zst; the file's size after its last document)."""
    readers = {"text": _read_text_file, "jsonl": _read_jsonl, "parquet": _read_parquet, "hf": _read_hf}
    for where, text, position in readers[kind](Path(path), text_field):
        if not text or not text.strip():
            stats.skip(EMPTY, where)
            continue
        stats.documents += 1
        stats.characters += len(text)
        yield text, position


def input_bytes(path: Path) -> int:
    """Bytes on disk of a file, or of every file under a folder (an HF dataset)."""
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{where} is not UTF-8 text (bad byte at offset {err.start}); "
                        "convert it (e.g. iconv -t utf-8) or leave it out") from None


def _read_text_file(path: Path, text_field: str) -> Iterator[tuple[str, str, int]]:
    raw = path.read_bytes()
    yield str(path), _decode(raw, str(path)), len(raw)


def _decompressed(path: Path, raw: io.BufferedReader) -> io.BufferedIOBase:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading .zst needs the zstandard package "
                            "(pip install 'mobilellm[data]')") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
    return raw


def _damaged(path: Path, err: Exception) -> DataError:
    return DataError(f"{path}: damaged or truncated archive ({type(err).__name__}: {err}); "
                     "download or compress it again")


def _read_jsonl(path: Path, text_field: str) -> Iterator[tuple[str, str, int]]:
    with open(path, "rb") as raw:
        stream = _decompressed(path, raw)
        lines = iter(stream)
        number = 0
        while True:
            try:
                line = next(lines)
            except StopIteration:
                break
            except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError; zstd's too
                raise _damaged(path, err) from None
            except Exception as err:
                if type(err).__module__.startswith("zstandard"):
                    raise _damaged(path, err) from None
                raise
            number += 1
            where = f"{path}:{number}"
            text = _decode(line, where).strip()
            if not text:
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg})") from None
            yield where, _field(record, text_field, where), raw.tell()


def _field(record, name: str, where: str) -> str:
    if not isinstance(record, dict) or name not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where}: no text field {name!r} (has: {keys})")
    text = record[name]
    if text is not None and not isinstance(text, str):
        raise DataError(f"{where}: field {name!r} is {type(text).__name__}, not text")
    return text or ""


def _read_parquet(path: Path, text_field: str) -> Iterator[tuple[str, str, int]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own ArrowInvalid / OSError on a bad file
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise DataError(f"{path}: no text column {text_field!r} (has: {columns})")
    size, rows = path.stat().st_size, max(parquet.metadata.num_rows, 1)
    row = 0
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            where = f"{path}:row {row}"
            row += 1
            yield where, _checked_text(text, text_field, where), size * row // rows


def _read_hf(path: Path, text_field: str) -> Iterator[tuple[str, str, int]]:
    import datasets

    dataset = datasets.load_from_disk(str(path))  # memory-mapped Arrow files: nothing is loaded whole
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(f"{path} holds several splits ({', '.join(dataset)}); point at one of them, "
                        f"e.g. {path / next(iter(dataset))}")
    if text_field not in dataset.column_names:
        raise DataError(f"{path}: no text column {text_field!r} (has: {dataset.column_names})")
    size, rows = input_bytes(path), max(len(dataset), 1)
    column = dataset.select_columns([text_field])
    row = 0
    for batch in column.iter(batch_size=1024):
        for text in batch[text_field]:
            where = f"{path}:row {row}"
            row += 1
            yield where, _checked_text(text, text_field, where), size * row // rows


def _checked_text(text, name: str, where: str) -> str:
    if text is not None and not isinstance(text, str):
        raise DataError(f"{where}: column {name!r} holds {type(text).__name__}, not text")
    return text or ""
