"""BIG-bench JSON tasks, taken from the PyPI `bigbench==1.0.0` sdist without installing it.

The sdist (358 MB) is downloaded once, the `task.json` files of the requested tasks (and their
subtasks) are extracted into the cache, and the archive is deleted: the extracted JSON is all we read.
Items are formatted as BIG-bench's own `default_format_fn` does at zero shots (task prefix, input
prefix, the choices appended in BIG-bench's seeded order when the task asks for it, output prefix) and
each `target_scores` key is scored as a continuation; the highest-scored keys are correct.
"""

from __future__ import annotations

import json
import re
import tarfile
import tempfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from ...artifacts import cache_root, pip_download
from ...atomic import atomic_folder
from .base import DataError, MultipleChoiceItem

REQUIREMENT = "bigbench==1.0.0"
TASK_JSON = re.compile(r"^bigbench-1\.0\.0/bigbench/benchmark_tasks/([^/]+)/((?:[^/]+/)?)task\.json$")
FORMAT_SEED = 42  # BIG-bench's default random_seed for the choice order


def bigbench_dir() -> Path:
    return cache_root() / "data" / "bigbench"


def fetch_bigbench(names: list[str]) -> Path:
    """Extract the named tasks' task.json files (once) and return the folder holding them."""
    root = bigbench_dir()
    missing = [n for n in names if not (root / n / "task.json").exists()]
    if not missing:
        return root
    with tempfile.TemporaryDirectory(dir=cache_root()) as tmp, ExitStack() as folders:
        archive = pip_download(REQUIREMENT, Path(tmp), sdist=True)
        staged = {name: folders.enter_context(atomic_folder(root / name)) for name in missing}
        with tarfile.open(archive) as tar:
            for member in tar:
                m = TASK_JSON.match(member.name)
                if m and m.group(1) in staged and member.isfile():
                    target = staged[m.group(1)] / m.group(2) / "task.json"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(tar.extractfile(member).read())
        for name, folder in staged.items():
            if not any(folder.iterdir()):
                raise DataError(f"BIG-bench has no JSON task named {name!r}")
    return root


def choice_order(scores: dict) -> list[str]:
    """The choices in the order BIG-bench shows them (a permutation seeded by its default random_seed)."""
    return [str(c) for c in np.random.RandomState(seed=FORMAT_SEED).permutation(sorted(scores))]


def format_example(example: dict, task: dict) -> MultipleChoiceItem:
    """BIG-bench's zero-shot `default_format_fn`, then its task prefix."""
    scores = example["target_scores"]
    text = example["input"]
    if task.get("append_choices_to_input", True):
        choice_prefix = task.get("choice_prefix", "\n  choice: ")
        text = text + choice_prefix + choice_prefix.join(choice_order(scores))
    prompt = (str(task.get("task_prefix", "")) + task.get("example_input_prefix", "\nQ: ") + text
              + task.get("example_output_prefix", "\nA: "))
    choices = tuple(scores)
    best = max(scores.values())
    return MultipleChoiceItem((prompt,), choices, choices, tuple(i for i, c in enumerate(choices) if scores[c] == best))


def unique_examples(task: dict) -> list[dict]:
    """The task's examples without duplicates (BIG-bench drops them too)."""
    seen, examples = set(), []
    for example in task.get("examples", []):
        key = json.dumps(example)
        if key not in seen:
            seen.add(key)
            examples.append(example)
    return examples


def task_jsons(name: str, root: Path | None = None) -> list[dict]:
    """A task's JSON, then its subtasks' in order (elementary_math_qa is split into subtasks)."""
    folder = (root or fetch_bigbench([name])) / name
    paths = [folder / "task.json"] + sorted(p / "task.json" for p in folder.iterdir() if (p / "task.json").exists())
    return [json.loads(path.read_text(encoding="utf-8")) for path in paths]


def rendered_texts(name: str, root: Path | None = None) -> list[str]:
    """Every example of a task (and its subtasks) as one text: the zero-shot prompt, then the answer (the
    best-scored choice of a multiple-choice example, the first target of a generative one). Training text
    for a corpus, or the target of a data mix."""
    texts = []
    for task in task_jsons(name, root):
        for example in unique_examples(task):
            if "target_scores" in example:
                item = format_example(example, task)
                texts.append(item.contexts[0] + item.continuations[item.gold[0]])
            elif example.get("target"):
                target = example["target"]
                target = target[0] if isinstance(target, list) else target
                texts.append(str(task.get("task_prefix", "")) + task.get("example_input_prefix", "\nQ: ")
                             + example["input"] + task.get("example_output_prefix", "\nA: ") + str(target))
    if not texts:
        raise DataError(f"BIG-bench task {name} has no examples")
    return texts


def load_bigbench(name: str, root: Path | None = None) -> list[MultipleChoiceItem]:
    """All multiple-choice items of a task and its subtasks."""
    items = [format_example(example, task) for task in task_jsons(name, root) for example in unique_examples(task)
             if "target_scores" in example]
    if not items:
        raise DataError(f"BIG-bench task {name} has no multiple-choice examples")
    return items
