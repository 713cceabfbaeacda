"""The weight search drawn: score against weights (a triangle for three models, a line for two)."""

from __future__ import annotations

import io
from pathlib import Path

from ..atomic import atomic_file
from .search import SearchResult


def plot_search(result: SearchResult, labels: list[str], out: str | Path, title: str = "merge weight search") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = [w for w, _ in result.trials]
    scores = [s for _, s in result.trials]
    best_w, best_s = result.best
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    if len(labels) == 3:  # barycentric: corner i is model i alone
        corners = [(0.0, 0.0), (1.0, 0.0), (0.5, 3 ** 0.5 / 2)]

        def xy(w):
            return (sum(wi * c[0] for wi, c in zip(w, corners)), sum(wi * c[1] for wi, c in zip(w, corners)))

        points = [xy(w) for w in weights]
        shown = ax.scatter([p[0] for p in points], [p[1] for p in points], c=scores, cmap="viridis_r", s=60)
        ax.plot(*zip(*(corners + corners[:1])), color="gray", linewidth=1)
        for corner, label in zip(corners, labels):
            ax.annotate(label, corner, textcoords="offset points", xytext=(0, -14 if corner[1] == 0 else 6),
                        ha="center")
        ax.scatter(*xy(best_w), marker="*", s=300, color="red", label=f"best {best_s:.4f}")
        ax.set_axis_off()
        fig.colorbar(shown, ax=ax, label="search score (lower is better)")
    elif len(labels) == 2:
        order = sorted(range(len(weights)), key=lambda i: weights[i][0])
        ax.plot([weights[i][0] for i in order], [scores[i] for i in order], "o-")
        ax.scatter([best_w[0]], [best_s], marker="*", s=300, color="red", label=f"best {best_s:.4f}")
        ax.set_xlabel(f"weight of {labels[0]} (the rest: {labels[1]})")
        ax.set_ylabel("search score")
    else:
        ax.plot(range(1, len(scores) + 1), scores, "o", alpha=0.6)
        ax.axhline(best_s, color="red", label=f"best {best_s:.4f}")
        ax.set_xlabel("trial")
        ax.set_ylabel("search score")
    ax.set_title(title, loc="left")
    ax.legend(loc="upper right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    with atomic_file(Path(out), "wb") as f:
        f.write(buffer.getvalue())
    return Path(out)
