"""Task files in their original / HF layouts load into lm-eval's prompts; the eval command runs end to end."""

import json

import pytest

from mobilellm.cli import main
from mobilellm.hf import read_config
from mobilellm.model import build_model
from mobilellm.eval.lm import EvalLM
from mobilellm.eval.report import compare_table, load_results, run_tasks
from mobilellm.eval.tasks import TASKS, get_task, standard
from mobilellm.eval.tasks.base import DataError
from tests.eval_helpers import FIXTURES, tiny_checkpoint

LOCAL_TASKS = ["hellaswag", "boolq", "piqa", "social_iqa", "arc_easy", "arc_challenge", "winogrande", "openbookqa",
               "triviaqa", "nq_open", "perplexity"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


def test_hellaswag_prompt_and_wikihow_cleanup():
    items = standard.load_hellaswag(FIXTURES / "hellaswag.jsonl")
    assert items[0].requests()[3] == ("Roof shingle removal: A man is sitting on a roof. He",
                                      " starts pulling up roofing on a roof.")
    assert items[0].gold == (3,)
    assert items[2].contexts[0] == "Home and Garden: How to clean a roof. Use a leaf blower."
    assert items[2].choice_texts[0] == " Blow the leaves off."  # lm-eval strips before removing [step]


def test_hellaswag_matches_lm_evals_own_preprocessing():
    datasets = pytest.importorskip("datasets")
    hellaswag_utils = pytest.importorskip("lm_eval.tasks.hellaswag.utils")
    rows = [json.loads(line) for line in (FIXTURES / "hellaswag.jsonl").read_text().splitlines()]
    docs = hellaswag_utils.process_docs(datasets.Dataset.from_list(rows))
    for doc, item in zip(docs, standard.load_hellaswag(FIXTURES / "hellaswag.jsonl")):
        assert item.contexts == (doc["query"],) and item.choice_texts == tuple(doc["choices"])


def test_boolq_reads_the_hf_and_the_original_layout():
    items = standard.load_boolq(FIXTURES / "boolq.jsonl")
    assert items[0].contexts[0] == ("On a clear day the sky looks blue because of Rayleigh scattering.\n"
                                    "Question: is the sky blue on a clear day?\nAnswer:")
    assert items[0].continuations == (" no", " yes") and items[0].gold == (1,) and items[1].gold == (0,)


def test_piqa_and_siqa_read_labels_beside_the_original_file():
    piqa = standard.load_piqa(FIXTURES / "piqa" / "valid.jsonl")
    assert piqa[0].contexts[0].startswith("Question: How do I ready a guinea pig cage") and piqa[0].contexts[0].endswith("\nAnswer:")
    assert [i.gold for i in piqa] == [(0,), (1,)]
    siqa = standard.load_siqa(FIXTURES / "social_iqa" / "dev.jsonl")
    assert siqa[0].contexts[0] == ("Q: Tracy didn't go home that evening and resisted Riley's attacks. "
                                   "What does Tracy need to do before this?\nA:")
    assert [i.gold for i in siqa] == [(2,), (0,)]


def test_arc_and_openbookqa_layouts():
    easy = standard.load_arc(FIXTURES / "arc_easy.jsonl")  # HF layout, numeric labels
    assert easy[1].gold == (2,) and easy[1].continuations == (" oil", " coal", " wind")
    challenge = standard.load_arc(FIXTURES / "arc_challenge" / "ARC-Challenge-Test.jsonl")  # original layout
    assert challenge[0].contexts[0].startswith("Question: An astronomer") and challenge[0].gold == (2,)
    obqa = standard.load_openbookqa(FIXTURES / "openbookqa" / "test.jsonl")
    assert obqa[0].contexts[0].startswith("A person wants") and not obqa[0].contexts[0].startswith("Question")
    assert obqa[0].gold == (1,)


def test_winogrande_scores_the_rest_of_the_sentence_after_each_option():
    item = standard.load_winogrande(FIXTURES / "winogrande.jsonl")[0]
    assert item.requests() == [("Sarah was a much better surgeon than Maria so Sarah", " always got the harder cases."),
                               ("Sarah was a much better surgeon than Maria so Maria", " always got the harder cases.")]
    assert item.gold == (0,)


def test_generation_tasks():
    original = standard.load_triviaqa(FIXTURES / "triviaqa" / "verified-web-dev.json")
    assert original[0].prompt == "Question: Which Lloyd Webber musical premiered in the US on 10th December 1993??\nAnswer:"
    assert original[0].answers == ("Sunset Blvd", "Sunset Boulevard")
    assert standard.load_triviaqa(FIXTURES / "triviaqa.jsonl")[0].answers[0] == "Paris"
    nq = standard.load_nq_open(FIXTURES / "nq_open.jsonl")
    assert nq[1].prompt == "Answer these questions:\n\nQ: what is the capital of france?\nA:"


def test_bad_files_name_the_problem(tmp_path):
    (tmp_path / "boolq.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="boolq.jsonl:1"):
        standard.load_boolq(tmp_path / "boolq.jsonl")
    with pytest.raises(DataError, match="none of"):
        get_task("piqa").find_file(tmp_path)
    with pytest.raises(DataError, match="--data-dir"):
        get_task("piqa").find_file(None)
    with pytest.raises(DataError, match="unknown task"):
        get_task("mmlu_pro_max")


def test_every_local_task_runs_on_the_tiny_model(checkpoint):
    lm = EvalLM.load(checkpoint, progress=False)
    results = run_tasks(lm, LOCAL_TASKS, data_dir=FIXTURES, limit=2, log=lambda _: None)
    for name in LOCAL_TASKS:
        task = results["tasks"][name]
        value = task["metrics"][TASKS[name].main_metric]
        assert 0 <= task["n"] <= 2 and value == value  # not NaN
    assert set(results["tasks"]["hellaswag"]["metrics"]) == {"acc", "acc_norm"}
    assert results["tasks"]["perplexity"]["metrics"]["word_perplexity"] > 1


def test_eval_command_writes_results_and_compare_shows_differences(checkpoint, tmp_path, capsys):
    out_a, out_b = tmp_path / "a.json", tmp_path / "b.json"
    args = [str(checkpoint), "--tasks", "boolq,winogrande", "--data-dir", str(FIXTURES), "--limit", "2"]
    assert main(["eval", *args, "--out", str(out_a)]) == 0
    assert main(["eval", *args, "--out", str(out_b), "--dtype", "bfloat16"]) == 0
    table = capsys.readouterr().out
    assert "boolq" in table and "acc *" in table
    a, b = load_results(out_a), load_results(out_b)
    assert a["tasks"]["boolq"]["n"] == 2 and a["model"]["dtype"] == "float32" and b["model"]["dtype"] == "bfloat16"
    assert main(["eval-compare", str(out_a), str(out_b)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["task", "metric", "a", "b", "diff", "stderr", "95%", "interval", "changed", "n",
                                "verdict"] and len(lines) == 2 + 4
    assert "+" in lines[2] or "-" in lines[2]
    b["tasks"] = {"other": b["tasks"]["boolq"]}
    with pytest.raises(ValueError, match="share no task"):
        compare_table(a, b)


def test_eval_command_rejects_bad_input(checkpoint, tmp_path, capsys):
    assert main(["eval", str(checkpoint), "--tasks", "boolq,nonsense"]) == 2
    assert "nonsense" in capsys.readouterr().err
    assert main(["eval", str(checkpoint), "--tasks", "boolq", "--data-dir", str(FIXTURES), "--limit", "0"]) == 2
    (tmp_path / "x.json").write_text(json.dumps({"no": 1}))
    assert main(["eval-compare", str(tmp_path / "x.json"), str(tmp_path / "x.json")]) == 2


def test_full_precision_vs_int4_through_the_cli(checkpoint, tmp_path, capsys):
    pytest.importorskip("mobilellm.quant")
    int4 = tmp_path / "int4"
    assert main(["quantize", str(checkpoint), "--scheme", "cpu", "--out", str(int4)]) == 0
    args = ["--tasks", "hellaswag,arc_easy", "--data-dir", str(FIXTURES)]
    assert main(["eval", str(int4), *args, "--out", str(tmp_path / "int4.json")]) == 0  # it carries the tokenizer
    (int4 / "tokenizer.json").unlink()
    assert main(["eval", str(int4), *args, "--out", str(tmp_path / "int4.json")]) == 2
    assert "tokenizer.json" in capsys.readouterr().err  # named when missing
    assert main(["eval", str(int4), *args, "--tokenizer", str(checkpoint), "--out", str(tmp_path / "int4.json")]) == 0
    assert main(["eval", str(checkpoint), *args, "--out", str(tmp_path / "fp32.json")]) == 0
    fp, q = load_results(tmp_path / "fp32.json"), load_results(tmp_path / "int4.json")
    # the int4 model's metadata: its parameter count from its config (packed weights counted), scheme, size on disk
    assert q["model"]["parameters"] == fp["model"]["parameters"] == build_model(read_config(checkpoint), device="meta").num_parameters()
    assert q["model"]["scheme"] == "cpu" and q["model"]["quantization"]["group_size"] == 32
    assert fp["model"]["scheme"] == "float32" and fp["model"]["quantization"] is None
    assert 0 < q["model"]["size_on_disk_bytes"] < fp["model"]["size_on_disk_bytes"]
    assert fp["model"]["size_on_disk_bytes"] == (checkpoint / "model.safetensors").stat().st_size
    lls_fp = fp["tasks"]["hellaswag"]["samples"][0]["logliks"]
    lls_q = q["tasks"]["hellaswag"]["samples"][0]["logliks"]
    assert lls_fp != lls_q and lls_fp == pytest.approx(lls_q, rel=0.2)  # quantized, yet the same model
    capsys.readouterr()
    assert main(["eval-compare", str(tmp_path / "fp32.json"), str(tmp_path / "int4.json")]) == 0
    assert "hellaswag" in capsys.readouterr().out
