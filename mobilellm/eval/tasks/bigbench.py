"""BIG-bench JSON tasks, taken from the PyPI `bigbench==1.0.0` sdist without installing it.

Every JSON task of the release is known by name (`bigbench_<task>`, a subtask as `bigbench_<task>:<subtask>`,
BIG-bench's own `parent:child` naming) from `bigbench_tasks.json`, an index of the release shipped with the
package (`python -m mobilellm.eval.tasks.bigbench --write-index SDIST` rebuilds it). The first use of a task
downloads the sdist (358 MB) once, extracts the `task.json` files of the tasks asked for (and their subtasks)
into the cache, and deletes the archive: the extracted JSON is all we read.

Prompts are BIG-bench's (bigbench/api/json_task.py): `default_format_fn` (input prefix, the choices appended
in its seeded order when the task asks for it, output prefix), then at k shots `make_nshot_dataset` with the
task's `random_seed` (42 by default): the queries in a seeded order, each preceded by k examples drawn from
the rest of the same (sub)task (never the query itself), each shown with one of its targets, joined with the
task's `few_shot_example_separator`; then the task prefix. Items keep the task's order (`--limit N` takes the
first N), each with the prompt BIG-bench gives it.

Scoring follows the task's `metrics`: multiple choice by log-likelihood of each `target_scores` key
(`multiple_choice_grade` is the score of the most likely choice; acc / acc_norm as lm-eval defines them);
generative metrics on the greedy continuation, post-processed as BIG-bench does (cut after `stop_string`,
then the first match of `output_regex`, by default the text up to the first . ? ! ; or newline):
exact_str_match, case_insensitive_str_match, bleu, rouge (rouge1 / rouge2 / rougeLsum),
numeric_match_with_0_1_relative_error, sequence_f1; `log_likelihood` of the targets. BLEURT (a learned
metric needing its own model) and the calibration metrics are not computed; results name them.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
import sys
import tarfile
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ...artifacts import cache_root, pip_download
from ...atomic import atomic_folder, write_json_atomic
from .. import metrics
from ..stats import mean
from .base import DataError, MultipleChoiceItem, TaskResult, evaluate_multiple_choice

REQUIREMENT = "bigbench==1.0.0"
TASK_JSON = re.compile(r"^bigbench-1\.0\.0/bigbench/benchmark_tasks/([^/]+)/((?:[^/]+/)?)task\.json$")
FORMAT_SEED = 42  # BIG-bench's default random_seed (choice order and shots)
INDEX_FILE = Path(__file__).with_name("bigbench_tasks.json")
DEFAULT_REGEX = r"[^\.\?\!\;\n]+"  # json_task._DEFAULT_REGEX
MAX_OUTPUT_CHARS = 256  # BIG-bench's HF model: 256 new tokens, the text then cut to 256 characters

GENERATIVE_METRICS = ("exact_str_match", "case_insensitive_str_match", "bleu", "rouge",
                      "numeric_match_with_0_1_relative_error", "sequence_f1")
MULTIPLE_CHOICE_METRICS = ("multiple_choice_grade",)
SCORING_METRICS = ("log_likelihood",)
UNSUPPORTED = ("bleurt", "calibration_multiple_choice_brier_score", "expected_calibration_error",
               "weighted_log_probabilities", "weighted_probabilities", "macro_f1")
CORPUS_METRICS = {"bleu": "bleu_stats"}  # metric -> the per-item statistics it is computed from


def bigbench_dir() -> Path:
    return cache_root() / "data" / "bigbench"


# ---- the task index and the data ------------------------------------------------------------------------

@cache
def task_index() -> dict[str, dict]:
    """{task: {"subtasks", "metrics", "preferred_score", "examples", "description"}} of the release."""
    return json.loads(INDEX_FILE.read_text(encoding="utf-8"))


def split_name(name: str) -> tuple[str, str | None]:
    """"task" or "task:subtask" -> (task, subtask or None), checked against the index."""
    task, _, subtask = name.partition(":")
    index = task_index()
    if task not in index:
        close = difflib.get_close_matches(task, list(index), n=5)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise DataError(f"BIG-bench has no JSON task named {task!r}{hint}; `mobilellm eval --list-tasks` lists them")
    if subtask and subtask not in index[task]["subtasks"]:
        raise DataError(f"BIG-bench task {task} has no subtask {subtask!r}; its subtasks: "
                        f"{', '.join(index[task]['subtasks']) or 'none'}")
    return task, subtask or None


def fetch_bigbench(names: list[str]) -> Path:
    """Extract the named tasks' task.json files (once, one download for all) and return the folder holding them."""
    root = bigbench_dir()
    missing = sorted({n for n in names if not (root / n / "task.json").exists()})
    if not missing:
        return root
    with tempfile.TemporaryDirectory(dir=cache_root()) as tmp, ExitStack() as folders:
        archive = pip_download(REQUIREMENT, Path(tmp), sdist=True)
        staged = {name: folders.enter_context(atomic_folder(root / name)) for name in missing}
        with tarfile.open(archive) as tar, tqdm(desc=f"extracting {len(missing)} BIG-bench task(s)", unit=" files",
                                                file=sys.stderr) as bar:
            for member in tar:
                bar.update()
                m = TASK_JSON.match(member.name)
                if m and m.group(1) in staged and member.isfile():
                    target = staged[m.group(1)] / m.group(2) / "task.json"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(tar.extractfile(member).read())
        for name, folder in staged.items():
            if not any(folder.iterdir()):
                raise DataError(f"BIG-bench has no JSON task named {name!r}")
    return root


def task_jsons(name: str, root: Path | None = None) -> list[dict]:
    """A task's JSON, then its subtasks' in order (elementary_math_qa is split into subtasks)."""
    return [task for _, task in named_task_jsons(name, root)]


def named_task_jsons(name: str, root: Path | None = None) -> list[tuple[str, dict]]:
    """(full name, JSON) of a task, then of its subtasks in order (as BIG-bench sorts them)."""
    folder = (root or fetch_bigbench([name])) / name
    if not (folder / "task.json").exists():
        raise DataError(f"no BIG-bench task {name!r} in {folder.parent}")
    subfolders = sorted(p for p in folder.iterdir() if (p / "task.json").exists())
    read = lambda path: json.loads(path.read_text(encoding="utf-8"))
    return [(name, read(folder / "task.json"))] + [(f"{name}:{p.name}", read(p / "task.json")) for p in subfolders]


def write_index(archive: Path, out: Path = INDEX_FILE) -> dict:
    """Read every JSON task of the sdist (a few minutes: 1.7 GB of JSON) into the index shipped with the package."""
    index: dict[str, dict] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            m = TASK_JSON.match(member.name)
            if not (m and member.isfile()):
                continue
            data = json.loads(tar.extractfile(member).read())
            entry = index.setdefault(m.group(1), {"subtasks": [], "metrics": [], "preferred_score": None,
                                                  "examples": 0, "description": ""})
            if m.group(2):
                entry["subtasks"].append(m.group(2).rstrip("/"))
            else:
                entry["description"] = " ".join(str(data.get("description", "")).split())[:200]
            entry["metrics"] = sorted(set(entry["metrics"]) | set(data.get("metrics", [])))
            entry["preferred_score"] = entry["preferred_score"] or data.get("preferred_score")
            entry["examples"] += len(data.get("examples", []))
    for entry in index.values():
        entry["subtasks"].sort()
    index = dict(sorted(index.items()))
    write_json_atomic(out, index, indent=1)
    return index


# ---- BIG-bench's formatting ---------------------------------------------------------------------------------

def unique_examples(task: dict) -> list[dict]:
    """The task's examples without duplicates (BIG-bench drops them too)."""
    seen, examples = set(), []
    for example in task.get("examples", []):
        key = json.dumps(example)
        if key not in seen:
            seen.add(key)
            examples.append(example)
    return examples


def choice_order(scores: dict, seed: int = FORMAT_SEED) -> list[str]:
    """The choices in the order BIG-bench shows them (a permutation seeded by its random_seed)."""
    return [str(c) for c in np.random.RandomState(seed=seed).permutation(sorted(scores))]


def default_format(sample: dict, task: dict, seed: int = FORMAT_SEED) -> dict:
    """bigbench.api.json_task.default_format_fn, on a copy: the formatted `input`, `target` as a list, `choice`."""
    sample = copy.deepcopy(sample)
    if "target_scores" in sample:
        scores = sample["target_scores"]
        if task.get("append_choices_to_input", True):
            prefix = task.get("choice_prefix", "\n  choice: ")
            sample["input"] = sample["input"] + prefix + prefix.join(choice_order(scores, seed))
        if "target" not in sample:
            best = max(scores.values())
            if (len(scores) == 1 and best == 0) or (len(scores) > 1 and best <= min(scores.values())):
                raise DataError(f"BIG-bench example without a correct choice: {str(sample)[:200]}")
            sample["target"] = [k for k, v in scores.items() if v == best][0]
        sample["choice"] = list(scores)
    sample["input"] = task.get("example_input_prefix", "\nQ: ") + sample["input"] + task.get("example_output_prefix", "\nA: ")
    if not isinstance(sample["target"], list):
        sample["target"] = [sample["target"]]
    return sample


def nshot_inputs(samples: list[dict], shots: int, seed: int = FORMAT_SEED, separator: str = "\n") -> list[str]:
    """Each formatted sample's input at `shots` shots, in the samples' own order.

    bigbench.api.json_task.make_nshot_dataset with max_examples = all (what evaluate_fixed_shot passes):
    one RandomState(seed) draws the query order, then for each query in that order `shots` other samples
    and one target of each.
    """
    if shots == 0:
        return [s["input"] for s in samples]
    if len(samples) < shots + 1:
        raise DataError(f"{len(samples)} distinct examples are too few for {shots} shots (each needs {shots} others)")
    rng = np.random.RandomState(seed=seed)
    inputs: list[str | None] = [None] * len(samples)
    for q in rng.choice(len(samples), len(samples), replace=False):
        others = [x for x in samples if x != samples[q]]
        shot_examples = [others[i] for i in rng.choice(len(others), shots, replace=False)]
        context = separator.join(e["input"] + str(rng.choice(e["target"])) for e in shot_examples)
        inputs[q] = context + separator + samples[q]["input"]
    return inputs


# ---- items and their scoring ------------------------------------------------------------------------------

@dataclass(frozen=True)
class BigBenchItem:
    """One example of a (sub)task with what its metrics need: the prompt, targets and scored choices."""
    task: str  # "task" or "task:subtask"
    prompt: str
    targets: tuple[str, ...]
    choices: tuple[str, ...]  # the target_scores keys, in the file's order (empty: no multiple choice)
    scores: tuple[float, ...]
    metrics: tuple[str, ...]  # the (sub)task's metrics
    stop_string: str | None
    output_regex: str | None

    def multiple_choice(self) -> MultipleChoiceItem:
        best = max(self.scores)
        gold = tuple(i for i, s in enumerate(self.scores) if s == best)
        return MultipleChoiceItem((self.prompt,), self.choices, self.choices, gold, self.scores)


def load_bigbench(name: str, root: Path | None = None, num_fewshot: int = 0,
                  seed: int = FORMAT_SEED) -> list[BigBenchItem]:
    """Every example of a task (and its subtasks), or of one subtask when name is "task:subtask"."""
    task_name, subtask = name.partition(":")[0], name.partition(":")[2] or None
    items = []
    for full_name, task in named_task_jsons(task_name, root):
        if subtask and full_name != name:
            continue
        examples = unique_examples(task)
        if not examples:
            continue
        task_metrics = tuple(task.get("metrics", ()))
        formatted = [default_format(e, task, seed) for e in examples]
        inputs = nshot_inputs(formatted, num_fewshot, seed, task.get("few_shot_example_separator", "\n"))
        stop, regex = task.get("stop_string"), task.get("output_regex")
        if stop is None and regex is None:
            regex = DEFAULT_REGEX
        prefix = str(task.get("task_prefix", ""))
        for sample, text in zip(formatted, inputs):
            scores = sample.get("target_scores", {})
            items.append(BigBenchItem(full_name, prefix + text, tuple(map(str, sample["target"])), tuple(scores),
                                      tuple(float(v) for v in scores.values()), task_metrics, stop, regex))
    if not items:
        raise DataError(f"BIG-bench task {name} has no examples")
    return items


def rendered_texts(name: str, root: Path | None = None) -> list[str]:
    """Every example of a task (and its subtasks) as one text: the zero-shot prompt, then the answer (the
    best-scored choice of a multiple-choice example, the first target of a generative one). Training text
    for a corpus, or the target of a data mix."""
    texts = []
    for item in load_bigbench(name, root):
        if item.choices:
            answer = item.choices[max(range(len(item.scores)), key=item.scores.__getitem__)]
        elif item.targets and item.targets[0]:
            answer = item.targets[0]
        else:
            continue
        texts.append(item.prompt + answer)
    if not texts:
        raise DataError(f"BIG-bench task {name} has no examples")
    return texts


def postprocess(text: str, stop_string: str | None, output_regex: str | None) -> str:
    """bigbench.models.model_utils.postprocess_output."""
    text = text[:MAX_OUTPUT_CHARS]
    if stop_string:
        index = text.find(stop_string)
        if index > 0:
            text = text[:index + len(stop_string)]
    if output_regex:
        text = next(iter(re.findall(output_regex, text)), "")
    return text


def response_is_final(text: str, stop_string: str | None, output_regex: str | None) -> bool:
    """Whether more generated text could still change the post-processed response (so decoding can stop)."""
    if len(text) >= MAX_OUTPUT_CHARS:
        return True
    if stop_string:
        index = text.find(stop_string)
        if index > 0:
            text = text[:index + len(stop_string)]
            if not output_regex:
                return True
    if output_regex:
        match = re.search(output_regex, text)
        return match is not None and match.end() < len(text)
    return False


def sequence_f1(prediction: str, target: str) -> float:
    """BIG-bench's sequence_f1 for one item: t5's sequence_accuracy of the labels, padded or cut to the target's."""
    predicted, labels = prediction.split(" "), target.split(" ")
    predicted = (predicted + ["O"] * len(labels))[:len(labels)]
    return 100 * mean([float(p == t) for p, t in zip(predicted, labels)])


def generative_scores(response: str, targets: tuple[str, ...], wanted: tuple[str, ...]) -> dict:
    out: dict = {}
    if "exact_str_match" in wanted:
        out["exact_str_match"] = float(response in targets)
    if "case_insensitive_str_match" in wanted:
        out["case_insensitive_str_match"] = float(response.strip().lower() in [t.strip().lower() for t in targets])
    if "numeric_match_with_0_1_relative_error" in wanted:
        out["numeric_match_with_0_1_relative_error"] = metrics.numeric_match(response, targets)
    if "sequence_f1" in wanted:
        out["sequence_f1"] = sequence_f1(response, targets[0])
    if "rouge" in wanted:
        out.update(metrics.rouge(response, targets))
    if "bleu" in wanted:
        out["bleu_stats"] = metrics.bleu_statistics(response, targets)
    return out


def logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def evaluate_bigbench(lm, items: list[BigBenchItem]) -> TaskResult:
    """Each item scored by its (sub)task's metrics; task metrics are means over the items that have them."""
    samples: list[dict] = [{"task": item.task} for item in items]
    mc = [(i, item) for i, item in enumerate(items) if item.choices and set(item.metrics) & set(MULTIPLE_CHOICE_METRICS)]
    if mc:
        result = evaluate_multiple_choice(lm, [item.multiple_choice() for _, item in mc])
        for (i, _), sample in zip(mc, result.samples):
            samples[i].update(sample)
    scored = [(i, item) for i, item in enumerate(items) if "log_likelihood" in item.metrics]
    if scored:
        requests = [(item.prompt, t) for _, item in scored for t in item.targets]
        lls, start = [ll for ll, _ in lm.loglikelihood(requests, desc="target loglikelihood")], 0
        for i, item in scored:
            samples[i]["log_likelihood"] = logsumexp(lls[start:start + len(item.targets)])
            start += len(item.targets)
    generative = [(i, item) for i, item in enumerate(items) if set(item.metrics) & set(GENERATIVE_METRICS)]
    max_new = min(MAX_OUTPUT_CHARS, lm.max_len - 1)
    for i, item in tqdm(generative, desc="generate", disable=not lm.progress, leave=False):
        text = lm.generate(item.prompt, max_new, lambda t: response_is_final(t, item.stop_string, item.output_regex))
        response = postprocess(text, item.stop_string, item.output_regex)
        samples[i].update({"prediction": response, "targets": list(item.targets[:5]),
                           **generative_scores(response, item.targets, item.metrics)})
    return TaskResult(aggregate(samples), samples)


def aggregate(samples: list[dict]) -> dict[str, float]:
    """Mean of every per-item score; corpus BLEU from the summed statistics."""
    names = [k for k in ("multiple_choice_grade", "acc", "acc_norm", "exact_str_match", "case_insensitive_str_match",
                         "numeric_match_with_0_1_relative_error", "sequence_f1", *metrics.ROUGE_TYPES, "log_likelihood")
             if any(k in s for s in samples)]
    out = {name: mean([s[name] for s in samples if name in s]) for name in names}
    stats = [s["bleu_stats"] for s in samples if "bleu_stats" in s]
    if stats:
        out["bleu"] = metrics.corpus_bleu(stats)
    return out


def main_metric(name: str) -> str:
    """The task's preferred_score when we compute it, else the first of its metrics we do."""
    entry = task_index()[split_name(name)[0]]
    preferred = entry["preferred_score"]
    computed = [m for m in entry["metrics"] if m not in UNSUPPORTED]
    if preferred == "multiple_choice_grade" or (preferred not in UNSUPPORTED and preferred in
                                                 (*GENERATIVE_METRICS, *SCORING_METRICS, *metrics.ROUGE_TYPES)):
        return preferred
    if not computed:
        raise DataError(f"BIG-bench task {name} is scored only by {', '.join(entry['metrics'])}, which we do not compute")
    first = computed[0]
    return "rouge1" if first == "rouge" else first


def unsupported_metrics(name: str) -> list[str]:
    return [m for m in task_index()[split_name(name)[0]]["metrics"] if m in UNSUPPORTED]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="rebuild the shipped BIG-bench task index from the sdist")
    parser.add_argument("--write-index", type=Path, required=True, metavar="SDIST", help="bigbench-1.0.0.tar.gz")
    index = write_index(parser.parse_args().write_index)
    print(f"{len(index)} JSON tasks written to {INDEX_FILE}")
