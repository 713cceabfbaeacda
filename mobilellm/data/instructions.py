"""Instruction and preference data built from BIG-bench tasks (their JSON fetched from PyPI, `eval.tasks.bigbench`).

- Instructions (SFT): every example becomes a prompt/completion pair. The prompt is the task's instruction (its
  prefix, else its description), then the input (its input prefix kept, as some tasks put needed text there);
  a multiple-choice item lists its choices (in BIG-bench's seeded order) and its completion is the correct one;
  a generative example's completion is its (first) target.
- Preferences (DPO): every multiple-choice item with one correct choice gives a pair, chosen = the correct
  choice, rejected = one wrong choice drawn with a seeded RNG. The pairs of held-out items are held out too.

The BIG-bench tasks `mobilellm eval` scores (`eval.tasks.BIGBENCH_TASKS`) are kept out of training: asking for one
is an error. Each task contributes at most `max_per_task` items (a seeded sample), so no large task swamps the rest,
and a seeded `val_fraction` of the instructions is held out.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError
from ..eval.tasks import BIGBENCH_TASKS
from ..eval.tasks.bigbench import choice_order, task_jsons, unique_examples

# Tasks with a text target (generative) and with scored choices; none of them is an evaluation task.
GENERATIVE_TASKS = ("auto_categorization", "chinese_remainder_theorem", "disfl_qa", "object_counting", "operators",
                    "qa_wikidata", "repeat_copy_logic", "rephrase", "tense", "word_sorting", "word_unscrambling")
CHOICE_TASKS = ("anachronisms", "arithmetic", "causal_judgment", "date_understanding", "epistemic_reasoning",
                "general_knowledge", "implicatures", "known_unknowns", "logical_deduction",
                "logical_fallacy_detection", "misconceptions", "navigate", "physical_intuition", "riddle_sense",
                "sports_understanding", "timedial", "tracking_shuffled_objects", "unit_conversion")
DEFAULT_TASKS = tuple(sorted(GENERATIVE_TASKS + CHOICE_TASKS))


@dataclass
class InstructionData:
    train: list[dict] = field(default_factory=list)  # prompt/completion records
    val: list[dict] = field(default_factory=list)
    pairs: list[dict] = field(default_factory=list)  # prompt/chosen/rejected records
    val_pairs: list[dict] = field(default_factory=list)  # the pairs of the held-out instructions' items
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # task -> {"instructions", "pairs"}


def check_tasks(tasks: list[str]) -> None:
    held_out = sorted(set(tasks) & set(BIGBENCH_TASKS))
    if held_out:
        raise DataError(f"BIG-bench task(s) {', '.join(held_out)} are scored by `mobilellm eval` (bigbench_NAME): "
                        "keep them out of training")


def prompt_text(example: dict, task: dict) -> str:
    """The task's instruction (its prefix, else its description), then its input prefix and the input; a
    multiple-choice item's choices listed after it."""
    instruction = str(task.get("task_prefix", "")).strip() or str(task.get("description", "")).strip()
    text = (task.get("example_input_prefix", "") + example["input"]).strip()
    text = f"{instruction}\n\n{text}" if instruction else text
    if "target_scores" in example:
        text += "\n\nOptions:\n" + "\n".join(f"- {choice.strip()}" for choice in choice_order(example["target_scores"]))
    return text


def correct_and_wrong(scores: dict) -> tuple[list[str], list[str]]:
    best = max(scores.values())
    return ([str(c).strip() for c, s in scores.items() if s == best],
            [str(c).strip() for c, s in scores.items() if s != best])


def instruction(example: dict, task: dict) -> dict | None:
    if "target_scores" in example:
        correct, _ = correct_and_wrong(example["target_scores"])
        completion = correct[0] if len(correct) == 1 else None
    else:
        target = example.get("target")
        completion = target[0] if isinstance(target, list) and target else target
    if not isinstance(completion, str) or not completion.strip() or not isinstance(example.get("input"), str):
        return None
    return {"prompt": prompt_text(example, task), "completion": completion.strip()}


def preference(example: dict, task: dict, rng: np.random.Generator) -> dict | None:
    if "target_scores" not in example or not isinstance(example.get("input"), str):
        return None
    correct, wrong = correct_and_wrong(example["target_scores"])
    if len(correct) != 1 or not wrong or not correct[0]:
        return None
    return {"prompt": prompt_text(example, task), "chosen": correct[0], "rejected": wrong[rng.integers(len(wrong))]}


def build_instructions(tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS, *, max_per_task: int | None = 500,
                       val_fraction: float = 0.05, seed: int = 0, root=None) -> InstructionData:
    """Instructions and preference pairs from `tasks` (fetched once when `root` is None)."""
    check_tasks(list(tasks))
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    data = InstructionData()
    for name in tasks:
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        examples = [(e, task) for task in task_jsons(name, root) for e in unique_examples(task)]
        if max_per_task is not None and len(examples) > max_per_task:
            examples = [examples[i] for i in sorted(rng.choice(len(examples), max_per_task, replace=False))]
        made = [(instruction(e, t), preference(e, t, rng)) for e, t in examples]
        held_out = rng.random(len(made)) < val_fraction
        for (record, pair), val in zip(made, held_out):
            if record is not None:
                (data.val if val else data.train).append(record)
            if pair is not None:
                (data.val_pairs if val else data.pairs).append(pair)
        data.counts[name] = {"instructions": sum(r is not None for r, _ in made),
                             "pairs": sum(p is not None for (_, p), v in zip(made, held_out) if not v)}
        if not data.counts[name]["instructions"]:
            raise DataError(f"BIG-bench task {name} gave no instruction (no example with an input and one answer)")
    return data


INSTRUCTION_FILES = {"sft": "sft.jsonl", "sft_val": "sft_val.jsonl", "dpo": "dpo.jsonl", "dpo_val": "dpo_val.jsonl"}


def write_instructions(out, tasks: list[str], *, max_per_task: int | None = 500, val_fraction: float = 0.05,
                       seed: int = 0) -> InstructionData:
    """`build_instructions` from BIG-bench (fetched once) written to OUT: sft.jsonl, sft_val.jsonl, dpo.jsonl,
    dpo_val.jsonl and manifest.json (items per task), each file atomically."""
    import json
    from pathlib import Path

    from ..atomic import write_json_atomic, write_text_atomic
    from ..eval.tasks.bigbench import fetch_bigbench

    check_tasks(tasks)
    data = build_instructions(tasks, max_per_task=max_per_task, val_fraction=val_fraction, seed=seed,
                              root=fetch_bigbench(tasks))
    out = Path(out)
    for key, records in (("sft", data.train), ("sft_val", data.val), ("dpo", data.pairs), ("dpo_val", data.val_pairs)):
        write_text_atomic(out / INSTRUCTION_FILES[key], "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                                for r in records))
    write_json_atomic(out / "manifest.json", {"source": "bigbench==1.0.0 (PyPI)", "tasks": data.counts, "seed": seed,
                                              "max_per_task": max_per_task, "val_fraction": val_fraction})
    return data
