"""Standard errors against hand computations and lm-eval's; eval-compare on result files whose answer is known."""

import copy
import json
import math

import pytest

from mobilellm.cli import main
from mobilellm.eval import stats
from mobilellm.eval.metrics import corpus_bleu
from mobilellm.eval.lm import EvalLM
from mobilellm.eval.report import load_results, metric_stderrs, paired_comparison, run_tasks, save_results
from tests.eval_helpers import FIXTURES, tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


def boolq_items(folder, n=40):
    rows = [{"question": f"is {i} an even number", "passage": f"The number {i} is {'even' if i % 2 == 0 else 'odd'}.",
             "label": int(i % 2 == 0)} for i in range(n)]
    (folder / "boolq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_mean_stderr_by_hand_and_as_lm_eval():
    values = [1.0, 0.0, 1.0, 1.0]
    # mean 0.75; squared deviations 3 * 0.0625 + 0.5625 = 0.75; / (n - 1) = 0.25; sd 0.5; / sqrt(4) = 0.25
    assert stats.mean_stderr(values) == pytest.approx(0.25)
    assert math.isnan(stats.mean_stderr([1.0]))
    lm_metrics = pytest.importorskip("lm_eval.api.metrics")
    xs = [0.3, 1.0, 0.0, 0.0, 1.0, 0.5, 1.0]
    assert stats.mean_stderr(xs) == pytest.approx(lm_metrics.mean_stderr(xs), rel=1e-12)


def test_bootstrap_stderr_draws_as_lm_eval(monkeypatch):
    lm_metrics = pytest.importorskip("lm_eval.api.metrics")
    monkeypatch.setenv("DISABLE_MULTIPROC", "1")
    xs = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    assert stats.bootstrap_stderr(lm_metrics.median, xs, 100) == pytest.approx(
        lm_metrics.bootstrap_stderr(lm_metrics.median, xs, 100), rel=1e-12)


def test_result_stderrs_by_hand(checkpoint):
    lm = EvalLM.load(checkpoint, progress=False)
    results = run_tasks(lm, ["boolq", "perplexity"], data_dir=FIXTURES, log=lambda _: None)
    boolq = results["tasks"]["boolq"]
    acc = [s["acc"] for s in boolq["samples"]]
    p, n = sum(acc) / len(acc), len(acc)
    hand = math.sqrt(sum((x - p) ** 2 for x in acc) / (n - 1) / n) if n > 1 else float("nan")
    assert boolq["stderr"]["acc"] == pytest.approx(hand, nan_ok=True)
    assert set(results["tasks"]["perplexity"]["stderr"]) == set(results["tasks"]["perplexity"]["metrics"])
    # BLEU's standard error bootstraps the corpus score from per-item statistics
    samples = [{"bleu_stats": s} for s in ([2, 1, 0, 0, 2, 1, 0, 0, 2, 2], [3, 2, 1, 0, 3, 2, 1, 0, 3, 3],
                                           [1, 0, 0, 0, 2, 1, 0, 0, 2, 3], [4, 3, 2, 1, 4, 3, 2, 1, 4, 4])]
    se = metric_stderrs({"bleu": 0.0}, samples, {"bleu": "bleu_stats"})["bleu"]
    assert se > 0 and se == metric_stderrs({"bleu": 0.0}, samples, {"bleu": "bleu_stats"})["bleu"]  # seeded


def corrupt(results: dict, task: str) -> tuple[dict, int]:
    """Every right answer of `task` turned wrong (the next choice): a model against itself, answers corrupted."""
    bad, flipped = copy.deepcopy(results), 0
    t = bad["tasks"][task]
    for s in t["samples"]:
        if s["acc"] == 1.0:
            s["choice"] = (s["choice"] + 1) % len(s["logliks"])
            s["acc"], s["acc_norm"], flipped = 0.0, 0.0, flipped + 1
    for metric in ("acc", "acc_norm"):
        t["metrics"][metric] = sum(s[metric] for s in t["samples"]) / len(t["samples"])
    return bad, flipped


def test_identical_models_are_within_noise_and_corrupted_answers_a_significant_drop(checkpoint, tmp_path, capsys):
    data = boolq_items(tmp_path)
    (tmp_path / "perplexity.txt").write_text((FIXTURES / "perplexity.txt").read_text())
    args = [str(checkpoint), "--tasks", "boolq,perplexity", "--data-dir", str(data)]
    assert main(["eval", *args, "--out", str(tmp_path / "a.json")]) == 0
    assert main(["eval", *args, "--out", str(tmp_path / "b.json")]) == 0
    a, b = load_results(tmp_path / "a.json"), load_results(tmp_path / "b.json")
    for row in paired_comparison(a, b):
        assert row["diff"] == 0 and row["verdict"] == "within noise", row
        assert row["changed"] in (0, None) and row["paired"] == "by item"
    capsys.readouterr()
    assert main(["eval-compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:6] == ["task", "metric", "a", "b", "diff", "stderr"] and "verdict" in lines[0]
    assert all(line.endswith("within noise") for line in lines[2:])

    bad, flipped = corrupt(a, "boolq")
    assert flipped >= 10  # the tiny model gets about half right: enough for a clear drop
    save_results(bad, tmp_path / "bad.json")
    row = next(r for r in paired_comparison(a, bad) if r["metric"] == "acc")
    assert row["diff"] == pytest.approx(-flipped / 40) and row["changed"] == flipped
    d = [-1.0] * flipped + [0.0] * (40 - flipped)  # per-item differences, by hand
    mu = sum(d) / 40
    assert row["stderr"] == pytest.approx(math.sqrt(sum((x - mu) ** 2 for x in d) / 39 / 40))
    assert row["verdict"] == "B worse" and row["high"] < 0
    capsys.readouterr()
    assert main(["eval-compare", str(tmp_path / "a.json"), str(tmp_path / "bad.json")]) == 0
    acc_line = next(line for line in capsys.readouterr().out.splitlines() if line.split()[:2] == ["boolq", "acc"])
    assert acc_line.endswith("bad worse") and f" {flipped} " in acc_line


def test_files_without_item_hashes_pair_by_position(checkpoint, tmp_path):
    lm = EvalLM.load(checkpoint, progress=False)
    results = run_tasks(lm, ["arc_easy"], data_dir=FIXTURES, log=lambda _: None)
    old = copy.deepcopy(results)
    old["version"] = 1
    for t in old["tasks"].values():
        for key in ("stderr", "num_fewshot", "corpus_metrics"):
            t.pop(key)
        for s in t["samples"]:
            s.pop("item"), s.pop("choice")
    rows = paired_comparison(old, results)
    assert {r["paired"] for r in rows} == {"by position"} and all(r["changed"] == 0 for r in rows)
    other = run_tasks(lm, ["arc_easy"], data_dir=FIXTURES, num_fewshot=1, log=lambda _: None)
    with pytest.raises(ValueError, match="no item in common"):
        paired_comparison(results, other)  # different prompts are not the same items


def test_bleu_and_perplexity_compare_by_paired_bootstrap():
    def task(stats_rows):
        samples = [{"bleu_stats": s, "prediction": str(i), "item": str(i)} for i, s in enumerate(stats_rows)]
        return {"metrics": {"bleu": corpus_bleu(stats_rows)}, "n": len(samples), "corpus_metrics": {"bleu": "bleu_stats"},
                "samples": samples}
    good = [[4, 3, 2, 1, 4, 3, 2, 1, 4, 4]] * 12
    worse = [[2, 1, 0, 0, 4, 3, 2, 1, 4, 4]] * 12
    a, b = {"tasks": {"t": task(good)}}, {"tasks": {"t": task(worse)}}
    (row,) = paired_comparison(a, b)
    assert row["method"] == "paired bootstrap" and row["diff"] < 0 and row["verdict"] == "B worse"
    (same,) = paired_comparison(a, copy.deepcopy(a))
    assert same["diff"] == 0 and same["verdict"] == "within noise"
