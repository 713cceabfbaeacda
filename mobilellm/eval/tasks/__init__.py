"""Every task `mobilellm eval --tasks` knows, by name (`mobilellm eval --list-tasks` prints them).

Tasks reading local files look them up in --data-dir under the names listed (`<task>.jsonl`, or the
original release's file inside a `<task>/` folder); a training file beside them (`<task>_train.jsonl`, ...)
is where few-shot examples come from, as in lm-eval. BIG-bench (`bigbench_<task>`, `bigbench_<task>:<subtask>`,
every JSON task of the release) and HumanEval bring their own data.
"""

from __future__ import annotations

from . import bigbench, standard
from .base import DataError, FewShot, Task, evaluate_multiple_choice, exact_match_evaluator
from .humaneval import evaluate_humaneval, load_humaneval
from .perplexity import evaluate_perplexity, load_texts

BIGBENCH_PREFIX = "bigbench_"
# The BIG-bench tasks this project reports its models on (any JSON task can be evaluated); instruction data
# leaves them out (data/instructions.py).
BIGBENCH_TASKS = ("social_iqa", "winowhy", "strategyqa", "elementary_math_qa")


def _files(task: str, *originals: str) -> tuple[str, ...]:
    return (f"{task}.jsonl", *originals)


def _mc(name, description, load, files, train, main_metric="acc_norm", has_test_split=False):
    return Task(name, description, load, evaluate_multiple_choice, files, main_metric, fewshot_files=train,
                fewshot=FewShot(draws_one_more=not has_test_split))


TASKS: dict[str, Task] = {t.name: t for t in [
    _mc("hellaswag", "HellaSwag (lm-eval prompt)", standard.load_hellaswag, _files("hellaswag", "hellaswag/hellaswag_val.jsonl"),
        _files("hellaswag_train", "hellaswag/hellaswag_train.jsonl")),
    _mc("boolq", "BoolQ", standard.load_boolq, _files("boolq", "boolq/dev.jsonl", "boolq/val.jsonl"),
        _files("boolq_train", "boolq/train.jsonl"), "acc"),
    _mc("piqa", "PIQA", standard.load_piqa, _files("piqa", "piqa/valid.jsonl"), _files("piqa_train", "piqa/train.jsonl")),
    _mc("social_iqa", "SocialIQA", standard.load_siqa, _files("social_iqa", "social_iqa/dev.jsonl"),
        _files("social_iqa_train", "social_iqa/train.jsonl"), "acc"),
    _mc("arc_easy", "ARC-Easy", standard.load_arc, _files("arc_easy", "arc_easy/ARC-Easy-Test.jsonl"),
        _files("arc_easy_train", "arc_easy/ARC-Easy-Train.jsonl"), has_test_split=True),
    _mc("arc_challenge", "ARC-Challenge", standard.load_arc, _files("arc_challenge", "arc_challenge/ARC-Challenge-Test.jsonl"),
        _files("arc_challenge_train", "arc_challenge/ARC-Challenge-Train.jsonl"), has_test_split=True),
    _mc("winogrande", "WinoGrande (partial scoring)", standard.load_winogrande, _files("winogrande", "winogrande/dev.jsonl"),
        _files("winogrande_train", "winogrande/train_xl.jsonl"), "acc"),
    _mc("openbookqa", "OpenBookQA", standard.load_openbookqa, _files("openbookqa", "openbookqa/test.jsonl"),
        _files("openbookqa_train", "openbookqa/train.jsonl"), has_test_split=True),
    Task("triviaqa", "TriviaQA, no context, exact match", standard.load_triviaqa,
         exact_match_evaluator(standard.TRIVIAQA_MATCH), _files("triviaqa", "triviaqa/verified-web-dev.json"), "exact_match",
         fewshot_files=_files("triviaqa_train", "triviaqa/unfiltered-web-train.json")),
    Task("nq_open", "NaturalQuestions-open, exact match", standard.load_nq_open,
         exact_match_evaluator(standard.NQ_MATCH), _files("nq_open", "nq_open/NQ-open.dev.jsonl"), "exact_match",
         fewshot_files=_files("nq_open_train", "nq_open/NQ-open.train.jsonl"),
         fewshot=FewShot(delimiter="\n", description=standard.NQ_DESCRIPTION)),
    Task("humaneval", "HumanEval pass@1 (sandboxed execution)", load_humaneval, evaluate_humaneval, (), "pass@1", fewshot=None),
    Task("perplexity", "perplexity of a text set (token, word, byte)", load_texts, evaluate_perplexity,
         ("perplexity.jsonl", "perplexity.txt"), "word_perplexity", fewshot=None,
         corpus_metrics={m: "perplexity" for m in ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")}),
]}


def bigbench_task(name: str) -> Task:
    """`bigbench_<task>` or `bigbench_<task>:<subtask>`: any JSON task of BIG-bench 1.0.0."""
    bigbench.split_name(name)  # unknown names fail here, before any download
    return Task(BIGBENCH_PREFIX + name, f"BIG-bench {name}", lambda _path: bigbench.load_bigbench(name),
                bigbench.evaluate_bigbench, (), bigbench.main_metric(name), fewshot=None,
                load_with_shots=lambda k, seed: bigbench.load_bigbench(name, num_fewshot=k, seed=seed),
                default_fewshot_seed=bigbench.FORMAT_SEED, corpus_metrics=dict(bigbench.CORPUS_METRICS))


def get_task(name: str) -> Task:
    if name in TASKS:
        return TASKS[name]
    if name.startswith(BIGBENCH_PREFIX):
        return bigbench_task(name.removeprefix(BIGBENCH_PREFIX))
    raise DataError(f"unknown task {name!r}; known: {', '.join(TASKS)} and bigbench_<task> "
                    "(`mobilellm eval --list-tasks` lists every one)")


def list_tasks() -> list[tuple[str, str]]:
    """(name, description) of every task: the standard ones, then each BIG-bench task and its subtasks."""
    rows = [(t.name, t.description) for t in TASKS.values()]
    for name, entry in bigbench.task_index().items():
        kinds = ", ".join(entry["metrics"])
        rows.append((BIGBENCH_PREFIX + name, f"{entry['examples']} examples; {kinds}; {entry['description']}"))
        rows += [(f"{BIGBENCH_PREFIX}{name}:{sub}", f"subtask of {name}") for sub in entry["subtasks"]]
    return rows


__all__ = ["BIGBENCH_TASKS", "TASKS", "DataError", "Task", "bigbench_task", "get_task", "list_tasks"]
