"""The data-mixing experiment (MobileLLM-Pro's SDM, SPEC.md 2.4) at CPU scale: uniform vs natural vs SDM mix.

Data: the starter corpus with its two extra domains (prose, code, math, docs, bigbench) tokenized with SmolLM2's
tokenizer, 10% of documents held out, plus a junk domain the tool builds (prose with its tokens shuffled within
each document). The target is reasoning: the held-out math and BIG-bench text (even-indexed held-out documents;
every reported loss comes from the odd-indexed ones, which the mixer never sees).

Arms, all the starter student (19M) from the same seed, CE, the same steps and tokens:
- uniform: every domain alike (junk included); natural: token-proportional; sdm: `mobilellm mix`'s weights, found
  by the starter's SDM stage (`recipes/sdm.py`: a 7M proxy, K=4 checkpoints). Every run, proxy and arms, draws
  documents in row-sized pieces, as the starter does (whole plays otherwise fill dozens of consecutive rows).
Reported: held-out loss per domain, the target's average loss, accuracy on BIG-bench multiple-choice tasks that
no corpus text comes from, and the simulation's cost as a fraction of one main run (tokens and seconds).

    python benchmarks/sdm_mix.py --seed 0            # about 11 minutes on 2 cores; --seed 1 for the repeat
    python benchmarks/sdm_mix.py --smoke             # end to end in about 2 minutes, nothing written to results/
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mobilellm.artifacts import cache_root, fetch_smollm2  # noqa: E402
from mobilellm.atomic import atomic_file  # noqa: E402
from mobilellm.data.starter import ALL_DOMAINS, starter_shards  # noqa: E402
from mobilellm.eval.lm import EvalLM  # noqa: E402
from mobilellm.eval.report import run_tasks  # noqa: E402
from mobilellm.hf import load_pretrained  # noqa: E402
from mobilellm.merge.target import DomainTarget  # noqa: E402
from mobilellm.mix import MixConfig, Target, simulate  # noqa: E402
from mobilellm.mix.plot import plot_mix  # noqa: E402
from mobilellm.tokenizer import Tokenizer  # noqa: E402
from mobilellm.train.objectives import CE  # noqa: E402
from mobilellm.train.recipe import run_recipe  # noqa: E402
from recipes.sdm import starter_proxy  # noqa: E402
from recipes.starter import starter  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TARGET_DOMAINS = ("math", "bigbench")
JUNK_SOURCE = "prose"


def experiment_shards(base: Path) -> Path:
    """The starter corpus with its extra domains, tokenized with SmolLM2's tokenizer, 10% of documents held out."""
    return starter_shards(base, cache_root() / "shards" / "sdm-starter-smollm2-135m", val_fraction=0.1,
                          domains=ALL_DOMAINS)


def run_simulation(shards: Path, out: Path, *, seed: int, proxy_steps: int, proxy_batch: int, seq_len: int,
                   probe_rows: int, target_rows: int) -> dict:
    """The experiment's SDM simulation (the starter's 7M proxy, K=4 checkpoints, the junk domain): mix.json's content."""
    proxy = starter_proxy(str(shards), steps=proxy_steps, rows=proxy_batch, seq_len=seq_len, seed=seed)
    target = Target(domains=TARGET_DOMAINS, rows=target_rows, part=(0, 2))
    return simulate(proxy, target, out, config=MixConfig(checkpoints=4, probe_rows=probe_rows,
                                                         micro_rows=probe_rows, junk=JUNK_SOURCE))


def main_recipe(shards: str, weights: dict, args):
    """The starter student on `weights`, CE, the experiment's steps and batch (no mid-run evaluation)."""
    recipe = starter().replace(objective=CE(), shards=shards, domain_weights=weights, prepare=None, seed=args.seed,
                               seq_len=args.seq_len, global_batch_rows=args.batch, micro_batch_rows=args.batch,
                               max_doc_tokens=args.seq_len + 1)
    return recipe.with_steps(args.steps).replace_train(eval_every=0, save_every=0, print_every=10)


def plot_losses(report: dict, out: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(report)
    columns = [c for c in report[arms[0]] if c != "mean"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        ax.bar([k + (i - (len(arms) - 1) / 2) * width for k in range(len(columns))],
               [report[arm][c] for c in columns], width, label=arm)
    ax.set_xticks(range(len(columns)), columns, rotation=20, ha="right")
    ax.set_ylabel("held-out next-token CE (report half)")
    lows = [report[a][c] for a in arms for c in columns]
    ax.set_ylim(min(lows) * 0.95, max(lows) * 1.02)
    ax.set_title(title, loc="left")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    with atomic_file(out, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps of every main arm")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--proxy-steps", type=int, default=64)
    parser.add_argument("--proxy-batch", type=int, default=2)
    # 8, not 4: at 4 rows the junk domain's gradient estimate was too noisy to rank it below its own source, prose
    # (junk last in 1 of 5 seeds; at 8 rows, 4 of 5: benchmarks/sdm_probe_rows.py), for ~8% of a main run's FLOPs
    parser.add_argument("--probe-rows", type=int, default=8, help="training rows per domain and checkpoint")
    parser.add_argument("--target-rows", type=int, default=4, help="target rows per target domain")
    parser.add_argument("--eval-batches", type=int, default=8, help="report-half batches per domain")
    parser.add_argument("--bigbench", default="bigbench_elementary_math_qa,bigbench_winowhy",
                        help="multiple-choice tasks scored for every arm ('' for none)")
    parser.add_argument("--bigbench-limit", type=int, default=30)
    parser.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temp dir)")
    parser.add_argument("--smoke", action="store_true", help="a few steps of everything; results not written")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.proxy_steps, args.eval_batches, args.bigbench_limit = 4, 8, 1, 4
    torch.manual_seed(args.seed)
    base = fetch_smollm2()
    shards = experiment_shards(base)
    work = args.work or Path(tempfile.mkdtemp(prefix="sdm-mix-"))

    mix = run_simulation(shards, work / "mix", seed=args.seed, proxy_steps=args.proxy_steps,
                         proxy_batch=args.proxy_batch, seq_len=args.seq_len, probe_rows=args.probe_rows,
                         target_rows=args.target_rows)
    data = mix["data"]["shards"]  # the shards plus the junk domain
    arms = {"uniform": mix["uniform"], "natural": mix["natural"], "sdm": mix["weights"]}
    seconds, folders = {}, {}
    for name, weights in arms.items():
        start = time.perf_counter()
        folders[name] = run_recipe(main_recipe(data, weights, args), work / name, resume=True).checkpoint
        seconds[name] = time.perf_counter() - start

    report_half = DomainTarget.from_shards(data, list(mix["weights"]), "report", seq_len=args.seq_len,
                                           batch_size=args.batch, max_batches=args.eval_batches)
    tokenizer = Tokenizer.load(base)
    tasks = [t for t in args.bigbench.split(",") if t]
    report, multiple_choice = {}, {}
    for name in arms:
        model = load_pretrained(folders[name])
        losses = report_half.losses(model)
        losses.pop("mean")
        report[name] = {**losses, "target mean": sum(losses[d] for d in TARGET_DOMAINS) / len(TARGET_DOMAINS),
                        "real-domain mean": sum(v for d, v in losses.items() if not d.startswith("shuffled-"))
                        / len([d for d in losses if not d.startswith("shuffled-")])}
        if tasks:
            scores = run_tasks(EvalLM(model, tokenizer, progress=False), tasks, limit=args.bigbench_limit,
                               log=lambda line: None)["tasks"]
            multiple_choice[name] = {t: scores[t]["metrics"]["acc"] for t in tasks}
    main_tokens = args.steps * args.batch * args.seq_len
    main_seconds = sum(seconds.values()) / len(seconds)
    cost = {"simulation_tokens": mix["cost"]["tokens"], "main_run_tokens": main_tokens,
            "token_fraction": mix["cost"]["tokens"] / main_tokens,
            "simulation_seconds": mix["cost"]["seconds"], "main_run_seconds": main_seconds,
            "seconds_fraction": mix["cost"]["seconds"] / main_seconds,
            "flop_fraction": (mix["proxy_parameters"] * mix["cost"]["tokens"])
            / (sum(p.numel() for p in model.parameters()) * main_tokens)}
    target_mean = {name: report[name]["target mean"] for name in arms}
    summary = {"sdm beats uniform (target mean)": target_mean["sdm"] < target_mean["uniform"],
               "sdm beats natural (target mean)": target_mean["sdm"] < target_mean["natural"],
               # by utility: the weights are a monotone map of it, and low ones tie at the floor
               "junk ranked last": min(mix["utilities"], key=mix["utilities"].get) == f"shuffled-{JUNK_SOURCE}",
               "junk weight at most every other domain's": mix["weights"][f"shuffled-{JUNK_SOURCE}"]
               <= min(mix["weights"].values()),
               "junk under half the uniform weight": mix["weights"][f"shuffled-{JUNK_SOURCE}"]
               < 0.5 * mix["uniform"][f"shuffled-{JUNK_SOURCE}"],
               "simulation at most 10% of a main run (FLOPs)": cost["flop_fraction"] <= 0.10,
               "simulation at most 10% of a main run (seconds)": cost["seconds_fraction"] <= 0.10}
    for name in arms:
        print(f"{name:>8}: " + "  ".join(f"{k} {v:.4f}" for k, v in report[name].items()) +
              "".join(f"  {t.removeprefix('bigbench_')} {a:.2f}" for t, a in multiple_choice.get(name, {}).items()))
    print("weights: " + "  ".join(f"{d} {w:.3f}" for d, w in mix["weights"].items()))
    print(f"cost: simulation {cost['token_fraction']:.1%} of a main run's tokens, {cost['seconds_fraction']:.1%} of "
          f"its seconds, {cost['flop_fraction']:.1%} of its FLOPs")
    print(summary)
    if args.smoke:
        print(f"smoke run: results not written (runs in {work})")
        return
    RESULTS.mkdir(exist_ok=True)
    stem = f"sdm_mix_seed{args.seed}"
    plot_mix(mix, RESULTS / f"{stem}_weights.png", title=f"SDM on the starter corpus (seed {args.seed})")
    plot_losses(report, RESULTS / f"{stem}.png", f"starter student, {args.steps} steps x {args.batch * args.seq_len} "
                f"tokens per arm (seed {args.seed}): held-out loss")
    write_json(RESULTS / f"{stem}.json", {
        "command": "python benchmarks/sdm_mix.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "student": "starter-student (18,878,720 parameters), CE, from scratch",
        "budget": {"steps": args.steps, "tokens_per_step": args.batch * args.seq_len, "tokens": main_tokens},
        "target": {"domains": list(TARGET_DOMAINS), "mixer_sees": "even-indexed held-out documents",
                   "reported_on": "odd-indexed held-out documents", "batches_per_domain": args.eval_batches},
        "weights": arms,
        "utilities": mix["utilities"],
        "per_checkpoint_utilities": {c["step"]: c["utilities"] for c in mix["checkpoints"]},
        "report_losses": report,
        "multiple_choice_acc": multiple_choice,
        "multiple_choice_limit": args.bigbench_limit,
        "cost": cost,
        "summary": summary,
        "seconds": seconds,
        "mix": mix,
    })


if __name__ == "__main__":
    main()
