"""The mix drawn: utilities across the proxy's checkpoints, and the weights beside the natural and uniform ones."""

from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_file


def plot_mix(mix: dict, out: str | Path, title: str = "simulation-driven data mix") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(mix["weights"])
    steps = [c["step"] for c in mix["checkpoints"]]
    fig, (ax, ax_w) = plt.subplots(1, 2, figsize=(12, 4.8))
    for d in domains:
        ax.plot(steps, [c["utilities"][d] for c in mix["checkpoints"]], "o-", label=d)
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xlabel("proxy step")
    ax.set_ylabel("cosine(domain gradient, target gradient)")
    ax.set_title("utility per checkpoint", loc="left")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    width = 0.27
    for i, (name, table) in enumerate((("uniform", mix["uniform"]), ("natural", mix["natural"]),
                                       ("SDM", mix["weights"]))):
        ax_w.bar([k + (i - 1) * width for k in range(len(domains))], [table[d] for d in domains], width, label=name)
    ax_w.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
    ax_w.set_ylabel("sampling weight")
    ax_w.set_title("weights", loc="left")
    ax_w.legend()
    ax_w.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_file(out, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)
    return Path(out)
