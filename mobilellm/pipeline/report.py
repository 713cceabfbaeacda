"""The pipeline's report: OUT/report.md and a self-contained OUT/report.html (figures as base64 PNG), every number
read from the run's own files (each stage's stage.json and what it names).

Sections: environment, summary (each stage: tokens, wall time, key metric), loss curves, the mix, long context
(needle heatmaps, loss by position), the merge, full precision vs PTQ vs QAT (paired), the KD experiment when run,
the final int4 model (size, decode tokens/s, its answer), the lineage of every checkpoint.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

from ..atomic import atomic_file, write_text_atomic
from .runner import Record, read_record

FIGURES = "report-figures"


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.3e}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def key_metric(record: Record) -> str:
    m, name = record.data["metrics"], record.data["stage"]
    if name == "corpus":
        return f"{sum(d['documents'] for d in m['domains'].values()):,} documents"
    if name == "tokenize":
        return ", ".join(f"{d} {v['train_tokens']:,}" for d, v in m["domains"].items()) + " train tokens"
    if name == "mix":
        return "weights " + ", ".join(f"{d} {w:.3f}" for d, w in m["weights"].items())
    if name == "specialists":
        return ", ".join(f"{d} loss {fmt(v['final_loss'])}" for d, v in m.items())
    if name == "merge":
        return (f"report loss {fmt(m['best']['report_losses']['mean'])} (uniform "
                f"{fmt(m['uniform']['report_losses']['mean'])})")
    if name == "eval":
        models = m["models"]
        return ", ".join(f"{n} loss {fmt(r['held_out_loss'])}" for n, r in models.items())
    if name == "export":
        return f"{m['size_bytes'] / 1e6:.1f} MB, {fmt(m['decode_tokens_per_s'], 1)} tok/s"
    if name == "phase1-baseline":
        return ", ".join(f"{a} loss {fmt(r['held_out_loss'])}" for a, r in m["arms"].items())
    if "final_loss" in m:
        return f"loss {fmt(m['first_loss'])} -> {fmt(m['final_loss'])}" + (
            f", val {fmt(m['val_loss'])}" if m.get("val_loss") is not None else "") + (
            f" ({', '.join(f'{d} {fmt(v)}' for d, v in m['val_loss_by_domain'].items())})"
            if m.get("val_loss_by_domain") else "")
    return "-"


class Doc:
    """Blocks rendered twice: Markdown (figures as files) and HTML (figures inline)."""

    def __init__(self, out: Path):
        self.out, self.md, self.html = out, [], []

    def heading(self, text: str, level: int = 2):
        self.md.append("#" * level + " " + text + "\n")
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def para(self, text: str):
        self.md.append(text + "\n")
        self.html.append(f"<p>{html.escape(text)}</p>")

    def table(self, header: list[str], rows: list[list]):
        rows = [[fmt(c) for c in row] for row in rows]
        self.md.append("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
                       + "".join("| " + " | ".join(c.replace("|", "/") for c in row) + " |\n" for row in rows))
        cells = lambda row, tag: "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in row)
        self.html.append("<table><tr>" + cells(header, "th") + "</tr>" + "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows)
                         + "</table>")

    def figure(self, path: Path | None, caption: str):
        if path is None or not Path(path).exists():
            self.para(f"({caption}: no figure)")
            return
        self.md.append(f"![{caption}]({os.path.relpath(path, self.out)})\n")
        data = base64.b64encode(Path(path).read_bytes()).decode()
        self.html.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def write(self, title: str):
        write_text_atomic(self.out / "report.md", "\n".join(self.md))
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
                 "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:100%}")
        write_text_atomic(self.out / "report.html", f"<!doctype html><html><head><meta charset='utf-8'><title>"
                          f"{html.escape(title)}</title><style>{style}</style></head><body>" + "\n".join(self.html)
                          + "</body></html>\n")


def loss_figure(records: dict[str, Record], out: Path) -> Path | None:
    """Every training run's loss (and validation loss) by step, one panel per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..train.metrics import read_metrics

    runs = []
    for name, record in records.items():
        for label, rel in record.data.get("files", {}).items():
            folder = record.folder / rel
            if (folder / "metrics.jsonl").exists():
                runs.append((f"{name}" + ("" if label == "run" else f" ({label})"), read_metrics(folder)))
    if not runs:
        return None
    cols = min(3, len(runs))
    fig, axes = plt.subplots((len(runs) + cols - 1) // cols, cols, figsize=(5 * cols, 3.2 * ((len(runs) + cols - 1) // cols)),
                             squeeze=False)
    for ax, (label, rows) in zip(axes.flat, runs):
        train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
        val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        if train:
            ax.plot(*zip(*train), label=f"train ({rows[0].get('objective', 'loss')})")
        if val:
            ax.plot(*zip(*val), "o-", label="val CE")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    fig.tight_layout()
    path = out / FIGURES / "losses.png"
    path.parent.mkdir(exist_ok=True)
    with atomic_file(path, "wb") as fh:  # a killed report leaves the old figure, never half of one
        fig.savefig(fh, format="png", dpi=90)
    plt.close(fig)
    return path


def comparison_rows(label: str, comparison: dict) -> list[list]:
    loss = comparison["held_out_loss"]
    rows = [[label, "held-out loss", loss["a"], loss["b"], f"{loss['diff']:+.4f}", loss["stderr"],
             f"[{loss['low']:+.4f}, {loss['high']:+.4f}]", "within noise" if loss["within_noise"] else
             ("worse" if loss["diff"] > 0 else "better")]]
    for r in comparison["tasks"]:
        rows.append([label, f"{r['task']} {r['metric']}", r["a"], r["b"], f"{r['diff']:+.4f}", r["stderr"],
                     f"[{r['low']:+.4f}, {r['high']:+.4f}]", r["verdict"].replace("B ", "")])
    return rows


def environment_rows(records: dict[str, Record]) -> list[list]:
    """The environment each stage recorded in its stage.json (one row per setting; stages that differ are named)."""
    envs = {n: r.data["environment"] for n, r in records.items() if r.data.get("environment")}
    if not envs:
        return [["environment", "not recorded by these stages"]]
    keys = list(next(iter(envs.values())))
    rows = []
    for key in keys:
        values = {}
        for name, env in envs.items():
            values.setdefault(fmt(env.get(key)), []).append(name)
        rows.append([key, values.popitem()[0] if len(values) == 1 else
                     "; ".join(f"{v} ({', '.join(ns)})" for v, ns in values.items())])
    return rows


def val_figure(curves: dict[str, list[tuple[int, float]]], out: Path, name: str, title: str) -> Path | None:
    """Held-out CE by step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(curves.values()):
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, points in curves.items():
        if points:
            ax.plot(*zip(*points), "o-", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out CE (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / FIGURES / name
    path.parent.mkdir(exist_ok=True)
    with atomic_file(path, "wb") as fh:  # a killed report leaves the old figure, never half of one
        fig.savefig(fh, format="png", dpi=90)
    plt.close(fig)
    return path


def val_curve(folder: Path, key: str = "val_loss") -> list[tuple[int, float]]:
    """(step, held-out CE) of a run; `key` val_loss/<domain> for one domain's."""
    from ..train.metrics import read_metrics

    if not (folder / "metrics.jsonl").exists():
        return []
    return [(r["step"], r[key]) for r in read_metrics(folder) if r.get(key) is not None]


def val_curves_by_domain(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{"all domains": the mean's curve, domain: its own} for a run that measured validation by domain."""
    from ..train.metrics import read_metrics

    rows = read_metrics(folder) if (folder / "metrics.jsonl").exists() else []
    keys = sorted({k for r in rows for k in r if k.startswith("val_loss/")})
    return {"all domains": val_curve(folder), **{k.split("/", 1)[1]: val_curve(folder, k) for k in keys}}


def score_columns(results: dict[str, dict]) -> list[str]:
    return sorted({t for r in results.values() for t in r["tasks"]})


def score(result: dict, task: str):
    r = result["tasks"].get(task)
    return r["metrics"][r["main_metric"]] if r else None


def summary_section(doc: Doc, records: dict[str, Record]):
    doc.heading("Summary")
    total = sum(r.data["seconds"] for r in records.values())
    doc.table(["stage", "tokens", "budget tokens", "wall time", "processes", "resumed", "key metric"],
              [[n, r.data["tokens"], r.data.get("budget_tokens"), duration(r.data["seconds"]),
                r.data.get("processes", 1), r.data["resumed"], key_metric(r)] for n, r in records.items()])
    started = min((r.data["started"] for r in records.values() if r.data.get("started")), default=None)
    finished = max((r.data["finished"] for r in records.values() if r.data.get("finished")), default=None)
    doc.para(f"Total wall time of the stages: {duration(total)} ({total:.0f} s); first stage started {started}, "
             f"last finished {finished} (UTC).")


def merge_section(doc: Doc, record: Record):
    m = record.data["metrics"]
    domains = [d for d in m["best"]["report_losses"] if d != "mean"]
    doc.heading("Merge")
    doc.para(f"Specialists merged: {', '.join(m['domains'])}. Held-out loss by domain on the report half of the "
             "held-out documents (the search used the other half):")
    doc.table(["", "weights (" + ", ".join(m["domains"]) + ")", "search loss"] + domains + ["mean"],
              [[label, [round(w, 3) for w in r["weights"]], r.get("search_loss")]
               + [r["report_losses"][d] for d in domains] + [r["report_losses"]["mean"]]
               for label, r in (("searched", m["best"]), ("uniform", m["uniform"]))])
    trials = sorted(m["trials"], key=lambda t: t["score"])
    doc.para(f"Weight search: {len(trials)} candidates; the five best by search loss:")
    doc.table(["weights", "search loss"], [[[round(w, 3) for w in t["weights"]], t["score"]] for t in trials[:5]])
    doc.figure(record.file("figure"), "merge weight search")


def quant_section(doc: Doc, ev: dict):
    doc.heading("Full precision vs PTQ vs QAT")
    tasks = score_columns(ev["models"])
    doc.table(["model", "held-out loss", "perplexity", "size on disk"] + tasks,
              [[n, r["held_out_loss"], r["held_out_perplexity"], (r["model"] or {}).get("size_on_disk_bytes")]
               + [score(r, t) for t in tasks] for n, r in ev["models"].items()])
    doc.para("full precision: the merged model; PTQ int4: it, quantized without training; QAT int4: after QAT; "
             "final, fake quant: after instruction tuning (SFT/DPO) with the fake quantization on, before the int4 "
             "conversion; final int4: the model exported. Held-out loss is on the pretraining data's held-out "
             "documents, which instruction tuning is not trained on.")
    doc.para("Each model against full precision, paired on the same batches / items "
             "(mobilellm.eval.stats, eval.report.paired_comparison):")
    doc.table(["model", "metric", "full precision", "model", "diff", "stderr", "95% interval",
               "model against full precision"],
              [row for name, c in ev["vs_full_precision"].items() for row in comparison_rows(name, c)])


def baseline_section(doc: Doc, records: dict[str, Record], out: Path):
    record = records["phase1-baseline"]
    m = record.data["metrics"]
    doc.heading("Knowledge distillation against its baseline (phase 1, same tokens and seed)")
    start = "subcloned from the teacher" if record.data["settings"]["recipe"].get("inherit") else "from scratch"
    doc.para(f"Each arm trains phase 1 ({start}) on {fmt(m.get('tokens_per_arm'))} tokens of the same mix: kd "
             "(KL to the teacher) or ce (next-token cross-entropy), same seed per pair. The paper: 49.31 -> 53.74 "
             "average (SPEC.md 2.1).")
    tasks = score_columns(m["arms"])
    doc.table(["arm", "held-out loss", "perplexity"] + tasks,
              [[a, r["held_out_loss"], r["held_out_perplexity"]] + [score(r, t) for t in tasks]
               for a, r in m["arms"].items()])
    doc.table(["seed", "metric", "KD", "CE", "diff (CE - KD)", "stderr", "95% interval", "CE against KD"],
              [row for seed, c in m["kd_vs_ce"].items() for row in comparison_rows(seed, c)])
    curves = {}
    for arm in m["arms"]:
        folder = record.file(arm)
        if folder is None and "phase1" in records:  # the main run is the KD arm of its seed
            folder = records["phase1"].file("run")
        curves[arm] = val_curve(folder) if folder is not None else []
    doc.figure(val_figure(curves, out, "kd-vs-ce.png", "phase 1: held-out CE, KD vs CE"),
               "held-out CE by step, each arm")


def write_report(plan, out: str | Path, stage_names: list[str] | None = None) -> Path:
    """Write OUT/report.md and OUT/report.html from the finished stages' records."""
    out = Path(out)
    names = stage_names or sorted(p.name for p in out.iterdir() if (p / "stage.json").exists())
    records = {n: r for n in names if (r := read_record(out / n)) is not None}
    doc = Doc(out)
    doc.heading(f"mobilellm pipeline: {plan.name}", 1)
    doc.heading("Environment")
    doc.table(["", "value"], environment_rows(records))
    summary_section(doc, records)
    doc.heading("Loss curves")
    doc.figure(loss_figure(records, out), "training loss per stage")
    if "phase1" in records:
        doc.figure(val_figure(val_curves_by_domain(records["phase1"].file("run")), out, "phase1-val.png",
                              "phase 1: held-out CE"), "phase 1 held-out CE by step, all domains and each")
    if "mix" in records:
        m = records["mix"].data["metrics"]
        doc.heading("Data mix (SDM)")
        doc.table(["domain", "utility", "weight", "natural share"],
                  [[d, m["utilities"].get(d), w, m["natural"].get(d)] for d, w in m["weights"].items()])
        doc.figure(records["mix"].file("figure"), "mix weights")
    if "eval" in records:
        ev = records["eval"].data["metrics"]
        doc.heading("Long context")
        for name, grid in ev["needle"].items():
            doc.para(f"Needle, {name}: mean {grid['mean']:.3f} over lengths {grid['lengths']} x depths {grid['depths']}.")
            doc.table(["depth"] + [f"{n:,} tokens" for n in grid["lengths"]],
                      [[d] + list(row) for d, row in zip(grid["depths"], grid["accuracy"])])
            doc.figure(records["eval"].file(f"needle {name}"), f"needle heatmap: {name}")
        if ev["position_loss"]:
            edges = next(iter(ev["position_loss"]["curves"].values()))["edges"]
            doc.para(f"Loss by position over {ev['position_loss']['documents']} held-out documents:")
            doc.table(["model"] + [f"pos {a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:])],
                      [[n] + c["loss"] for n, c in ev["position_loss"]["curves"].items()])
            doc.figure(records["eval"].file("position loss"), "loss by position")
    if "merge" in records:
        merge_section(doc, records["merge"])
    if "eval" in records:
        quant_section(doc, records["eval"].data["metrics"])
    if "phase1-baseline" in records:
        baseline_section(doc, records, out)
    if "export" in records:
        m = records["export"].data["metrics"]
        doc.heading("The final int4 model")
        doc.table(["", "value"], [["scheme", m["scheme"]], ["size (weights on disk)", f"{m['size_bytes'] / 1e6:.2f} MB"],
                                  ["decode tokens/s (greedy, this machine)", m["decode_tokens_per_s"]],
                                  ["torch threads", m["threads"]], [".pte", m.get("pte", "-")],
                                  ["prompt", m["prompt"]], ["answer", repr(m["answer"])],
                                  ["new tokens", m.get("new_tokens")]])
    doc.heading("Lineage of every checkpoint")
    doc.table(["stage", "checkpoint", "made from", "how"],
              [[n, e["checkpoint"], "; ".join(e["from"]), e["how"]] for n, r in records.items()
               for e in r.data.get("lineage", [])])
    doc.write(f"mobilellm pipeline {plan.name}")
    return out / "report.md"
