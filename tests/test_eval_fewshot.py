"""k-shot prompts of the standard-file tasks: a hand-built case, and equality with lm-eval's own requests."""

import json
import os
import shutil
from pathlib import Path

import pytest

from mobilellm.errors import DataError
from mobilellm.eval.tasks import get_task
from tests.eval_helpers import FIXTURES

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def arc_rows(n: int, tag: str) -> list[dict]:
    return [{"id": f"{tag}{i}", "question": f"Which {tag} number {i} is right?",
             "choices": {"text": [f"a{i}", f"b{i}", f"c{i}"], "label": ["A", "B", "C"]}, "answerKey": "ABC"[i % 3]}
            for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_shots_from_the_task_itself_never_include_the_item(tmp_path):
    write_jsonl(tmp_path / "arc_easy.jsonl", arc_rows(3, "q"))
    items = get_task("arc_easy").items(tmp_path, num_fewshot=1, seed=1234)
    # random.Random(1234).sample(pool, 2) per item, the item itself dropped, the first one kept:
    # item 0 draws [1, 0] -> shot 1; item 1 draws [0, 2] -> shot 0; item 2 draws [2, 0] -> shot 0.
    assert items[0].contexts == ("Question: Which q number 1 is right?\nAnswer: b1\n\n"
                                 "Question: Which q number 0 is right?\nAnswer:",)
    assert items[1].contexts == ("Question: Which q number 0 is right?\nAnswer: a0\n\n"
                                 "Question: Which q number 1 is right?\nAnswer:",)
    assert items[2].contexts[0].startswith("Question: Which q number 0 is right?\nAnswer: a0\n\nQuestion: Which q number 2")
    assert items[0].continuations == (" a0", " b0", " c0") and items[0].gold == (0,)  # the choices are untouched
    for seed in range(20):  # whatever the seed, an item is never its own example
        for k in (1, 2):
            for item, shot_free in zip(get_task("arc_easy").items(tmp_path, num_fewshot=k, seed=seed),
                                       get_task("arc_easy").items(tmp_path)):
                shots = item.contexts[0].removesuffix(shot_free.contexts[0])
                assert shot_free.contexts[0] not in shots and shots.count("\n\n") == k
    with pytest.raises(DataError, match="3 shots need 4 examples"):
        get_task("arc_easy").items(tmp_path, num_fewshot=3)


def test_winogrande_shot_is_the_gold_option_and_nq_keeps_its_description_first(tmp_path):
    shutil.copy(FIXTURES / "winogrande.jsonl", tmp_path / "winogrande.jsonl")
    shutil.copy(FIXTURES / "nq_open.jsonl", tmp_path / "nq_open.jsonl")
    wino = get_task("winogrande").items(tmp_path, num_fewshot=1)
    # Random(1234).sample([0, 1], 2) = [1, 0]: item 0's shot is item 1, its gold option (Maria) filled in.
    shot = "Sarah was a much better surgeon than Maria so Maria always got the easier cases.\n\n"
    assert wino[0].contexts == (shot + "Sarah was a much better surgeon than Maria so Sarah",
                                shot + "Sarah was a much better surgeon than Maria so Maria")
    assert wino[0].continuations == (" always got the harder cases.",)
    nq = get_task("nq_open").items(tmp_path, num_fewshot=1)
    assert nq[0].prompt == ("Answer these questions:\n\nQ: what is the capital of france?\nA: Paris\n"
                            "Q: when was the last time anyone was on the moon?\nA:")


# ---- against lm-eval: one TaskManager (indexing lm-eval's task folder is the slow part) over all cases --------

NQ_ROWS = [{"question": f"question {i}", "answer": [f"answer {i}", "other"]} for i in range(6)]


def wino_train_rows() -> list[dict]:
    rows = [json.loads(line) for line in (FIXTURES / "winogrande.jsonl").read_text().splitlines()]
    return [{**r, "qID": f"{i}", "sentence": r["sentence"].replace("cases", f"cases {i}")} for i, r in enumerate(rows * 3)]


CASES = {  # name: (lm-eval's yaml, our task, {split: (file, rows)}, extra yaml)
    "fs_arc": ("arc/arc_easy.yaml", "arc_easy", {"train": ("arc_easy_train.jsonl", arc_rows(9, "train")),
                                                 "test": ("arc_easy.jsonl", arc_rows(4, "test"))}, ""),
    "fs_arc_self": ("arc/arc_easy.yaml", "arc_easy", {"test": ("arc_easy.jsonl", arc_rows(6, "test"))},
                    "training_split: null\nvalidation_split: null\nfewshot_split: test\n"),
    "fs_wino": ("winogrande/default.yaml", "winogrande", {"train": ("winogrande_train.jsonl", wino_train_rows()),
                                                         "validation": ("winogrande.jsonl", None)}, ""),
    "fs_nq": ("nq_open/nq_open.yaml", "nq_open", {"train": ("nq_open_train.jsonl", NQ_ROWS),
                                                  "validation": ("nq_open.jsonl", None)}, ""),
}


@pytest.fixture(scope="module")
def lm_eval_cases(tmp_path_factory):
    """(TaskManager, {case: data folder}) with every case's data written and its task YAML included."""
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.tasks import TaskManager

    root = tmp_path_factory.mktemp("lm_eval_fewshot")
    (root / "yaml").mkdir()
    folders = {}
    for name, (base_yaml, _, splits, extra) in CASES.items():
        folder = folders[name] = root / name
        folder.mkdir()
        data_files = ""
        for split, (file, rows) in splits.items():
            path = write_jsonl(folder / file, rows) if rows else shutil.copy(FIXTURES / file, folder / file)
            data_files += f"    {split}: {path}\n"
        (root / "yaml" / f"{name}.yaml").write_text(
            f"include: {Path(lm_eval.__file__).parent / 'tasks' / base_yaml}\ntask: {name}\ndataset_path: json\n"
            f"dataset_name: null\ndataset_kwargs:\n  data_files:\n{data_files}{extra}")
    return TaskManager(include_path=str(root / "yaml")), folders


def lm_eval_requests(manager, name: str, k: int, seed: int) -> list:
    task = manager.load_task_or_group([name])[name]
    task.set_config("num_fewshot", k)
    task.set_fewshot_seed(seed)
    task.build_all_requests(rank=0, world_size=1)
    return [inst.args if task.OUTPUT_TYPE != "generate_until" else inst.args[0] for inst in task.instances]


def our_requests(items) -> list:
    if hasattr(items[0], "requests"):
        return [r for item in items for r in item.requests()]
    return [item.prompt for item in items]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("case,k,seed", [("fs_arc", 1, 1234), ("fs_arc", 3, 7), ("fs_arc_self", 2, 1234),
                                         ("fs_wino", 2, 1234), ("fs_nq", 2, 1234)])
def test_our_few_shot_requests_equal_lm_evals(lm_eval_cases, case, k, seed):
    """Shots from the training file (ARC, WinoGrande's per-option contexts, NQ's description and "\\n" delimiter),
    and from the evaluated split itself (lm-eval with fewshot_split: test)."""
    manager, folders = lm_eval_cases
    ours = get_task(CASES[case][1]).items(folders[case], num_fewshot=k, seed=seed)
    assert our_requests(ours) == lm_eval_requests(manager, case, k, seed)
