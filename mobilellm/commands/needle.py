"""`mobilellm needle`: pass-key retrieval over a depth x length grid, as JSON and a PNG heatmap."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from ..eval.lm import EvalLM, parse_dtype
from ..eval.needle import needle_grid, save_heatmap
from ..eval.report import save_results

CORPUS_CHARS = 400_000


def default_corpus() -> str:
    """The Python standard library's own sources: text every machine has."""
    text, lib = [], Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(lib.glob("*.py")):
        text.append(path.read_text(encoding="utf-8", errors="replace"))
        if sum(map(len, text)) > CORPUS_CHARS:
            break
    return "\n".join(text)


def parse_numbers(text: str, kind, flag: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated numbers, got {text!r}") from None


def needle(checkpoint: Path, *, lengths: str = "256,512,1024,2048", depths: str = "0,0.25,0.5,0.75,1",
           trials: int = 3, corpus: Path | None = None, out: Path | None = None, png: Path | None = None,
           dtype: str = "float32") -> None:
    """Needle in a haystack: hide a pass key at each depth of prompts of each length; plot retrieval.

    Args:
        checkpoint: checkpoint folder (weights, config and tokenizer.json)
        lengths: comma-separated prompt lengths in tokens
        depths: comma-separated needle depths as fractions of the prompt (0 = start, 1 = end)
        trials: pass keys tried per cell
        corpus: text file the haystack is cut from (default: the Python standard library's sources)
        out: results JSON to write
        png: heatmap PNG to write
        dtype: float32 or bfloat16
    """
    if trials < 1:
        raise ValueError(f"--trials must be >= 1, got {trials}")
    text = Path(corpus).read_text(encoding="utf-8", errors="replace") if corpus else default_corpus()
    lm = EvalLM.load(checkpoint, dtype=parse_dtype(dtype))
    grid = needle_grid(lm, text, parse_numbers(lengths, int, "--lengths"), parse_numbers(depths, float, "--depths"), trials)
    report_grid(grid, checkpoint, "needle", out, png, title=f"needle: {Path(checkpoint).name}")


def report_grid(grid, checkpoint, key: str, out: Path | None, png: Path | None, title: str, note: str = "") -> None:
    """Print a depth x length grid, write it as `key` in the results JSON `out` and as a heatmap `png`."""
    print(f"{'depth':>6}  " + "  ".join(f"{n:>6}" for n in grid.lengths))
    for depth, row in zip(grid.depths, grid.accuracy):
        print(f"{depth:>6.0%}  " + "  ".join(f"{v:>6.2f}" for v in row))
    print(f"mean {grid.to_dict()['mean']:.3f}{note}")
    if out is not None:
        save_results({"model": str(checkpoint), key: grid.to_dict()}, out)
        print(f"results written to {out}")
    if png is not None:
        save_heatmap(grid, png, title=title)
        print(f"heatmap written to {png}")
