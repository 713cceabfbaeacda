"""Run tasks, keep results as JSON, print them as a table, and compare two result files item by item.

A results file holds, per task, every metric with its standard error, and per item what was asked (an `item`
hash) and what each model answered, so two files of the same tasks compare paired: `paired_comparison`.
Files written before version 2 (no standard errors, no item hashes) still load and compare, paired by position.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..atomic import write_json_atomic
from ..model import build_model
from ..schema import Schema, read_json_object
from . import metrics, stats
from .tasks import get_task
from .tasks.bigbench import fetch_bigbench, unsupported_metrics

RESULTS_VERSION = 2  # 2 added per-metric "stderr", "num_fewshot", per-sample "item" ids, quantization metadata
BLEU_BOOTSTRAP_ITERS = 100  # lm-eval bootstraps bleu / chrf / ter with min(bootstrap_iters, 100) resamples
LOWER_IS_BETTER = ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


def run_tasks(lm, task_names: list[str], *, data_dir: Path | None = None, limit: int | None = None,
              num_fewshot: int = 0, fewshot_seed: int | None = None, log=print) -> dict:
    """Evaluate each task (its first `limit` items when given, at `num_fewshot` shots); the results document.

    fewshot_seed: None takes each task family's own default (BIG-bench 42, lm-eval 1234).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    tasks = [get_task(name) for name in task_names]  # unknown names fail before any work
    bigbench_names = [t.name.removeprefix("bigbench_").partition(":")[0] for t in tasks if t.name.startswith("bigbench_")]
    if bigbench_names:
        fetch_bigbench(bigbench_names)  # one download for all of them
    results = {}
    for task in tasks:
        items = task.items(data_dir, num_fewshot=num_fewshot, seed=fewshot_seed, limit=limit)
        start = time.perf_counter()
        result = task.evaluate(lm, items)
        seconds = time.perf_counter() - start
        for sample, item in zip(result.samples, items):
            sample["item"] = item_id(item)
        corpus = {m: key for m, key in task.corpus_metrics.items() if m in result.metrics}
        results[task.name] = {"metrics": result.metrics, "stderr": metric_stderrs(result.metrics, result.samples, corpus),
                              "main_metric": task.main_metric, "n": len(items), "num_fewshot": num_fewshot,
                              "fewshot_seed": task.default_fewshot_seed if fewshot_seed is None else fewshot_seed,
                              "corpus_metrics": corpus,
                              "seconds": round(seconds, 1), "samples": result.samples}
        if task.name.startswith("bigbench_"):
            results[task.name]["unsupported_metrics"] = unsupported_metrics(task.name.removeprefix("bigbench_"))
        main = task.main_metric
        log(f"{task.name}: {main} {result.metrics[main]:.4f} +- {results[task.name]['stderr'][main]:.4f} "
            f"({len(items)} items, {num_fewshot}-shot, {seconds:.0f} s)")
    return {"version": RESULTS_VERSION, "model": model_description(lm), "limit": limit, "num_fewshot": num_fewshot,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "torch": torch.__version__},
            "tasks": results}


def item_id(item) -> str:
    """A short hash of what was asked (prompt with its shots, choices, answers): pairs results item by item."""
    data = item if isinstance(item, str) else dataclasses.asdict(item)
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


# ---- metrics recomputed from per-item data (standard errors, paired comparisons) ------------------------------

def corpus_value(metric: str, key: str, samples: list[dict]) -> float:
    """A corpus-level metric from its per-item statistics: BLEU from summed n-gram counts, perplexity from summed
    log-likelihoods over summed tokens / words / bytes."""
    if key == "bleu_stats":
        return metrics.corpus_bleu([s["bleu_stats"] for s in samples])
    if key == "perplexity":
        ll = sum(s["loglik"] for s in samples)
        units = {"token_perplexity": "tokens", "word_perplexity": "words", "byte_perplexity": "bytes",
                 "bits_per_byte": "bytes"}[metric]
        per_unit = -ll / sum(s[units] for s in samples)
        return per_unit / math.log(2) if metric == "bits_per_byte" else math.exp(per_unit)
    raise ValueError(f"no way to recompute {metric} from {key!r}")


def per_item(metric: str, samples: list[dict]) -> list[float] | None:
    values = [s[metric] for s in samples if metric in s]
    return values if values and isinstance(values[0], (int, float)) else None


def metric_stderrs(task_metrics: dict, samples: list[dict], corpus: dict[str, str]) -> dict[str, float]:
    """The standard error of every metric, as lm-eval computes it (mean: mean_stderr; corpus: bootstrap)."""
    out = {}
    for metric in task_metrics:
        if metric in corpus:
            key = corpus[metric]
            iters = BLEU_BOOTSTRAP_ITERS if key == "bleu_stats" else stats.BOOTSTRAP_ITERS
            out[metric] = stats.bootstrap_stderr(lambda xs, m=metric, k=key: corpus_value(m, k, xs), samples, iters)
        else:
            values = per_item(metric, samples)
            out[metric] = stats.mean_stderr(values) if values else float("nan")
    return out


def model_description(lm) -> dict:
    """What was evaluated: parameter count from the model config (a quantized model's packed weights included),
    quantization scheme, weight dtype, size of the weight files on disk."""
    cfg = lm.model.config
    floats = [p for p in lm.model.parameters() if p.is_floating_point()]
    desc = {"name": cfg.name, "checkpoint": getattr(lm, "checkpoint", None),
            "parameters": build_model(cfg, device="meta").num_parameters(),
            "dtype": str(floats[0].dtype).removeprefix("torch.") if floats else None}
    quant = getattr(lm, "quant", None)
    desc["quantization"] = quant.to_dict() if quant is not None else None
    desc["scheme"] = quant.scheme if quant is not None else desc["dtype"]
    source = getattr(lm, "source", None)
    desc["size_on_disk_bytes"] = weights_bytes(Path(source)) if source is not None else None
    return desc


def weights_bytes(source: Path) -> int:
    """Bytes of the weight files: a .gguf file, or a folder's *.safetensors."""
    if source.is_file():
        return source.stat().st_size
    return sum(p.stat().st_size for p in source.glob("*.safetensors"))


def save_results(results: dict, path: Path) -> None:
    """Written to a temporary file renamed into place: an interrupted run leaves no half file."""
    write_json_atomic(path, results, indent=1)


def load_results(path: Path) -> dict:
    fix = "give a results file written by mobilellm eval --out"
    return Schema({"tasks": (dict,)}, ("tasks",), fix=fix).check(read_json_object(path, fix=fix), path)


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def results_table(results: dict) -> str:
    """One row per metric: value and standard error (the main metric starred)."""
    rows = []
    for name, task in results["tasks"].items():
        stderr = task.get("stderr", {})
        for metric, value in task["metrics"].items():
            rows.append([name, metric + (" *" if metric == task["main_metric"] else ""), _fmt(value),
                         _fmt(stderr.get(metric, float("nan"))), str(task.get("num_fewshot", 0)), str(task["n"])])
    return _table(["task", "metric", "value", "stderr", "shots", "n"], rows)


def answer(sample: dict):
    """What the model answered on one item: its choice, its text, or None where nothing is answered."""
    if "choice" in sample:
        return sample["choice"]
    if "logliks" in sample:  # results files before version 2
        return max(range(len(sample["logliks"])), key=lambda i: sample["logliks"][i])
    for key in ("prediction", "completion"):
        if key in sample:
            return sample[key]
    return None


def align(ta: dict, tb: dict) -> tuple[list[dict], list[dict], str]:
    """The two tasks' samples on the same items: by item hash, or by position for files without hashes."""
    sa, sb = ta.get("samples") or [], tb.get("samples") or []
    if sa and sb and all("item" in s for s in sa + sb):
        if [s["item"] for s in sa] == [s["item"] for s in sb]:
            return sa, sb, "by item"
        by_id = {s["item"]: s for s in sb}
        common = [s for s in sa if s["item"] in by_id]
        if not common:
            raise ValueError("no item in common: were the two files run with the same data, shots and seed?")
        return common, [by_id[s["item"]] for s in common], "by item (common items)"
    if len(sa) != len(sb):
        raise ValueError(f"cannot pair {len(sa)} items with {len(sb)} (files without item hashes pair by position)")
    return sa, sb, "by position"


def paired_comparison(a: dict, b: dict) -> list[dict]:
    """Every metric of the tasks both results hold, B against A on the same items.

    Each row: the two values, diff = B - A, its standard error and 95% interval (paired t on per-item scores,
    or a paired bootstrap for corpus metrics), how many answers changed, and the verdict: "within noise" when
    the interval holds 0, else "B better" / "B worse" (lower is better for perplexities).
    """
    rows = []
    for name in [n for n in a["tasks"] if n in b["tasks"]]:
        ta, tb = a["tasks"][name], b["tasks"][name]
        sa, sb, how = align(ta, tb)
        changed = sum(answer(x) != answer(y) for x, y in zip(sa, sb)) if sa and answer(sa[0]) is not None else None
        corpus = {**ta.get("corpus_metrics", {}), **tb.get("corpus_metrics", {})}
        for metric in [m for m in ta["metrics"] if m in tb["metrics"]]:
            va, vb = ta["metrics"][metric], tb["metrics"][metric]
            xa, xb = per_item(metric, sa), per_item(metric, sb)
            if metric in corpus and sa:
                f = lambda xs, m=metric, k=corpus[metric]: corpus_value(m, k, xs)
                iters = BLEU_BOOTSTRAP_ITERS if corpus[metric] == "bleu_stats" else stats.BOOTSTRAP_ITERS
                pd = stats.paired_bootstrap_difference(f, sa, sb, iters)
            elif xa is not None and xb is not None and len(xa) == len(xb) == len(sa):
                pd = stats.paired_mean_difference(xa, xb)
            else:
                pd = None
            diff = vb - va if pd is None else pd.diff
            if pd is None:
                verdict = "no per-item scores"
            elif pd.diff != 0 and math.isnan(pd.low):
                verdict = "too few items"
            elif pd.within_noise:
                verdict = "within noise"
            else:
                verdict = "B better" if (diff < 0) == (metric in LOWER_IS_BETTER) else "B worse"
            rows.append({"task": name, "metric": metric, "a": va, "b": vb, "diff": diff,
                         "stderr": pd.stderr if pd else float("nan"), "low": pd.low if pd else float("nan"),
                         "high": pd.high if pd else float("nan"), "method": pd.method if pd else None,
                         "changed": changed, "n": len(sa) or ta["n"], "paired": how, "verdict": verdict})
    if not rows:
        raise ValueError("the two results files share no task")
    return rows


def compare_table(a: dict, b: dict, label_a: str = "A", label_b: str = "B") -> str:
    """The paired comparison as a table; the verdict names B by its label."""
    rows = [[r["task"], r["metric"], _fmt(r["a"]), _fmt(r["b"]), f"{r['diff']:+.4f}", _fmt(r["stderr"]),
             f"[{r['low']:+.4f}, {r['high']:+.4f}]", "-" if r["changed"] is None else str(r["changed"]), str(r["n"]),
             r["verdict"].replace("B ", f"{label_b} ")] for r in paired_comparison(a, b)]
    return _table(["task", "metric", label_a, label_b, "diff", "stderr", "95% interval", "changed", "n", "verdict"], rows)
