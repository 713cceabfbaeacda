"""Checked against lm-evaluation-harness: its HFLM scores what we score, and its CLI runs our adapter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from mobilellm.eval.lm import EvalLM  # noqa: E402
from mobilellm.eval.lm_eval_hook import install, write_pth  # noqa: E402
from mobilellm.eval.report import run_tasks  # noqa: E402
from mobilellm.eval.tasks import standard  # noqa: E402
from tests.eval_helpers import FIXTURES, smollm2_or_skip, tiny_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


def fixture_requests():
    items = (standard.load_arc(FIXTURES / "arc_easy.jsonl") + standard.load_winogrande(FIXTURES / "winogrande.jsonl")
             + standard.load_hellaswag(FIXTURES / "hellaswag.jsonl")[:1] + standard.load_boolq(FIXTURES / "boolq.jsonl"))
    return [r for item in items for r in item.requests()]


def assert_same_as_hflm(folder, requests, atol):
    from lm_eval.models.huggingface import HFLM
    hflm = HFLM(pretrained=str(folder), dtype="float32", batch_size=4, device="cpu")
    expected = hflm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)], disable_tqdm=True)
    ours = EvalLM.load(folder, progress=False)
    for context, _ in requests:
        assert ours.tokenizer.encode(context) == hflm.tok_encode(context)
    got = ours.loglikelihood(requests)
    for (ll, greedy), (ref_ll, ref_greedy) in zip(got, expected):
        assert ll == pytest.approx(ref_ll, abs=atol)
        assert greedy == ref_greedy


def test_loglikelihoods_equal_lm_evals_hflm_on_a_tiny_llama(tmp_path):
    # (transformers' Llama-4 has no sliding-window layers; our scorer's window handling is checked
    # against our full forward in test_eval_scoring.py.)
    assert_same_as_hflm(tiny_checkpoint(tmp_path / "ckpt", config="tiny-llama"), fixture_requests(), atol=1e-4)


@pytest.mark.slow
def test_loglikelihoods_equal_lm_evals_hflm_on_real_smollm2():
    assert_same_as_hflm(smollm2_or_skip(), fixture_requests(), atol=1e-3)


def test_pth_hook_registers_the_model_at_startup(tmp_path):
    site_dir = tmp_path / "site"
    write_pth(site_dir)
    probe = ("import site, sys; site.addsitedir(sys.argv[1]); import lm_eval.api.registry as r; "
             "print(r.model_registry._objs.get('mobilellm'))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", probe, str(site_dir)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "mobilellm.eval.lm_eval_adapter:MobileLLMAdapter", out.stderr
    # A Python that cannot import mobilellm starts silently with the hook in place.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", "import site, sys; site.addsitedir(sys.argv[1]); print('ok')", str(site_dir)],
                         env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "ok" and out.stderr == ""


TASK_YAML = """task: fixture_arc_easy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def test_lm_eval_cli_runs_our_adapter_and_agrees_with_our_harness(checkpoint, tmp_path, monkeypatch):
    from lm_eval.__main__ import cli_evaluate
    install()
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "fixture.yaml").write_text(TASK_YAML.format(data=FIXTURES / "arc_easy.jsonl"))
    monkeypatch.setattr(sys, "argv", ["lm_eval", "--model", "mobilellm", "--model_args", f"pretrained={checkpoint}",
                                      "--tasks", "fixture_arc_easy", "--include_path", str(tmp_path / "tasks"),
                                      "--output_path", str(tmp_path / "out"), "--log_samples"])
    cli_evaluate()
    samples = [json.loads(line) for f in (tmp_path / "out").rglob("samples_fixture_arc_easy*.jsonl")
               for line in f.read_text().splitlines()]
    ours = run_tasks(EvalLM.load(checkpoint, progress=False), ["arc_easy"], data_dir=FIXTURES, log=lambda _: None)
    assert len(samples) == 2
    for sample, our in zip(sorted(samples, key=lambda s: s["doc_id"]), ours["tasks"]["arc_easy"]["samples"]):
        theirs = [float(ll) for ll, _ in sample["filtered_resps"]]
        assert theirs == pytest.approx(our["logliks"], abs=1e-4)
        assert (sample["acc"], sample["acc_norm"]) == (our["acc"], our["acc_norm"])


def test_adapter_rolling_windows_and_generation_match_our_own(checkpoint):
    from mobilellm.eval.lm_eval_adapter import MobileLLMAdapter
    lm = EvalLM.load(checkpoint, progress=False)
    adapter = MobileLLMAdapter.from_eval_lm(lm)
    long_text = "The quick brown fox jumps over the lazy dog. " * 40  # several 256-token windows
    for text in ("Paris is the capital of France.", long_text):
        (theirs,) = adapter.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
        ours, _ = lm.rolling_loglikelihood(text, window=lm.max_len, stride=lm.max_len)
        assert theirs == pytest.approx(ours, abs=1e-3)
    request = Instance("generate_until", {}, ("Paris is", {"until": ["."], "max_gen_toks": 6}), 0)
    assert adapter.generate_until([request], disable_tqdm=True) == [lm.generate_until("Paris is", ["."], 6)]


TOY_BIGBENCH = {"name": "toy", "description": "toy", "keywords": [], "metrics": ["multiple_choice_grade"],
                "examples": [{"input": "2 + 2 =", "target_scores": {"4": 1, "5": 0, "22": 0}},
                             {"input": "The sky is", "target_scores": {"blue": 1, "green": 0}},
                             {"input": "Say hi:", "target": "hi"}]}  # generative: left out of the lm-eval task


def test_a_bigbench_task_written_for_lm_eval_runs_offline_and_agrees_with_our_harness(checkpoint, tmp_path, monkeypatch):
    from lm_eval.__main__ import cli_evaluate

    from mobilellm.eval.lm_eval_tasks import write_lm_eval_task
    from mobilellm.eval.tasks import bigbench
    (tmp_path / "bb" / "toy").mkdir(parents=True)
    (tmp_path / "bb" / "toy" / "task.json").write_text(json.dumps(TOY_BIGBENCH))
    monkeypatch.setattr(bigbench, "bigbench_dir", lambda: tmp_path / "bb")
    monkeypatch.setattr(bigbench, "task_index", lambda: {"toy": {"subtasks": []}})
    config = write_lm_eval_task("bigbench_toy", tmp_path / "tasks")
    assert json.loads(config.read_text())["task"] == "bigbench_toy"
    install()
    monkeypatch.setattr(sys, "argv", ["lm_eval", "--model", "mobilellm", "--model_args", f"pretrained={checkpoint}",
                                      "--tasks", "bigbench_toy", "--include_path", str(tmp_path / "tasks"),
                                      "--output_path", str(tmp_path / "out"), "--log_samples"])
    cli_evaluate()
    samples = sorted((json.loads(line) for f in (tmp_path / "out").rglob("samples_bigbench_toy*.jsonl")
                      for line in f.read_text().splitlines()), key=lambda s: s["doc_id"])
    items = [item.multiple_choice() for item in bigbench.load_bigbench("toy") if item.choices]
    lm = EvalLM.load(checkpoint, progress=False)
    assert len(samples) == len(items) == 2
    for sample, item in zip(samples, items):
        theirs = [float(ll) for ll, _ in sample["filtered_resps"]]
        assert theirs == pytest.approx([ll for ll, _ in lm.loglikelihood(item.requests())], abs=1e-4)
        assert sample["acc"] == float(max(range(len(theirs)), key=theirs.__getitem__) in item.gold)
