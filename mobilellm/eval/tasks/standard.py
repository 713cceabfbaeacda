"""The zero-shot benchmarks, read from their standard files, prompted as lm-eval's task YAMLs do.

Each loader accepts the original release's file and the HF datasets JSONL export (their field names
differ for BoolQ, PIQA, SocialIQA, ARC, OpenBookQA, TriviaQA). Prompts follow
lm-evaluation-harness 0.4 (lm_eval/tasks/<task>/*.yaml): `doc_to_text`, then the target delimiter " "
and each `doc_to_choice`; generation tasks stop at "\\n", ".", ",".
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .base import DataError, ExactMatch, GenerationItem, MultipleChoiceItem


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{n}: not a JSON line ({err.msg})") from None
    if not rows:
        raise DataError(f"{path} holds no items")
    return rows


def rows_with_labels(path: Path) -> list[tuple[dict, str]]:
    """(row, label) pairs; the original PIQA / SocialIQA releases keep labels in `<split>-labels.lst`
    beside the JSONL, their HF exports in a `label` field."""
    rows = read_jsonl(path)
    labels_file = path.with_name(path.stem + "-labels.lst")
    labels = labels_file.read_text().split() if labels_file.exists() else None
    pairs = []
    for i, row in enumerate(rows):
        label = row.get("label", labels[i] if labels and i < len(labels) else None)
        if label is None:
            raise DataError(f"{path}: item {i} has no label field and {labels_file.name} gives none")
        pairs.append((row, str(label)))
    return pairs


def field(row: dict, path: Path, *names: str):
    for name in names:
        if name in row:
            return row[name]
    raise DataError(f"{path}: an item has none of the fields {', '.join(names)} (keys: {', '.join(row)})")


def mc(context: str, choices: list[str], gold: int | list[int]) -> MultipleChoiceItem:
    gold = (gold,) if isinstance(gold, int) else tuple(gold)
    return MultipleChoiceItem((context,), tuple(" " + c for c in choices), tuple(choices), gold)


# ---- multiple choice ------------------------------------------------------------------------------

def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag(path: Path) -> list[MultipleChoiceItem]:
    items = []
    for row in read_jsonl(path):
        context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        query = _hellaswag_clean(row["activity_label"] + ": " + context)
        items.append(mc(query, [_hellaswag_clean(e) for e in row["endings"]], int(row["label"])))
    return items


def load_boolq(path: Path) -> list[MultipleChoiceItem]:
    items = []
    for row in read_jsonl(path):
        answer = field(row, path, "label", "answer")  # HF: label 0/1; original: answer true/false
        items.append(mc(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], int(bool(answer))))
    return items


def load_piqa(path: Path) -> list[MultipleChoiceItem]:
    return [mc(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(label))
            for row, label in rows_with_labels(path)]


def load_siqa(path: Path) -> list[MultipleChoiceItem]:
    return [mc(f"Q: {row['context']} {row['question']}\nA:", [row["answerA"], row["answerB"], row["answerC"]], int(label) - 1)
            for row, label in rows_with_labels(path)]


def _arc_style(row: dict, path: Path) -> tuple[str, list[str], list[str], str]:
    """(question, choice texts, choice labels, answer key) from the original or the HF layout."""
    question = row["question"]
    if isinstance(question, dict):  # original release: {"question": {"stem", "choices": [{text, label}]}}
        texts = [c["text"] for c in question["choices"]]
        labels = [c["label"] for c in question["choices"]]
        question = question["stem"]
    else:
        choices = field(row, path, "choices")
        texts, labels = choices["text"], choices["label"]
    return question, texts, labels, row["answerKey"].strip()


def load_arc(path: Path) -> list[MultipleChoiceItem]:
    items = []
    for row in read_jsonl(path):
        question, texts, labels, key = _arc_style(row, path)
        items.append(mc(f"Question: {question}\nAnswer:", texts, labels.index(key)))
    return items


def load_openbookqa(path: Path) -> list[MultipleChoiceItem]:
    items = []
    for row in read_jsonl(path):
        if "question_stem" in row:  # HF layout
            row = {**row, "question": row["question_stem"]}
        question, texts, labels, key = _arc_style(row, path)
        items.append(mc(question, texts, labels.index(key)))
    return items


def load_winogrande(path: Path) -> list[MultipleChoiceItem]:
    """lm-eval's partial scoring: the context ends with each option, the rest of the sentence is scored."""
    items = []
    for row in read_jsonl(path):
        sentence = row["sentence"]
        blank = sentence.index("_")
        contexts = tuple(sentence[:blank] + row[key] for key in ("option1", "option2"))
        continuation = " " + sentence[blank + 1:].strip()
        items.append(MultipleChoiceItem(contexts, (continuation,), contexts, ({"1": 0, "2": 1}[str(row["answer"])],)))
    return items


# ---- generation (exact match) ---------------------------------------------------------------------

def load_triviaqa(path: Path) -> list[GenerationItem]:
    """HF `rc.nocontext` JSONL (answer.aliases) or the original JSON ({"Data": [{"Question", "Answer"}]})."""
    if path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))["Data"]
        pairs = [(r["Question"], r["Answer"]["Aliases"]) for r in rows]
    else:
        pairs = [(r["question"], r["answer"]["aliases"]) for r in read_jsonl(path)]
    return [GenerationItem(f"Question: {q}?\nAnswer:", tuple(a)) for q, a in pairs]


NQ_DESCRIPTION = "Answer these questions:\n\n"  # lm-eval's nq_open `description`


def load_nq_open(path: Path) -> list[GenerationItem]:
    return [GenerationItem(f"{NQ_DESCRIPTION}Q: {r['question']}?\nA:", tuple(r["answer"]))
            for r in read_jsonl(path)]


TRIVIAQA_MATCH = ExactMatch()
NQ_MATCH = ExactMatch(regexes_to_ignore=("\\b(?:The |the |An |A |The |a |an )",))
