"""What a task is: items of one kind, and how items of that kind are scored against an EvalLM."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ...errors import DataError
from .. import metrics
from ..stats import mean  # noqa: F401  (tasks import it from here)


def _insert(text: str, shots: str, description: str) -> str:
    """The shots after the task description that starts text (or at the very start)."""
    return description + shots + text.removeprefix(description)


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
    scores: tuple[float, ...] | None = None  # per-choice credit where a task grades softly (BIG-bench target_scores)

    def requests(self) -> list[tuple[str, str]]:
        n = len(self.choice_texts)
        contexts = self.contexts * n if len(self.contexts) == 1 else self.contexts
        continuations = self.continuations * n if len(self.continuations) == 1 else self.continuations
        return list(zip(contexts, continuations))

    def shot(self) -> str:
        """The item as a solved example (lm-eval's few-shot turn): the gold choice's context and continuation."""
        gold = self.gold[0]
        return (self.contexts[gold if len(self.contexts) > 1 else 0]
                + self.continuations[gold if len(self.continuations) > 1 else 0])

    def with_shots(self, shots: str, description: str = "") -> "MultipleChoiceItem":
        return dataclasses.replace(self, contexts=tuple(_insert(c, shots, description) for c in self.contexts))


@dataclass(frozen=True)
class GenerationItem:
    prompt: str
    answers: tuple[str, ...]

    def shot(self) -> str:
        return self.prompt + " " + self.answers[0]  # lm-eval: target delimiter " ", the first answer

    def with_shots(self, shots: str, description: str = "") -> "GenerationItem":
        return dataclasses.replace(self, prompt=_insert(self.prompt, shots, description))


@dataclass(frozen=True)
class ExactMatch:
    """How a generation task compares the answer (lm-eval's exact_match options)."""
    until: tuple[str, ...] = ("\n", ".", ",")
    max_new_tokens: int = 32
    ignore_case: bool = True
    ignore_punctuation: bool = True
    regexes_to_ignore: tuple[str, ...] = ()


@dataclass(frozen=True)
class FewShot:
    """How lm-eval builds a k-shot prompt for a task: `description`, then k solved examples each followed by
    `delimiter`, then the item (items of tasks with a description start with it; it is moved to the front)."""
    delimiter: str = "\n\n"
    description: str = ""
    # lm-eval hands the evaluated document to its sampler (which then draws k + 1 and drops it) when the task's
    # few-shot split equals its test split, None == None included: so for every task without a test split.
    draws_one_more: bool = True


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
    fewshot_files: tuple[str, ...] = ()  # the training split lm-eval draws shots from, when present
    fewshot: FewShot | None = FewShot()  # None: the task takes no shots
    # tasks formatting their own shots (BIG-bench): (num_fewshot, seed) -> items
    load_with_shots: Callable[[int, int], list] | None = None
    default_fewshot_seed: int = 1234  # lm-eval's fewshot_random_seed; BIG-bench tasks use BIG-bench's 42
    corpus_metrics: dict[str, str] = dataclasses.field(default_factory=dict)  # metric -> per-item stats it sums

    def find_file(self, data_dir: Path | None) -> Path | None:
        if not self.files:
            return None
        if data_dir is None:
            raise DataError(f"task {self.name} reads a local file ({' or '.join(self.files)}): pass --data-dir")
        for name in self.files:
            if (Path(data_dir) / name).exists():
                return Path(data_dir) / name
        raise DataError(f"task {self.name}: none of {', '.join(self.files)} in {data_dir}")

    def items(self, data_dir: Path | None = None, *, num_fewshot: int = 0, seed: int | None = None,
              limit: int | None = None) -> list:
        """The items to evaluate: the first `limit`, each with `num_fewshot` solved examples before it.

        Standard-file tasks take their shots as lm-eval does (`fewshot.py`): from the training file when
        the data folder has one, else from the evaluated items themselves (never the item itself).
        """
        if num_fewshot < 0:
            raise ValueError(f"--num-fewshot must be >= 0, got {num_fewshot}")
        seed = self.default_fewshot_seed if seed is None else seed
        if self.load_with_shots is not None:
            items = self.load_with_shots(num_fewshot, seed)
            return items[:limit] if limit else items
        every = self.load(self.find_file(data_dir))
        items = every[:limit] if limit else every
        if not num_fewshot:
            return items
        if self.fewshot is None:
            raise DataError(f"task {self.name} takes no few-shot examples")
        from ..fewshot import add_shots

        train = next((Path(data_dir) / f for f in self.fewshot_files if data_dir and (Path(data_dir) / f).exists()), None)
        pool = self.load(train) if train else every
        return add_shots(items, pool, num_fewshot, seed, self.fewshot, exclude_self=train is None)


def evaluate_multiple_choice(lm, items: Sequence[MultipleChoiceItem]) -> TaskResult:
    """Every choice of every item in one batched log-likelihood call."""
    requests = [r for item in items for r in item.requests()]
    logliks = [ll for ll, _ in lm.loglikelihood(requests)]
    samples, start = [], 0
    for item in items:
        lls = logliks[start:start + len(item.choice_texts)]
        start += len(item.choice_texts)
        sample = {"logliks": lls, "gold": list(item.gold), **metrics.multiple_choice(lls, item.choice_texts, item.gold)}
        if item.scores is not None:  # BIG-bench's multiple_choice_grade: the credit of the most likely choice
            sample["multiple_choice_grade"] = item.scores[sample["choice"]]
        samples.append(sample)
    names = ["acc", "acc_norm"] + (["multiple_choice_grade"] if items and all(i.scores for i in items) else [])
    return TaskResult({name: mean([s[name] for s in samples]) for name in names}, samples)


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
