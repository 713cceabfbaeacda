"""Writing token shards at corpus scale: the inputs planned into pieces, their chunks tokenized on every core.

The plan is a pure function of the inputs (their file listing and sizes), never of the number of workers:
- each domain's sources are listed file by file (sorted); a JSONL / Parquet file or an HF dataset is one
  *piece*, consecutive text files (one document each) are grouped into pieces of about `shard_chars` bytes;
- a piece's documents are cut into chunks of about `shard_chars` characters, one shard each, named
  `<domain>-<piece>-<chunk>`; the manifest lists them in (piece, chunk) order, which is the input order.
So the shards, the document order within a domain, the held-out split (a hash of each text) and the manifest
are the same whether one process writes them, many local workers, or the tasks of a cluster job.

One tokenization path: `tokenize_pieces` reads pieces in order in one process (reading and decompressing is
two orders of magnitude faster than encoding), and hands each chunk to `_write_shard`, in-process or in a
pool of worker processes (at most two chunks in flight per worker, so memory is flat in the corpus size).
A record per piece (`tasks/pieces/<piece>.json`) is rewritten after each of its shards, so a killed run
resumes per shard: finished pieces are skipped unread, a started one is read again and its finished shards
(same input digest, files present) are kept. `write_manifest` is the final step: it checks that every piece
is finished and writes `manifest.json` with a summary per domain (documents, tokens, skipped documents and
why). The tasks of a cluster engine (mobilellm.data.cluster) call the same functions on slices of the plan.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import re
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from ..atomic import atomic_file, write_json_atomic
from ..schema import read_json_object
from ..tokenizer import Tokenizer
from .progress import ProgressBar, ProgressBoard
from .shards import FORMAT, MANIFEST, SPLITS, is_validation, read_manifest, token_dtype, tokenizer_identity
from .sources import DataError, Source, SourceStats, input_bytes, no_documents_error, read_file

TASKS = "tasks"  # per-piece records and progress counts, beside the shards
_DOMAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---- the plan --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """The unit of work: files of one source read in order (what a task or the reader takes at once)."""
    domain: str
    index: int  # within the domain
    source: int  # which of the domain's sources it comes from
    text_field: str
    files: tuple[tuple[str, str, int, int], ...]  # (path, kind, bytes, mtime_ns)

    @property
    def name(self) -> str:
        return f"{self.domain}-{self.index:05d}"

    @property
    def bytes(self) -> int:
        return sum(f[2] for f in self.files)

    def fingerprint(self) -> list:
        return [list(f) for f in self.files]


def plan_pieces(domain: str, sources: list[Source], shard_chars: int) -> list[Piece]:
    pieces: list[Piece] = []
    for s, source in enumerate(sources):
        group: list[tuple[str, str, int, int]] = []
        for path, kind in source.files():
            stat = path.stat()
            entry = (str(path.resolve()), kind, input_bytes(path), stat.st_mtime_ns)
            if kind != "text":
                pieces.append(Piece(domain, len(pieces), s, source.text_field, (entry,)))
                continue
            group.append(entry)
            if sum(f[2] for f in group) >= shard_chars:
                pieces.append(Piece(domain, len(pieces), s, source.text_field, tuple(group)))
                group = []
        if group:
            pieces.append(Piece(domain, len(pieces), s, source.text_field, tuple(group)))
    return pieces


def read_piece(piece: Piece, stats: SourceStats) -> Iterator[tuple[str, int]]:
    """The piece's non-empty documents, each with the input bytes read so far within the piece."""
    offset = 0
    for path, kind, size, _ in piece.files:
        for text, position in read_file(Path(path), kind, piece.text_field, stats):
            yield text, offset + position
        offset += size


def chunk_documents(documents: Iterable[tuple[str, int]], shard_chars: int) -> Iterator[tuple[list[str], int]]:
    """Group (text, position) into chunks of at least `shard_chars` characters (the last may be smaller),
    each with the position after its last document."""
    chunk, size, position = [], 0, 0
    for text, position in documents:
        chunk.append(text)
        size += len(text)
        if size >= shard_chars:
            yield chunk, position
            chunk, size = [], 0
    if chunk:
        yield chunk, position


def _chunk_digest(texts: list[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


@dataclass
class TokenizeRun:
    """Everything a process needs to do its part: the settings, the domains to do and their pieces."""
    out: Path
    identity: dict
    dtype: str
    val_fraction: float
    shard_chars: int
    domains: dict[str, list[Source]]
    described: dict[str, list[dict]]
    pieces: list[Piece] = field(default_factory=list)

    @property
    def pieces_dir(self) -> Path:
        return self.out / TASKS / "pieces"

    @property
    def progress_dir(self) -> Path:
        return self.out / TASKS / "progress"

    @property
    def total_bytes(self) -> int:
        return sum(p.bytes for p in self.pieces)


def _start_manifest(out: Path, identity: dict, val_fraction: float) -> dict:
    path = out / MANIFEST
    if not path.exists():
        return {"format": FORMAT, "dtype": token_dtype(identity["vocab_size"]).name,
                "tokenizer": identity, "val_fraction": val_fraction, "domains": {}}
    manifest = read_manifest(out)
    if manifest["tokenizer"] != identity:
        raise DataError(f"{out} holds shards made with another tokenizer ({manifest['tokenizer']['vocab_size']:,} "
                        f"tokens, sha256 {manifest['tokenizer']['sha256'][:12]}); use a new --out folder")
    if manifest["val_fraction"] != val_fraction:
        raise DataError(f"{out} was split with val_fraction {manifest['val_fraction']}, not {val_fraction}; "
                        "use the same value or a new --out folder")
    return manifest


def plan_run(domains: dict[str, list[Source]], tokenizer: Tokenizer, out: str | Path, *, val_fraction: float = 0.01,
             shard_chars: int = 16_000_000, log=print) -> TokenizeRun:
    """Check the arguments and the folder, and plan the domains not finished yet (writes nothing)."""
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
    identity = tokenizer_identity(tokenizer)
    manifest = _start_manifest(out, identity, val_fraction)
    run = TokenizeRun(out, identity, manifest["dtype"], val_fraction, shard_chars, {}, {})
    for name, sources in domains.items():
        described = [s.describe() for s in sources]
        previous = manifest["domains"].get(name)
        if previous and previous["sources"] == described and previous["complete"]:
            log(f"{name}: already tokenized, skipped")
            continue
        run.domains[name], run.described[name] = sources, described
        run.pieces += plan_pieces(name, sources, shard_chars)
    return run


def start_run(run: TokenizeRun) -> None:
    """Before any task starts: mark the planned domains unfinished in the manifest (so nothing reads them
    half-done), remove the temp files a killed run was writing, and reset the progress counts."""
    run.out.mkdir(parents=True, exist_ok=True)
    manifest = _start_manifest(run.out, run.identity, run.val_fraction)
    for name, described in run.described.items():
        manifest["domains"][name] = {"sources": described, "complete": False, "shards": []}
    write_json_atomic(run.out / MANIFEST, manifest)
    for leftover in [*run.out.glob(".*.npy.*"), *run.out.glob(f".{MANIFEST}.*"), *run.pieces_dir.glob(".*")]:
        leftover.unlink()
    run.progress_dir.mkdir(parents=True, exist_ok=True)
    for old in run.progress_dir.iterdir():
        old.unlink()


# ---- one shard -------------------------------------------------------------------------------------
def encode_documents(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype, eos_id: int,
                     batch_docs: int = 64, on_batch=None) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of all `texts` back to back, each followed by EOS, and their offsets (n + 1,).
    `on_batch(documents, tokens, characters)` is called after each batch (progress)."""
    pieces, lengths = [], []
    for start in range(0, len(texts), batch_docs):
        batch = texts[start:start + batch_docs]
        encoded = tokenizer.encode_batch(batch)
        for ids in encoded:
            ids.append(eos_id)
            pieces.append(np.asarray(ids, dtype=dtype))
            lengths.append(len(ids))
        if on_batch is not None:
            on_batch(len(batch), sum(map(len, encoded)), sum(map(len, batch)))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return tokens, offsets


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_file(path, "wb") as fh:
        np.save(fh, array)


def _write_shard(out: Path, name: str, texts: list[str], tokenizer: Tokenizer, dtype, eos_id: int,
                 val_fraction: float, board: ProgressBoard | None = None, span_bytes: int = 0) -> dict:
    """Encode one chunk into its train and val files; returns its manifest entry."""
    characters = sum(map(len, texts))
    entry = {"name": name, "input_digest": _chunk_digest(texts), "characters": characters}

    seen = [0, 0]  # characters encoded, input bytes credited: bytes in proportion, summing to span_bytes

    def progress(documents, tokens, chars):
        seen[0] += chars
        credit = span_bytes * seen[0] // max(characters, 1) - seen[1]
        seen[1] += credit
        if board is not None:
            board.add(documents, tokens, credit)

    held_out = [is_validation(t, val_fraction) for t in texts]
    for split in SPLITS:
        chosen = [t for t, v in zip(texts, held_out) if v == (split == "val")]
        tokens, offsets = encode_documents(tokenizer, chosen, np.dtype(dtype), eos_id, on_batch=progress)
        files = {"tokens": f"{name}.{split}.tokens.npy", "offsets": f"{name}.{split}.offsets.npy"}
        _save_npy_atomic(out / files["tokens"], tokens)
        _save_npy_atomic(out / files["offsets"], offsets)
        entry[split] = {**files, "documents": len(chosen), "tokens_count": int(tokens.size)}
    return entry


def _shard_done(out: Path, entry: dict | None, digest: str) -> bool:
    return (entry is not None and entry["input_digest"] == digest
            and all((out / entry[s][f]).exists() for s in SPLITS for f in ("tokens", "offsets")))


def _entry_counts(entry: dict) -> tuple[int, int]:
    return (sum(entry[s]["documents"] for s in SPLITS), sum(entry[s]["tokens_count"] for s in SPLITS))


# ---- workers ---------------------------------------------------------------------------------------
_WORKER: dict = {}


def _die_with_parent() -> None:
    """A killed run must not leave workers behind writing shards: on Linux the kernel kills a worker when its
    parent dies (PR_SET_PDEATHSIG); elsewhere a thread polls for the parent."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0:  # 1: PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the parent died before the call
                os._exit(1)
            return
    except (OSError, AttributeError):
        pass

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _init_worker(tokenizer: Tokenizer, progress_dir: Path | None) -> None:
    _die_with_parent()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the workers are the parallelism
    _WORKER.update(tokenizer=tokenizer, board=ProgressBoard(progress_dir, f"worker-{os.getpid()}"))


def _work(out: Path, name: str, texts: list[str], dtype: str, eos_id: int, val_fraction: float,
          span_bytes: int) -> dict:
    board = _WORKER["board"]
    entry = _write_shard(out, name, texts, _WORKER["tokenizer"], dtype, eos_id, val_fraction, board, span_bytes)
    board.flush()
    return entry


def _run_jobs(jobs: Iterator, run: TokenizeRun, tokenizer: Tokenizer, workers: int,
              board: ProgressBoard) -> Iterator[tuple[tuple[str, int], dict]]:
    """(key, entry) of each job (key, (name, texts, span_bytes)) as it finishes: in this process when
    `workers` is 1, else in a pool with at most two jobs per worker in flight. The pool forks (Linux): a
    worker starts in milliseconds instead of importing the package again (seconds, torch included)."""
    settings = (run.dtype, run.identity["eos_id"], run.val_fraction)
    if workers == 1:
        for key, (name, texts, span) in jobs:
            yield key, _write_shard(run.out, name, texts, tokenizer, settings[0], settings[1], settings[2], board, span)
        return
    pool = ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_init_worker,
                               initargs=(tokenizer, run.progress_dir))
    try:
        pending = {}
        for key, (name, texts, span) in jobs:
            pending[pool.submit(_work, run.out, name, texts, *settings, span)] = key
            while len(pending) >= 2 * workers:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield pending.pop(future), future.result()
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield pending.pop(future), future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---- pieces ----------------------------------------------------------------------------------------
def _record_path(run: TokenizeRun, piece: Piece) -> Path:
    return run.pieces_dir / f"{piece.name}.json"


def load_record(run: TokenizeRun, piece: Piece) -> dict | None:
    """The piece's record if it describes the same files, else None (never started, or the input changed)."""
    path = _record_path(run, piece)
    if not path.exists():
        return None
    record = read_json_object(path, fix="delete it to tokenize the piece again")
    return record if record.get("files") == piece.fingerprint() else None


@dataclass
class _PieceState:
    piece: Piece
    old: dict[int, dict]  # chunk -> entry of an earlier run
    results: dict[int, dict] = field(default_factory=dict)
    chunks: int | None = None  # known once the piece is read to the end
    stats: SourceStats | None = None

    @property
    def complete(self) -> bool:
        return self.chunks is not None and len(self.results) == self.chunks

    def save(self, run: TokenizeRun) -> None:
        # Until the piece is finished, shards of an earlier run not reached yet stay listed: a second kill
        # keeps them (they are checked against their input digest before reuse).
        entries = self.results if self.complete else {**self.old, **self.results}
        write_json_atomic(_record_path(run, self.piece), {
            "files": self.piece.fingerprint(), "complete": self.complete,
            "shards": [entries[k] for k in sorted(entries)],
            "stats": self.stats.to_json() if self.complete else None})


def tokenize_pieces(run: TokenizeRun, pieces: list[Piece], tokenizer: Tokenizer, *, workers: int = 1,
                    board_key: str = "reader") -> None:
    """Tokenize `pieces` (all of the run's, or a task's slice) into shards and piece records."""
    run.pieces_dir.mkdir(parents=True, exist_ok=True)
    board = ProgressBoard(run.progress_dir if run.progress_dir.exists() else None, f"{board_key}-{os.getpid()}")
    states: dict[str, _PieceState] = {}

    def jobs():
        for piece in pieces:
            record = load_record(run, piece)
            if record is not None and record["complete"]:
                counts = [_entry_counts(e) for e in record["shards"]]
                board.add(sum(c[0] for c in counts), sum(c[1] for c in counts), piece.bytes)
                continue
            state = states[piece.name] = _PieceState(piece, {e["chunk"]: e for e in (record or {}).get("shards", [])})
            stats, start, k = SourceStats(), 0, -1
            for k, (texts, end) in enumerate(chunk_documents(read_piece(piece, stats), run.shard_chars)):
                name = f"{piece.name}-{k:05d}"
                if _shard_done(run.out, state.old.get(k), _chunk_digest(texts)):
                    state.results[k] = state.old[k]
                    board.add(*_entry_counts(state.old[k]), end - start)
                else:
                    yield (piece.name, k), (name, texts, end - start)
                start = end
            board.add(bytes=piece.bytes - start)
            state.chunks, state.stats = k + 1, stats
            if state.complete:
                state.save(run)

    for (piece_name, k), entry in _run_jobs(jobs(), run, tokenizer, workers, board):
        state = states[piece_name]
        state.results[k] = {**entry, "chunk": k}
        state.save(run)
    board.flush()


# ---- the final step --------------------------------------------------------------------------------
def write_manifest(run: TokenizeRun) -> dict:
    """Check that every piece of the run is finished and write the manifest, with a summary per domain;
    shard files and piece records an earlier, longer input left behind are removed."""
    manifest = _start_manifest(run.out, run.identity, run.val_fraction)
    for name, sources in run.domains.items():
        pieces = [p for p in run.pieces if p.domain == name]
        records = [load_record(run, p) for p in pieces]
        missing = [p.name for p, r in zip(pieces, records) if r is None or not r["complete"]]
        if missing:
            raise DataError(f"domain {name!r}: {len(missing)} of {len(pieces)} pieces are not tokenized yet "
                            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); run the tokenize "
                            "command (or the cluster tasks) again: finished shards are kept")
        per_source = [SourceStats() for _ in sources]
        for piece, record in zip(pieces, records):
            per_source[piece.source].add(SourceStats.from_json(record["stats"]))
        for source, stats in zip(sources, per_source):
            if stats.documents == 0:
                raise no_documents_error(source.path, sum(stats.skipped.values()))
        stats = SourceStats()
        for s in per_source:
            stats.add(s)
        shards = [entry for record in records for entry in record["shards"]]
        totals = {f"{s}_{what}": sum(e[s][key] for e in shards) for s in SPLITS
                  for what, key in (("tokens", "tokens_count"), ("documents", "documents"))}
        manifest["domains"][name] = {
            "sources": run.described[name], "complete": True, "shards": shards, **stats.to_json(),
            "tokens": totals["train_tokens"] + totals["val_tokens"], **totals}
        _remove_stale_files(run, name, {e[s][f] for e in shards for s in SPLITS for f in ("tokens", "offsets")},
                            {f"{p.name}.json" for p in pieces})
    write_json_atomic(run.out / MANIFEST, manifest)
    return manifest


def _remove_stale_files(run: TokenizeRun, domain: str, keep: set[str], keep_records: set[str]) -> None:
    name = re.escape(domain)
    for path in run.out.glob(f"{domain}-[0-9]*.npy"):
        if path.name not in keep and re.fullmatch(rf"{name}-\d{{5,}}(-\d{{5,}})?\.(train|val)\.(tokens|offsets)\.npy",
                                                  path.name):
            path.unlink()
    for path in run.pieces_dir.glob(f"{domain}-[0-9]*.json"):
        if path.name not in keep_records and re.fullmatch(rf"{name}-\d{{5,}}\.json", path.name):
            path.unlink()


def summary_line(name: str, record: dict, dtype: str) -> str:
    skipped = "".join(f", {n:,} skipped ({reason})" for reason, n in sorted(record["skipped"].items()))
    return (f"{name}: {record['train_documents']:,} train / {record['val_documents']:,} val documents, "
            f"{record['train_tokens']:,} train / {record['val_tokens']:,} val tokens ({dtype}){skipped}")


# ---- the local engine ------------------------------------------------------------------------------
def tokenize_to_shards(domains: dict[str, list[Source]], tokenizer: Tokenizer, out: str | Path, *,
                       val_fraction: float = 0.01, shard_chars: int = 16_000_000, workers: int = 1,
                       progress: bool = True) -> dict:
    """Tokenize each domain's sources into shards under `out` with `workers` processes (0: every core);
    returns the manifest.

    Domains already in `out` with the same sources are skipped; an interrupted domain resumes after its
    finished shards. New domains are added beside existing ones (same tokenizer required).
    """
    log = print if progress else (lambda line: None)
    run = plan_run(domains, tokenizer, out, val_fraction=val_fraction, shard_chars=shard_chars, log=log)
    if not run.domains:
        return read_manifest(run.out)
    start_run(run)
    workers = available_cores() if workers == 0 else workers
    with ProgressBar(run.progress_dir, run.total_bytes, desc=f"tokenize ({workers} workers)", enabled=progress):
        tokenize_pieces(run, run.pieces, tokenizer, workers=workers)
    return write_manifest(run)
