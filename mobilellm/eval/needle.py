"""Needle in a haystack: can the model repeat a pass key hidden at a given depth of a long context?

The haystack is filler text from any corpus, cut to the requested token length; the needle sentence
("The pass key is 48213. Remember it. 48213 is the pass key.") goes in at a fraction of the filler
(depth 0 = the start, 1 = just before the question), and the model answers greedily. The result is a
depth x length grid of retrieval accuracy, drawn as a heatmap.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..atomic import atomic_file

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class NeedleGrid:
    lengths: tuple[int, ...]  # prompt lengths in tokens
    depths: tuple[float, ...]  # where the needle sits, as a fraction of the filler
    accuracy: tuple[tuple[float, ...], ...]  # [depth][length]
    trials: int

    def to_dict(self) -> dict:
        return {"lengths": list(self.lengths), "depths": list(self.depths), "trials": self.trials,
                "accuracy": [list(row) for row in self.accuracy],
                "mean": sum(map(sum, self.accuracy)) / (len(self.depths) * len(self.lengths))}


def haystack_prompt(tokenizer, filler_ids: list[int], length: int, depth: float, key: str) -> str:
    """A prompt of about `length` tokens: filler with the needle inserted at `depth`, then the question."""
    needle = " " + NEEDLE.format(key=key) + " "
    n_filler = length - len(tokenizer.encode(needle)) - len(tokenizer.encode(QUESTION))
    if n_filler < 1:
        raise ValueError(f"length {length} leaves no room for filler around the needle")
    if n_filler > len(filler_ids):
        raise ValueError(f"the corpus has {len(filler_ids)} tokens, fewer than the {n_filler} needed for length {length}")
    cut = round(depth * n_filler)
    before, after = tokenizer.decode(filler_ids[:cut]), tokenizer.decode(filler_ids[cut:n_filler])
    return before + needle + after + QUESTION


def found(answer: str, key: str) -> bool:
    first_number = re.search(r"\d+", answer)
    return bool(first_number) and first_number.group() == key


def needle_grid(lm, corpus: str, lengths: list[int], depths: list[float], trials: int = 3,
                seed: int = 0) -> NeedleGrid:
    if any(not 0 <= d <= 1 for d in depths):
        raise ValueError(f"depths must lie in [0, 1], got {depths}")
    too_long = [n for n in lengths if n + 8 > lm.max_len]
    if too_long:
        raise ValueError(f"lengths {too_long} do not fit the model's {lm.max_len}-token context")
    filler_ids = lm.tokenizer.encode(corpus)
    rng = random.Random(seed)
    accuracy = []
    with tqdm(total=len(depths) * len(lengths) * trials, desc="needle", disable=not lm.progress) as bar:
        for depth in depths:
            row = []
            for length in lengths:
                hits = 0
                for _ in range(trials):
                    key = str(rng.randint(10000, 99999))
                    prompt = haystack_prompt(lm.tokenizer, filler_ids, length, depth, key)
                    hits += found(lm.generate_until(prompt, ["\n"], max_new_tokens=8), key)
                    bar.update()
                row.append(hits / trials)
            accuracy.append(tuple(row))
    return NeedleGrid(tuple(lengths), tuple(depths), tuple(accuracy), trials)


def save_heatmap(grid: NeedleGrid, path: Path, title: str = "needle in a haystack") -> None:
    """Depth (rows) x length (columns) heatmap with each cell's accuracy written in it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(grid.lengths) + 2.5, 0.6 * len(grid.depths) + 1.8))
    image = ax.imshow(grid.accuracy, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(grid.lengths)), [str(n) for n in grid.lengths])
    ax.set_yticks(range(len(grid.depths)), [f"{d:.0%}" for d in grid.depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(grid.accuracy):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=9)
    ax.set_title(f"{title} (mean {grid.to_dict()['mean']:.2f}, {grid.trials} keys per cell)")
    fig.colorbar(image, ax=ax, label="retrieval accuracy")
    fig.tight_layout()
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)
