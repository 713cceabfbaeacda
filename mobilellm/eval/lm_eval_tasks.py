"""BIG-bench multiple-choice tasks as lm-eval tasks on local files, so `lm_eval` runs them offline.

lm-eval's own BIG-bench configs load `hails/bigbench` from the HF Hub; these read a JSONL written from the items
`mobilellm eval` scores (the task.json of the cached PyPI sdist): one document per item with its context and
continuations exactly as our scorer sends them (`target_delimiter` "", so lm-eval adds nothing between them).
The config is JSON, which YAML reads as it is. Then:
    lm_eval --model mobilellm --model_args pretrained=FOLDER --include_path DIR --tasks NAME
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import atomic_file, write_json_atomic
from .tasks import BIGBENCH_PREFIX
from .tasks.base import DataError
from .tasks.bigbench import load_bigbench


def lm_eval_task_name(name: str) -> str:
    return name.replace(":", "_")  # lm-eval task names are plain identifiers


def write_lm_eval_task(name: str, folder: Path) -> Path:
    """Write `bigbench_<task>[:<subtask>]` as FOLDER/<name>.jsonl and FOLDER/<name>.yaml; return the config."""
    if not name.startswith(BIGBENCH_PREFIX):
        raise DataError(f"{name!r}: only BIG-bench tasks (bigbench_<task>) are written as local lm-eval tasks; "
                        "lm-eval's own configs for the standard tasks need the HF Hub")
    items = [item.multiple_choice() for item in load_bigbench(name.removeprefix(BIGBENCH_PREFIX)) if item.choices]
    if not items:
        raise DataError(f"{name} has no multiple-choice items (a generative task: score it with mobilellm eval)")
    task, folder = lm_eval_task_name(name), Path(folder)
    data = folder / f"{task}.jsonl"
    with atomic_file(data) as fh:
        for item in items:
            fh.write(json.dumps({"context": item.contexts[0], "choices": list(item.continuations),
                                 "gold": list(item.gold)}) + "\n")
    return write_json_atomic(folder / f"{task}.yaml", {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc"}],
    })
