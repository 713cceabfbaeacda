"""BIG-bench JSON tasks: formatted as BIG-bench's default_format_fn / make_nshot_dataset do, scored by their metrics."""

import math

import pytest

from mobilellm.errors import DataError
from mobilellm.eval import metrics
from mobilellm.eval.lm import EvalLM
from mobilellm.eval.tasks import get_task, list_tasks
from mobilellm.eval.tasks.bigbench import (bigbench_dir, evaluate_bigbench, load_bigbench, postprocess, response_is_final,
                                           split_name, task_index)
from tests.eval_helpers import FIXTURES, tiny_checkpoint

ROOT = FIXTURES / "bigbench"


def test_choices_are_appended_in_bigbench_seeded_order_and_duplicates_dropped():
    items = load_bigbench("toy_task", root=ROOT)
    assert len(items) == 2  # two identical examples -> one, plus the subtask's one
    item = items[0].multiple_choice()
    # RandomState(42).permutation of the 3 sorted choices keeps them in order (of 5 it gives 1, 4, 2, 0, 3).
    assert item.contexts == ("\nQ: Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need "
                             "to do before this? \n  choice: Find somewhere to go\n  choice: Go home and see Riley"
                             "\n  choice: Make a new plan\nA: ",)
    assert item.continuations == ("Make a new plan", "Go home and see Riley", "Find somewhere to go")
    assert item.gold == (2,) and item.scores == (0.0, 0.0, 1.0)


def test_a_task_with_subtasks_by_name():
    item = load_bigbench("toy_task", root=ROOT)[1]
    assert item.task == "toy_task:subtask_b"  # BIG-bench's parent:child naming
    assert item.prompt == ("Please answer the following questions about which words certain pronouns refer to.\n\n"
                           "The city councilmen refused the demonstrators a permit because they feared violence."
                           "\nThe above reasoning is ")
    assert item.choices == ("correct", "incorrect") and item.multiple_choice().gold == (0,)
    only = load_bigbench("toy_task:subtask_b", root=ROOT)
    assert [i.task for i in only] == ["toy_task:subtask_b"]
    # the real release's subtasks are known by name, before anything is downloaded
    assert split_name("arithmetic:1_digit_addition") == ("arithmetic", "1_digit_addition")
    assert get_task("bigbench_arithmetic:1_digit_addition").main_metric == "exact_str_match"
    with pytest.raises(DataError, match="no subtask 'nope'.*1_digit_addition"):
        get_task("bigbench_arithmetic:nope")
    with pytest.raises(DataError, match="no JSON task named 'causal_judgement'.*causal_judgment"):
        get_task("bigbench_causal_judgement")


def test_every_json_task_of_the_release_is_listed():
    index = task_index()
    assert len(index) == 167  # the JSON tasks of bigbench 1.0.0 (the others are programmatic)
    assert index["causal_judgment"]["preferred_score"] == "multiple_choice_grade"
    assert len(index["elementary_math_qa"]["subtasks"]) == 5
    names = [name for name, _ in list_tasks()]
    assert "bigbench_causal_judgment" in names and "bigbench_arithmetic:3_digit_division" in names
    assert get_task("bigbench_causal_judgment").main_metric == "multiple_choice_grade"
    assert get_task("bigbench_gem").main_metric in ("rougeLsum", "bleu")  # a generative task by its own metric
    cached = [t for t in index if (bigbench_dir() / t / "task.json").exists()]
    for name in cached:  # the extracted copies agree with the index
        subtasks = sorted(p.name for p in (bigbench_dir() / name).iterdir() if (p / "task.json").exists())
        assert subtasks == index[name]["subtasks"], name


def test_few_shot_prompts_of_a_hand_built_case():
    items = load_bigbench("toy_generate", root=ROOT, num_fewshot=1)
    # make_nshot_dataset, RandomState(42): queries in the order 1, 3, 0, 2; item 1 gets example 0 as its shot,
    # item 3 gets example 1 (shown with its first target, "cat"), item 0 example 3, item 2 example 1.
    sentence = "\nQ: Say the sentence back: the cat sat on the mat\nA: the cat sat on the mat"
    assert items[0].prompt == sentence + "\n\n" + "\nQ: Unscramble: ocd\nA: "
    assert items[1].prompt == "\nQ: Unscramble: ocd\nA: cod\n\n\nQ: Unscramble: atc\nA: "
    assert items[2].prompt == "\nQ: Unscramble: atc\nA: cat\n\n\nQ: Unscramble: odg\nA: "
    assert items[3].prompt.startswith("\nQ: Unscramble: atc\nA: cat\n\n\nQ: Say the sentence back")
    for seed in range(10):  # never an item as its own shot, always k shots from the same task
        for item, zero in zip(load_bigbench("toy_generate", root=ROOT, num_fewshot=2, seed=seed),
                              load_bigbench("toy_generate", root=ROOT)):
            shots = item.prompt.removesuffix(zero.prompt)
            assert zero.prompt.strip() not in shots and shots.count("\nQ: ") == 2
    with pytest.raises(DataError, match="too few for 4 shots"):
        load_bigbench("toy_generate", root=ROOT, num_fewshot=4)


def test_bigbench_postprocessing():
    regex = r"[^\.\?\!\;\n]+"
    assert postprocess(" Paris. And more", None, regex) == " Paris"
    assert postprocess("\nParis", None, regex) == "Paris"  # the first match, not the first line
    assert postprocess("42 is it. 7", ".", None) == "42 is it."  # cut after the stop string
    assert postprocess(".x", ".", None) == ".x"  # BIG-bench ignores a stop string at position 0
    assert not response_is_final(" Paris", None, regex) and response_is_final(" Paris.", None, regex)
    assert not response_is_final("\n", None, regex)  # no match yet: keep decoding


class ScriptedLM:
    """Answers each prompt with a fixed text; log-likelihoods from a table."""
    progress, max_len = False, 512

    def __init__(self, answers: dict[str, str], logliks: dict[tuple[str, str], float] | None = None):
        self.answers, self.logliks = answers, logliks or {}

    def generate(self, prompt, max_new_tokens, done):
        text = ""
        for ch in self.answers[prompt.split("\nQ: ")[-1]]:
            text += ch
            if done(text):
                break
        return text

    def loglikelihood(self, requests, desc=""):
        return [(self.logliks.get((c.split("\nQ: ")[-1], x), -1.0), False) for c, x in requests]


def test_generative_exact_match_bleu_rouge_and_target_loglikelihood():
    items = load_bigbench("toy_generate", root=ROOT)
    answers = {"Unscramble: ocd\nA: ": "cod.\nmore", "Unscramble: atc\nA: ": "act!",
               "Unscramble: odg\nA: ": " dog", "Say the sentence back: the cat sat on the mat\nA: ": "the cat sat on a mat"}
    logliks = {("Unscramble: atc\nA: ", "cat"): -2.0, ("Unscramble: atc\nA: ", "act"): -3.0}
    result = evaluate_bigbench(ScriptedLM(answers, logliks), items)
    predictions = [s["prediction"] for s in result.samples]
    assert predictions == ["cod", "act", " dog", "the cat sat on a mat"]
    assert [s["exact_str_match"] for s in result.samples] == [1.0, 1.0, 0.0, 0.0]  # " dog" != "dog", as in BIG-bench
    assert result.metrics["exact_str_match"] == 0.5
    sacrebleu = pytest.importorskip("sacrebleu")
    references = [["cod", "cat", "dog", "the cat sat on the mat"], ["cod", "act", "dog", "the cat sat on the mat"]]
    expected = sacrebleu.corpus_bleu(predictions, references, smooth_method="exp", smooth_value=0.0, force=False,
                                     lowercase=False, tokenize="intl", use_effective_order=False).score
    assert result.metrics["bleu"] == pytest.approx(expected)  # BIG-bench's bleu_fn (refs padded with the first)
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"])
    per_item = [max(scorer.score(t, p)["rouge2"].fmeasure for t in ts)
                for p, ts in zip(predictions, [["cod"], ["cat", "act"], ["dog"], ["the cat sat on the mat"]])]
    assert result.metrics["rouge2"] == pytest.approx(100 * sum(per_item) / 4)
    assert result.samples[1]["log_likelihood"] == pytest.approx(math.log(math.exp(-2) + math.exp(-3)))  # logsumexp


def test_a_real_tiny_model_through_mc_and_generative_tasks(tmp_path):
    lm = EvalLM.load(tiny_checkpoint(tmp_path / "ckpt"), progress=False)
    mc = evaluate_bigbench(lm, load_bigbench("toy_task", root=ROOT, num_fewshot=0))
    assert set(mc.metrics) >= {"multiple_choice_grade", "acc", "acc_norm"}
    assert all(s["multiple_choice_grade"] == s["acc"] for s in mc.samples)  # 0/1 scores: the same thing
    items = load_bigbench("toy_generate", root=ROOT, num_fewshot=1)[:1]  # a random model talks to 256 tokens
    gen = evaluate_bigbench(lm, items)
    for sample, item in zip(gen.samples, items):
        assert sample["exact_str_match"] == float(sample["prediction"] in item.targets)
    assert 0 <= gen.metrics["bleu"] <= 100


def test_the_extracted_real_tasks_when_cached():
    if not (bigbench_dir() / "winowhy" / "task.json").exists():
        pytest.skip("BIG-bench tasks not extracted yet (mobilellm eval --tasks bigbench_winowhy fetches them)")
    items = load_bigbench("winowhy")
    assert len(items) == 2862 and all(i.choices == ("correct", "incorrect") for i in items)
    three_shot = load_bigbench("winowhy", num_fewshot=3)
    assert all(i.prompt.count("The above reasoning is") == 4 for i in three_shot[:50])


def test_metrics_helpers():
    assert metrics.numeric_match("10.5", ["10"]) == 1.0 and metrics.numeric_match("12", ["10"]) == 0.0
    assert metrics.numeric_match("x", ["10"]) == 0.0
