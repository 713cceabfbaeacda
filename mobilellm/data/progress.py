"""One progress bar across worker processes, tasks and machines: each writes its counts to a small file.

Every process that tokenizes keeps a `ProgressBoard` (documents, tokens, input bytes done) and flushes it to
`<folder>/<key>.json` at most once per `interval` seconds; `ProgressBar` sums the folder's files in a thread
and shows one bar: input bytes done of the total (hence the ETA), documents, tokens and tokens/s. Files keep
counts working across processes that share nothing but a folder (local workers, datatrove tasks, nodes of
a Slurm job on a shared filesystem).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from tqdm import tqdm

from ..atomic import write_json_atomic

FIELDS = ("documents", "tokens", "bytes")


class ProgressBoard:
    def __init__(self, folder: Path | None, key: str, interval: float = 1.0):
        self.folder, self.key, self.interval = folder, key, interval
        self.counts = dict.fromkeys(FIELDS, 0)
        self._flushed = 0.0

    def add(self, documents: int = 0, tokens: int = 0, bytes: int = 0) -> None:
        self.counts["documents"] += documents
        self.counts["tokens"] += tokens
        self.counts["bytes"] += bytes
        if time.monotonic() - self._flushed >= self.interval:
            self.flush()

    def flush(self) -> None:
        if self.folder is not None:
            write_json_atomic(self.folder / f"{self.key}.json", self.counts, indent=None)
        self._flushed = time.monotonic()


def read_counts(folder: Path) -> dict[str, int]:
    total = dict.fromkeys(FIELDS, 0)
    for path in folder.glob("*.json"):
        try:
            counts = json.loads(path.read_text())
        except (OSError, ValueError):  # replaced between glob and read: the next poll sees it
            continue
        for name in FIELDS:
            total[name] += int(counts.get(name, 0))
    return total


class ProgressBar:
    """`with ProgressBar(folder, total_bytes):` shows the sum of the folder's boards until the block ends."""

    def __init__(self, folder: Path, total_bytes: int, desc: str = "tokenize", enabled: bool = True,
                 interval: float = 0.5):
        self.folder, self.total, self.desc, self.enabled, self.interval = folder, total_bytes, desc, enabled, interval
        self._stop = threading.Event()

    def _refresh(self, bar: tqdm, start: float, first_tokens: list) -> None:
        counts = read_counts(self.folder)
        if first_tokens[0] is None:
            first_tokens[0] = counts["tokens"]  # resumed work is shown, not counted in the rate
        bar.n = min(counts["bytes"], self.total)
        rate = (counts["tokens"] - first_tokens[0]) / max(time.monotonic() - start, 1e-9)
        bar.set_postfix_str(f"{counts['documents']:,} docs, {counts['tokens']:,} tokens, {rate:,.0f} tok/s",
                            refresh=False)
        bar.refresh()

    def _run(self, bar: tqdm) -> None:
        start, first = time.monotonic(), [None]
        while not self._stop.wait(self.interval):
            self._refresh(bar, start, first)
        self._refresh(bar, start, first)

    def __enter__(self) -> "ProgressBar":
        if self.enabled:
            self._bar = tqdm(total=self.total, desc=self.desc, unit="B", unit_scale=True, unit_divisor=1024)
            self._thread = threading.Thread(target=self._run, args=(self._bar,), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join()
            self._bar.close()
