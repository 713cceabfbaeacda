"""What a task is: items of one kind, and how items of that kind are scored against an EvalLM."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ...errors import DataError
from .. import metrics


@dataclass(frozen=True)
class MultipleChoiceItem:
    """One question: each choice is scored as log p(continuation | context).

    Most tasks share one context (`contexts` has one entry); WinoGrande varies the context per choice
    and scores the same continuation. `choice_texts` are what acc_norm divides by (lm-eval's choices).
    """
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choice_texts: tuple[str, ...]
    gold: tuple[int, ...]  # indices of the correct choices

    def requests(self) -> list[tuple[str, str]]:
        n = len(self.choice_texts)
        contexts = self.contexts * n if len(self.contexts) == 1 else self.contexts
        continuations = self.continuations * n if len(self.continuations) == 1 else self.continuations
        return list(zip(contexts, continuations))


@dataclass(frozen=True)
class GenerationItem:
    prompt: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class ExactMatch:
    """How a generation task compares the answer (lm-eval's exact_match options)."""
    until: tuple[str, ...] = ("\n", ".", ",")
    max_new_tokens: int = 32
    ignore_case: bool = True
    ignore_punctuation: bool = True
    regexes_to_ignore: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaskResult:
    metrics: dict[str, float]
    samples: list[dict]


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    load: Callable[[Path | None], list]  # data file (or None for tasks that fetch their own) -> items
    evaluate: Callable[[object, list], TaskResult]  # (EvalLM, items) -> result
    files: tuple[str, ...] = ()  # file names looked up in the data folder; empty: the task brings its data
    main_metric: str = "acc"

    def find_file(self, data_dir: Path | None) -> Path | None:
        if not self.files:
            return None
        if data_dir is None:
            raise DataError(f"task {self.name} reads a local file ({' or '.join(self.files)}): pass --data-dir")
        for name in self.files:
            if (Path(data_dir) / name).exists():
                return Path(data_dir) / name
        raise DataError(f"task {self.name}: none of {', '.join(self.files)} in {data_dir}")


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def evaluate_multiple_choice(lm, items: Sequence[MultipleChoiceItem]) -> TaskResult:
    """Every choice of every item in one batched log-likelihood call."""
    requests = [r for item in items for r in item.requests()]
    logliks = [ll for ll, _ in lm.loglikelihood(requests)]
    samples, start = [], 0
    for item in items:
        lls = logliks[start:start + len(item.choice_texts)]
        start += len(item.choice_texts)
        samples.append({"logliks": lls, "gold": list(item.gold), **metrics.multiple_choice(lls, item.choice_texts, item.gold)})
    return TaskResult({name: mean([s[name] for s in samples]) for name in ("acc", "acc_norm")}, samples)


def exact_match_evaluator(options: ExactMatch) -> Callable:
    def evaluate(lm, items: Sequence[GenerationItem]) -> TaskResult:
        samples = []
        for item in tqdm(items, desc="generate", disable=not lm.progress, leave=False):
            prediction = lm.generate_until(item.prompt, options.until, options.max_new_tokens)
            score = metrics.exact_match(prediction, item.answers, ignore_case=options.ignore_case,
                                        ignore_punctuation=options.ignore_punctuation,
                                        regexes_to_ignore=options.regexes_to_ignore)
            samples.append({"prediction": prediction, "answers": list(item.answers[:5]), "exact_match": score})
        return TaskResult({"exact_match": mean([s["exact_match"] for s in samples])}, samples)
    return evaluate
