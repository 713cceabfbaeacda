"""Run tasks, keep results as JSON, print them as a table, and compare two result files."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..atomic import write_json_atomic
from .tasks import get_task
from ..schema import Schema, read_json_object

RESULTS_VERSION = 1


def run_tasks(lm, task_names: list[str], *, data_dir: Path | None = None, limit: int | None = None,
              log=print) -> dict:
    """Evaluate each task (its first `limit` items when given); returns the results document."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    tasks = [get_task(name) for name in task_names]  # unknown names fail before any work
    results = {}
    for task in tasks:
        items = task.load(task.find_file(data_dir))
        items = items[:limit] if limit else items
        start = time.perf_counter()
        result = task.evaluate(lm, items)
        seconds = time.perf_counter() - start
        results[task.name] = {"metrics": result.metrics, "main_metric": task.main_metric, "n": len(items),
                              "seconds": round(seconds, 1), "samples": result.samples}
        log(f"{task.name}: {task.main_metric} {result.metrics[task.main_metric]:.4f} ({len(items)} items, {seconds:.0f} s)")
    return {"version": RESULTS_VERSION, "model": model_description(lm), "limit": limit,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "torch": torch.__version__},
            "tasks": results}


def model_description(lm) -> dict:
    p = next(lm.model.parameters())
    return {"name": lm.model.config.name, "checkpoint": getattr(lm, "checkpoint", None),
            "parameters": sum(t.numel() for t in lm.model.parameters()), "dtype": str(p.dtype).removeprefix("torch.")}


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
    rows = []
    for name, task in results["tasks"].items():
        for metric, value in task["metrics"].items():
            rows.append([name, metric + (" *" if metric == task["main_metric"] else ""), _fmt(value), str(task["n"])])
    return _table(["task", "metric", "value", "n"], rows)


def compare_table(a: dict, b: dict, label_a: str = "A", label_b: str = "B") -> str:
    """Every metric of the tasks both files hold, side by side, with B - A."""
    rows = []
    for name in [n for n in a["tasks"] if n in b["tasks"]]:
        ta, tb = a["tasks"][name], b["tasks"][name]
        for metric in [m for m in ta["metrics"] if m in tb["metrics"]]:
            va, vb = ta["metrics"][metric], tb["metrics"][metric]
            n = str(ta["n"]) if ta["n"] == tb["n"] else f"{ta['n']}/{tb['n']}"
            rows.append([name, metric, _fmt(va), _fmt(vb), f"{vb - va:+.4f}", n])
    if not rows:
        raise ValueError("the two results files share no task")
    return _table(["task", "metric", label_a, label_b, "diff", "n"], rows)
