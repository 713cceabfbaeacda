"""What every benchmark JSON records about where it ran, and its atomic write."""

from __future__ import annotations

import os
import platform
import resource
import threading
from pathlib import Path

import torch

from mobilellm.atomic import write_json_atomic
from mobilellm.pipeline.runner import cpu_model


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of a streaming read on this process's threads: the best of `repeats` sums over a `gib` GiB fp32
    tensor, far beyond the caches. The memory roofline every decode benchmark compares against."""
    import time

    x = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def machine_info(note: str | None = None) -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "python": platform.python_version(),
            "note": note or "shared machine: other jobs may run beside this one; compare ratios within one run, "
                            "absolute times are noisy"}


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler:
    """Peak resident memory while the block runs, sampled every `interval` seconds (the process-wide
    ru_maxrss would also count transients from before the block, such as weight initialisation)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_mib = interval, 0.0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, current_rss_mib())
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self.start_mib = current_rss_mib()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, current_rss_mib())


def write_json(path: Path, data: dict) -> None:
    """A results file, indented as the committed ones are."""
    write_json_atomic(path, data, indent=2)
