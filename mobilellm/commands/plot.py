"""`mobilellm plot`: a training run's loss curves to PNG."""

from __future__ import annotations

from pathlib import Path

from ..train.plot import plot_run


def plot(run_dir: Path, *, out: Path | None = None) -> None:
    """Draw a training run's train and validation loss curves (and the LR) to a PNG.

    Args:
        run_dir: the run folder given to `mobilellm pretrain --out` (it holds metrics.jsonl)
        out: PNG file to write (default: RUN_DIR/loss.png)
    """
    print(plot_run(run_dir, out))
