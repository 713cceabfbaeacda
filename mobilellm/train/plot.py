"""Loss curves of a run (train and validation) drawn from its metrics.jsonl to a PNG."""

from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_file
from .metrics import read_metrics


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, bias-corrected so the curve starts at the first value."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw train loss (raw and smoothed), validation loss and the LR; returns the PNG path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"], r["lr"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train:
        raise ValueError(f"{run_dir} has no finished training steps to plot yet")
    steps, losses, lrs = zip(*train)
    objective = next((r["objective"] for r in records if "objective" in r), "loss")
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label=f"train {objective} (per step)")
    ax.plot(steps, smooth(list(losses), 0.9 if len(losses) > 20 else 0.0), color="tab:blue", linewidth=2,
            label=f"train {objective} (smoothed)")
    if val:
        v_steps, v_losses = zip(*val)
        ax.plot(v_steps, v_losses, "o-", color="tab:orange", linewidth=2, label="validation next-token CE")
    domains = sorted({key.split("/", 1)[1] for r in records for key in r if key.startswith("val_loss/")})
    for i, domain in enumerate(domains):  # each domain's held-out CE, thin and dashed beside the mean
        points = [(r["step"], r[f"val_loss/{domain}"]) for r in records if f"val_loss/{domain}" in r]
        ax.plot(*zip(*points), "--", marker=".", linewidth=1, color=f"C{2 + i}", label=f"validation CE: {domain}")
    ax.set_ylabel("loss")
    ax.set_title(f"{run_dir.name}: loss", loc="left")
    ax.grid(alpha=0.3)
    ax.legend()
    ax_lr.plot(steps, lrs, color="tab:gray")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "loss.png"
    with atomic_file(out, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)
    return out
