"""Every task `mobilellm eval --tasks` knows, by name.

Tasks reading local files look them up in --data-dir under the names listed (`<task>.jsonl`, or the
original release's file inside a `<task>/` folder); BIG-bench and HumanEval bring their own data.
"""

from __future__ import annotations

from . import standard
from .base import DataError, Task, evaluate_multiple_choice, exact_match_evaluator
from .bigbench import load_bigbench
from .humaneval import evaluate_humaneval, load_humaneval
from .perplexity import evaluate_perplexity, load_texts

BIGBENCH_TASKS = ("social_iqa", "winowhy", "strategyqa", "elementary_math_qa")


def _bigbench(name: str):
    return lambda _path: load_bigbench(name)


def _mc(name, description, load, files, main_metric="acc_norm"):
    return Task(name, description, load, evaluate_multiple_choice, files, main_metric)


TASKS: dict[str, Task] = {t.name: t for t in [
    _mc("hellaswag", "HellaSwag (lm-eval prompt)", standard.load_hellaswag, ("hellaswag.jsonl", "hellaswag/hellaswag_val.jsonl")),
    _mc("boolq", "BoolQ", standard.load_boolq, ("boolq.jsonl", "boolq/dev.jsonl", "boolq/val.jsonl"), "acc"),
    _mc("piqa", "PIQA", standard.load_piqa, ("piqa.jsonl", "piqa/valid.jsonl")),
    _mc("social_iqa", "SocialIQA", standard.load_siqa, ("social_iqa.jsonl", "social_iqa/dev.jsonl"), "acc"),
    _mc("arc_easy", "ARC-Easy", standard.load_arc, ("arc_easy.jsonl", "arc_easy/ARC-Easy-Test.jsonl")),
    _mc("arc_challenge", "ARC-Challenge", standard.load_arc, ("arc_challenge.jsonl", "arc_challenge/ARC-Challenge-Test.jsonl")),
    _mc("winogrande", "WinoGrande (partial scoring)", standard.load_winogrande, ("winogrande.jsonl", "winogrande/dev.jsonl"), "acc"),
    _mc("openbookqa", "OpenBookQA", standard.load_openbookqa, ("openbookqa.jsonl", "openbookqa/test.jsonl")),
    Task("triviaqa", "TriviaQA, no context, exact match", standard.load_triviaqa,
         exact_match_evaluator(standard.TRIVIAQA_MATCH), ("triviaqa.jsonl", "triviaqa/verified-web-dev.json"), "exact_match"),
    Task("nq_open", "NaturalQuestions-open, exact match", standard.load_nq_open,
         exact_match_evaluator(standard.NQ_MATCH), ("nq_open.jsonl", "nq_open/NQ-open.dev.jsonl"), "exact_match"),
    Task("humaneval", "HumanEval pass@1 (sandboxed execution)", load_humaneval, evaluate_humaneval, (), "pass@1"),
    Task("perplexity", "perplexity of a text set (token, word, byte)", load_texts, evaluate_perplexity,
         ("perplexity.jsonl", "perplexity.txt"), "word_perplexity"),
    *[_mc(f"bigbench_{name}", f"BIG-bench {name} (target_scores)", _bigbench(name), (), "acc")
      for name in BIGBENCH_TASKS],
]}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]
