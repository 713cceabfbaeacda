"""Atomic writes: a file or a folder becomes visible under its name only once completely written.

Everything is written to a temporary name beside the target (same filesystem, so the final rename is atomic),
synced to disk, then renamed onto the target. On error the temporary is removed and the target keeps its old
content, so a crash or Ctrl-C never leaves a half-written results file, shard or checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (the directory entry, not only the file's data)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temp file beside `path` ("w" text in UTF-8, or "wb"); on success it is synced and renamed onto
    `path`, on error removed. The parent folder is created when missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.fchmod(fd, 0o644)  # mkstemp's 0600 would make shared data unreadable
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_file(path) as fh:
        fh.write(text)
    return Path(path)


def write_json_atomic(path: str | Path, data, indent: int | None = 1) -> Path:
    """`data` as JSON with a final newline."""
    with atomic_file(path) as fh:
        json.dump(data, fh, indent=indent)
        fh.write("\n")
    return Path(path)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(Path(root) / name, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(root))


@contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside `folder` to fill; on success its files are synced and it is renamed onto
    `folder` (replacing an existing one), on error removed. Files inside it may be written plainly."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would make shared caches unreadable
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, folder, sync=False)


def replace_folder(src: str | Path, folder: str | Path, *, sync: bool = True) -> None:
    """Rename the finished folder `src` onto `folder` (same filesystem), replacing an existing one: a reader
    sees the old folder or the new one, never a mix. `sync`: first sync `src`'s files to disk."""
    src, folder = Path(src), Path(folder)
    if sync:
        _fsync_tree(src)
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.replace(folder, old)
    os.replace(src, folder)
    _fsync_dir(folder.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
