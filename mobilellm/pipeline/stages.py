"""The stages of the MobileLLM-Pro recipe, each run through the existing code (`run_recipe`, `simulate`,
`merge_search`, `run_qat_recipe`, `run_tasks`, ...), in order:

    corpus -> tokenize -> mix -> phase1 -> [phase1-baseline] -> phase2 -> specialists -> merge -> qat -> sft
    -> [dpo] -> eval -> export

Each function takes the stage's `StageRun` and returns a `StageResult`; `build_stages(plan)` lists them with their
settings (hashed into their keys), token budgets and FLOPs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from functools import partial
from pathlib import Path

import torch

from ..artifacts import resolve_checkpoint
from ..atomic import write_json_atomic
from ..config import ModelConfig
from ..train.metrics import flops_per_token
from .plan import Plan, RecipeCall, jsonable
from .runner import Stage, StageResult, StageRun

TRAIN_RUN = "run"


def _rel(run: StageRun, path: Path) -> str:
    return str(Path(path).relative_to(run.work))


def _final(run: StageRun, path: Path) -> str:
    """A path as the stage's files record it: where a path of the work folder lives once the stage is finished
    (the work folder is renamed then), or the path itself when it lies outside (an earlier stage's output)."""
    return str(run.final / _rel(run, path)) if Path(path).is_relative_to(run.work) else str(path)


def train_metrics(run_dir: Path) -> dict:
    from ..train.metrics import read_metrics

    rows = read_metrics(run_dir)
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    val = [r for r in rows if "val_loss" in r]
    return {"steps": max((r["step"] for r in rows), default=0), "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None, "val_loss": val[-1]["val_loss"] if val else None,
            "val_loss_by_domain": {k.split("/", 1)[1]: v for k, v in val[-1].items() if k.startswith("val_loss/")}
            if val else {},
            "objective": next((r["objective"] for r in rows if "objective" in r), None)}


def recipe_tokens(recipe) -> int:
    return recipe.train.steps * recipe.global_batch_rows * recipe.seq_len


def train(run: StageRun, recipe, sub: str = TRAIN_RUN, parents: tuple = (), how: str = "") -> tuple[Path, dict, dict]:
    """Run `recipe` into WORK/sub (resuming its latest checkpoint); (final checkpoint, metrics, lineage entry)."""
    from ..train.recipe import run_recipe

    result = run_recipe(recipe, run.work / sub, resume=True, strategy=run.strategy)
    metrics = {**train_metrics(run.work / sub), "recipe": recipe.name, "tokens": recipe_tokens(recipe)}
    lineage = {"checkpoint": _final(run, result.checkpoint), "from": [str(p) for p in parents],
               "how": how or recipe.name, "recipe": str(run.final / sub / "recipe.json")}
    return result.checkpoint, metrics, lineage


# ---- data ------------------------------------------------------------------------------------------------

def corpus_stage(plan: Plan, run: StageRun) -> StageResult:
    from ..data.sources import Source, read_documents
    from ..data.starter import build_starter_corpus

    spec, folder = plan.corpus, run.work / "corpus"
    if spec.files:
        folder.mkdir(parents=True, exist_ok=True)
        summary = {}
        for domain, path in sorted(spec.files.items()):
            shutil.copyfile(path, folder / f"{domain}.jsonl")
            texts = list(read_documents(Source(folder / f"{domain}.jsonl")))
            summary[domain] = {"file": f"{domain}.jsonl", "documents": len(texts),
                               "characters": sum(map(len, texts)), "source": str(path)}
        write_json_atomic(folder / "corpus.json", summary)
    else:
        summary = build_starter_corpus(folder, max_chars=spec.max_chars, domains=spec.domains, log=run.log)
    return StageResult({"corpus": "corpus"}, metrics={"domains": summary},
                       tokens=None, lineage=[{"checkpoint": _final(run, folder), "from": sorted(
                           str(s.get("source", "the starter corpus (package registries)")) for s in summary.values()),
                                              "how": "corpus"}])


def tokenize_stage(plan: Plan, run: StageRun) -> StageResult:
    from ..data.sharding import tokenize_to_shards
    from ..data.starter import corpus_sources
    from ..tokenizer import Tokenizer

    corpus = run.input("corpus", "corpus")
    out = run.work / "shards"
    manifest = tokenize_to_shards(corpus_sources(corpus), Tokenizer.load(resolve_checkpoint(plan.tokenizer)), out,
                                  val_fraction=plan.corpus.val_fraction, progress=False)
    domains = {name: {k: d[k] for k in ("train_tokens", "val_tokens", "train_documents", "val_documents")}
               for name, d in manifest["domains"].items()}
    tokens = sum(d["train_tokens"] + d["val_tokens"] for d in domains.values())
    return StageResult({"shards": "shards"}, metrics={"domains": domains, "tokenizer": plan.tokenizer}, tokens=tokens)


def mix_stage(plan: Plan, run: StageRun) -> StageResult:
    from ..mix import MIX_FILE, MixConfig, Target, simulate
    from ..mix.mixfile import FORMAT

    spec = plan.mix
    proxy = spec.proxy(str(run.input("tokenize", "shards")), tokenizer=str(resolve_checkpoint(plan.tokenizer)))
    summary = simulate(proxy, Target(domains=spec.target_domains), run.work,
                       config=MixConfig(checkpoints=spec.checkpoints, probe_rows=spec.probe_rows),
                       strategy=run.strategy, resume=True, log=run.log)
    # What later stages read: the weights alone (mix.json also holds timings, which differ run to run).
    write_json_atomic(run.work / "weights.json", {"format": FORMAT, "weights": summary["weights"]})
    return StageResult({"weights": "weights.json"}, files={"mix": MIX_FILE, "figure": "mix.png"},
                       metrics={"weights": summary["weights"], "utilities": summary["utilities"],
                                "natural": summary["natural"], "cost": summary["cost"]},
                       tokens=summary["cost"]["tokens"])


# ---- training --------------------------------------------------------------------------------------------

def phase1_recipe(plan: Plan, run: StageRun, **changes):
    return plan.phase1(str(run.input("tokenize", "shards")), str(run.input("mix", "weights")),
                       tokenizer=str(resolve_checkpoint(plan.tokenizer)), teacher=str(resolve_checkpoint(plan.teacher)),
                       student=plan.student, **changes)


def phase1_start(plan: Plan, recipe) -> str:
    """Where a phase-1 student starts, for the lineage: subcloned from the teacher, or drawn at random."""
    return (f"subcloned from {plan.teacher} ({plan.student.name})" if recipe.inherit
            else f"scratch ({plan.student.name}, seed {recipe.seed})")


def phase1_stage(plan: Plan, run: StageRun) -> StageResult:
    recipe = phase1_recipe(plan, run)
    ckpt, metrics, lineage = train(run, recipe, parents=(phase1_start(plan, recipe),
                                                         f"teacher {plan.teacher}"), how="phase 1: KD pretraining")
    return StageResult({"checkpoint": _rel(run, ckpt)}, metrics=metrics, tokens=metrics["tokens"],
                       files={"run": TRAIN_RUN}, lineage=[lineage])


def phase2_stage(plan: Plan, run: StageRun) -> StageResult:
    init = run.input("phase1", "checkpoint")
    recipe = plan.phase2(str(init), str(run.input("tokenize", "shards")), teacher=str(resolve_checkpoint(plan.teacher)),
                         tokenizer=str(resolve_checkpoint(plan.tokenizer)))
    ckpt, metrics, lineage = train(run, recipe, parents=(init, f"teacher {plan.teacher}"),
                                   how="phase 2: implicit positional distillation")
    metrics["context"] = recipe.config_changes.get("max_seq_len")
    return StageResult({"checkpoint": _rel(run, ckpt)}, metrics=metrics, tokens=metrics["tokens"],
                       files={"run": TRAIN_RUN}, lineage=[lineage])


def specialists_stage(plan: Plan, run: StageRun) -> StageResult:
    init, shards = run.input("phase2", "checkpoint"), str(run.input("tokenize", "shards"))
    outputs, metrics, lineage = {}, {}, []
    for domain in plan.specialist_domains:
        ckpt, m, entry = train(run, plan.specialists(str(init), shards, domain), sub=domain, parents=(init,),
                               how=f"phase 3: {domain} specialist")
        outputs[domain], metrics[domain] = _rel(run, ckpt), m
        lineage.append(entry)
    return StageResult(outputs, metrics=metrics, tokens=sum(m["tokens"] for m in metrics.values()),
                       files={d: d for d in plan.specialist_domains}, lineage=lineage)


def merge_stage(plan: Plan, run: StageRun) -> StageResult:
    from ..commands.merge import merge_search
    from ..schema import read_json_object

    spec = plan.merge
    models = [str(run.input("specialists", d)) for d in plan.specialist_domains]
    out = run.work / "merged"
    merge_search(models, data=run.input("tokenize", "shards"), out=out, step=spec.step, seq_len=spec.seq_len,
                 batch_size=spec.batch_size, val_batches=spec.val_batches)
    search = read_json_object(run.work / "merged.search.json", fix="run the merge stage again")
    metrics = {"domains": list(plan.specialist_domains), "best": search["best"], "uniform": search["uniform"],
               "trials": search["trials"]}
    return StageResult({"checkpoint": "merged"}, metrics=metrics,
                       files={"search": "merged.search.json", "figure": "merged.search.png"},
                       lineage=[{"checkpoint": _final(run, out), "from": models,
                                 "how": f"phase 3: merge, weights {[round(w, 3) for w in search['best']['weights']]}"}])


def quant_config(plan: Plan):
    from ..quant.config import QuantConfig

    return QuantConfig.from_scheme(plan.qat.setting("scheme"))


def qat_train(run: StageRun, recipe, parents: tuple, how: str) -> StageResult:
    """A recipe with a QATPrepare transform: trained, converted to int4 (WORK/int4)."""
    from ..quant.qat import run_qat_recipe
    from ..train.distributed import init_parallel

    parallel = init_parallel(run.strategy)
    result = run_qat_recipe(recipe, run.work / TRAIN_RUN, run.work / "int4", resume=True, parallel=parallel)
    metrics = {**train_metrics(run.work / TRAIN_RUN), "recipe": recipe.name, "tokens": recipe_tokens(recipe)}
    ckpt = _final(run, result.checkpoint)
    lineage = [{"checkpoint": ckpt, "from": [str(p) for p in parents], "how": how,
                "recipe": str(run.final / TRAIN_RUN / "recipe.json")},
               {"checkpoint": str(run.final / "int4"), "from": [ckpt], "how": f"convert to int4 ({recipe.name})"}]
    return StageResult({"checkpoint": _rel(run, result.checkpoint), "int4": "int4"}, metrics=metrics,
                       tokens=metrics["tokens"], files={"run": TRAIN_RUN}, lineage=lineage)


def qat_stage(plan: Plan, run: StageRun) -> StageResult:
    init = run.input("merge", "checkpoint")
    recipe = plan.qat(str(init), str(run.input("tokenize", "shards")))
    return qat_train(run, recipe, (init,), f"phase 4: QAT ({plan.qat.setting('scheme')} scheme), self-distillation")


def instruct_data(plan: Plan, run: StageRun) -> dict[str, str | None]:
    """The SFT / DPO files: the plan's own, or built from BIG-bench into WORK/data once."""
    from ..data.instructions import INSTRUCTION_FILES, write_instructions

    spec = plan.instruct
    if spec.sft_data:
        return {"sft": spec.sft_data, "sft_val": spec.sft_val, "dpo": spec.dpo_data}
    folder = run.work / "data"
    if not (folder / "manifest.json").exists():
        write_instructions(folder, list(spec.tasks), max_per_task=spec.max_per_task)
    return {key: str(folder / name) for key, name in INSTRUCTION_FILES.items()}


def qat_aware(plan: Plan, recipe):
    from ..quant.qat import QATPrepare

    return recipe.replace(transforms=(QATPrepare(quant_config(plan)),))


def sft_stage(plan: Plan, run: StageRun) -> StageResult:
    data = instruct_data(plan, run)
    init = run.input("qat", "checkpoint")
    recipe = qat_aware(plan, plan.instruct.sft(str(init), data["sft"], val=data.get("sft_val")))
    result = qat_train(run, recipe, (init,), "SFT, QAT-aware (fake quant on)")
    if data.get("dpo") and not plan.instruct.sft_data:
        result.outputs["dpo_data"] = _rel(run, Path(data["dpo"]))
    return result


def dpo_stage(plan: Plan, run: StageRun) -> StageResult:
    init = run.input("sft", "checkpoint")
    data = plan.instruct.dpo_data or str(run.input("sft", "dpo_data"))
    recipe = qat_aware(plan, plan.instruct.dpo(str(init), data))
    return qat_train(run, recipe, (init,), "DPO, QAT-aware (fake quant on)")


def baseline_stage(plan: Plan, run: StageRun) -> StageResult:
    """The KD experiment: phase 1 with KD and with plain CE, same budget and seed, for each seed; both arms'
    held-out loss and multiple-choice scores, paired on the same items."""
    from ..train.objectives import CE

    kd_seed = phase1_recipe(plan, run).seed
    arms, results, lineage = {}, {}, []
    for seed in plan.baseline.seeds:
        for arm in ("kd", "ce"):
            name = f"{arm}-seed{seed}"
            if arm == "kd" and seed == kd_seed:
                arms[name] = run.input("phase1", "checkpoint")  # the main run is the KD arm of its seed
                continue
            recipe = phase1_recipe(plan, run).replace(seed=seed)
            if arm == "ce":
                recipe = recipe.replace(objective=CE())
            teacher = (f"teacher {plan.teacher}",) if arm == "kd" else ()
            arms[name], _, entry = train(run, recipe, sub=name, parents=(phase1_start(plan, recipe), *teacher),
                                         how=f"phase 1 baseline arm: {arm}, seed {seed}")
            lineage.append(entry)
    for name, ckpt in arms.items():
        results[name] = evaluate_model(plan, run, name, ckpt)
    comparisons = {f"seed{seed}": compare(results[f"kd-seed{seed}"], results[f"ce-seed{seed}"])
                   for seed in plan.baseline.seeds}
    summary = {"arms": {n: strip(r) for n, r in results.items()}, "kd_vs_ce": comparisons,
               "tokens_per_arm": recipe_tokens(phase1_recipe(plan, run))}
    write_json_atomic(run.work / "baseline.json", summary)
    trained = [name for name in arms if name != f"kd-seed{kd_seed}"]
    runs = {name: name for name in trained}
    return StageResult({"results": "baseline.json"}, metrics=summary, files=runs, lineage=lineage,
                       tokens=summary["tokens_per_arm"] * len(trained))


# ---- evaluation ------------------------------------------------------------------------------------------

def held_out_batches(plan: Plan, shards: Path) -> list[dict]:
    from ..data import TokenDataset, validation_batches

    return list(validation_batches(TokenDataset(shards), seq_len=plan.eval.seq_len, batch_size=4,
                                   max_batches=plan.eval.val_batches))


def evaluate_model(plan: Plan, run: StageRun, name: str, checkpoint: Path) -> dict:
    """Held-out loss (per batch, for paired comparisons) and the multiple-choice tasks of one checkpoint."""
    from ..eval.lm import EvalLM
    from ..eval.report import run_tasks, save_results
    from ..train.losses import CrossEntropy

    lm = EvalLM.load(checkpoint, progress=False)
    batches = held_out_batches(plan, run.input("tokenize", "shards"))
    ce = CrossEntropy(chunk_size=1024)  # a fixed chunk: an int4 head has no float weight to size it by
    with torch.no_grad():
        sums = [float(ce(lm.model, b)) for b in batches]
    tokens = [int(ce.count(b)) for b in batches]
    per_batch = [s / t for s, t in zip(sums, tokens)]
    loss = sum(sums) / sum(tokens)
    result = {"checkpoint": _final(run, checkpoint), "held_out_loss": loss, "held_out_perplexity": math.exp(loss),
              "held_out_batches": per_batch, "held_out_tokens": sum(tokens), "model": None, "tasks": {}}
    if plan.eval.tasks:
        tasks = run_tasks(lm, list(plan.eval.tasks), data_dir=Path(plan.eval.data_dir) if plan.eval.data_dir else None,
                          limit=plan.eval.limit, num_fewshot=plan.eval.num_fewshot, log=run.log)
        tasks["model"]["checkpoint"] = result["checkpoint"]
        save_results(tasks, run.work / f"{name}.results.json")
        result["tasks"], result["model"] = tasks["tasks"], tasks["model"]
    run.log(f"[eval] {name}: held-out loss {loss:.4f} (ppl {math.exp(loss):.2f})" + "".join(
        f", {t} {r['main_metric']} {r['metrics'][r['main_metric']]:.3f}" for t, r in result["tasks"].items()))
    return result


def strip(result: dict) -> dict:
    """A model's results without the per-item samples (those stay in NAME.results.json)."""
    return {**{k: v for k, v in result.items() if k != "tasks"},
            "tasks": {t: {k: v for k, v in r.items() if k != "samples"} for t, r in result["tasks"].items()}}


def compare(a: dict, b: dict) -> dict:
    """B against A: the held-out loss paired per batch, the tasks paired per item (`paired_comparison`)."""
    from ..eval import stats
    from ..eval.report import paired_comparison

    loss = stats.paired_mean_difference(a["held_out_batches"], b["held_out_batches"])
    rows = paired_comparison({"tasks": a["tasks"]}, {"tasks": b["tasks"]}) if a["tasks"] and b["tasks"] else []
    return {"held_out_loss": {"a": a["held_out_loss"], "b": b["held_out_loss"], **dataclasses.asdict(loss),
                              "within_noise": loss.within_noise}, "tasks": rows}


def eval_stage(plan: Plan, run: StageRun, final_stage: str) -> StageResult:
    from ..commands.needle import default_corpus
    from ..data import TokenDataset
    from ..eval.lm import EvalLM
    from ..eval.long_context import long_documents, loss_by_position, save_curves
    from ..eval.needle import needle_grid, save_heatmap
    from ..loading import load
    from ..quant import quantize_
    from ..quant.checkpoint import save_quantized

    spec = plan.eval
    fp = run.input("merge", "checkpoint")
    ptq = run.work / "ptq"
    if not (ptq / "config.json").exists():
        loaded = load(fp)
        save_quantized(quantize_(loaded.model.eval(), quant_config(plan)), quant_config(plan), ptq,
                       extra_files=loaded.tokenizer_files)
    # "final, fake quant" is the instruction-tuned model before its int4 conversion: what SFT/DPO changed apart
    # from what the conversion did.
    models = {"full precision": fp, "PTQ int4": ptq, "QAT int4": run.input("qat", "int4"),
              "final, fake quant": run.input(final_stage, "checkpoint"), "final int4": run.input(final_stage, "int4")}
    results = {name: evaluate_model(plan, run, name.replace(" ", "-"), path) for name, path in models.items()}
    comparisons = {name: compare(results["full precision"], results[name]) for name in models if name != "full precision"}
    files, needle = {}, {}
    corpus = default_corpus()
    for name in ("full precision", "final int4"):
        grid = needle_grid(EvalLM.load(models[name], progress=False), corpus, list(spec.needle_lengths),
                           list(spec.needle_depths), spec.needle_trials)
        png = run.work / f"needle-{name.replace(' ', '-')}.png"
        save_heatmap(grid, png, title=f"needle: {name}")
        needle[name], files[f"needle {name}"] = grid.to_dict(), png.name
    position = {}
    docs = long_documents(TokenDataset(run.input("tokenize", "shards")), spec.position_length, "val")
    if docs:
        curves = {name: loss_by_position(load(path).model.eval(), docs, spec.position_length, spec.position_buckets)
                  for name, path in (("phase 1", run.input("phase1", "checkpoint")),
                                     ("phase 2 (IPD)", run.input("phase2", "checkpoint")), ("merged", fp))}
        save_curves(curves, run.work / "position-loss.png",
                    marks={"phase-1 context": load(run.input("phase1", "checkpoint")).model.config.max_seq_len})
        position = {"documents": len(docs), "curves": {n: c.to_dict() for n, c in curves.items()}}
        files["position loss"] = "position-loss.png"
    else:
        run.log(f"[eval] loss by position skipped: no held-out document of {spec.position_length + 1:,} tokens")
    summary = {"models": {n: strip(r) for n, r in results.items()}, "vs_full_precision": comparisons,
               "needle": needle, "position_loss": position}
    write_json_atomic(run.work / "eval.json", summary)
    return StageResult({"results": "eval.json"}, metrics=summary, files=files,
                       tokens=sum(r["held_out_tokens"] for r in results.values()))


def export_stage(plan: Plan, run: StageRun, final_stage: str) -> StageResult:
    from ..infer.chat import encode_prompt
    from ..infer.engine import generate, new_cache
    from ..infer.sampling import SamplingConfig
    from ..loading import load

    spec = plan.export
    out = run.work / "int4"
    if not out.exists():
        shutil.copytree(run.input(final_stage, "int4"), out)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    loaded = load(out, require_tokenizer=True)
    model, tokenizer = loaded.model.eval().fuse_projections(), loaded.tokenizer
    ids = encode_prompt(tokenizer, spec.prompt, chat=bool(tokenizer.chat_template))
    cache = new_cache(model, max_len=min(model.config.max_seq_len, len(ids) + spec.max_new_tokens),
                      int8=bool(loaded.quant.kv_int8))
    stamps, answer = [], []
    with torch.no_grad():
        for token in generate(model, ids, cache, max_new_tokens=spec.max_new_tokens,
                              sampling=SamplingConfig(temperature=0.0, repetition_penalty=1.2),
                              stop_ids=tuple(tokenizer.eos_ids)):
            answer.append(token)
            stamps.append(time.perf_counter())
    decode_s = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
    text = tokenizer.decode(answer, skip_special=True)
    run.log(f"[export] {spec.prompt!r} -> {text!r}")
    metrics = {"size_bytes": size, "decode_tokens_per_s": decode_s, "threads": torch.get_num_threads(),
               "prompt": spec.prompt, "answer": text, "new_tokens": len(answer), "scheme": loaded.quant.scheme}
    outputs = {"int4": "int4"}
    if spec.pte:
        try:
            from ..quant.executorch import export_pte

            export_pte(model, loaded.quant, run.work / "model.pte", seq_len=min(model.config.max_seq_len, 512))
            outputs["pte"] = "model.pte"
            metrics["pte"] = "model.pte"
        except ImportError as err:
            metrics["pte"] = f"skipped: ExecuTorch is not installed ({err}); pip install -c constraints.txt " \
                             "'mobilellm[executorch]' to export one"
            run.log(f"[export] .pte {metrics['pte']}")
    return StageResult(outputs, metrics=metrics,
                       lineage=[{"checkpoint": str(run.final / "int4"), "from": [str(run.input(final_stage, "int4"))],
                                 "how": "export (copy of the final int4 model)"}])


# ---- the plan as stages ----------------------------------------------------------------------------------

def training_flops(plan: Plan, call: RecipeCall, student: ModelConfig, teacher_forward: float = 0.0) -> float:
    """Student forward+backward (6N + attention) and the teacher's (or reference's) forward, 2N per token."""
    seq_len = call.setting("seq_len")
    return call.tokens() * (flops_per_token(student.replace(max_seq_len=max(seq_len, student.max_seq_len)), seq_len)
                            + 2 * teacher_forward)


def build_stages(plan: Plan) -> list[Stage]:
    student, compute = plan.student, plan.compute
    teacher_n = compute.teacher_params if compute else 0.0
    n_student = _params(student)  # QAT's self-distillation teacher and DPO's reference: the model itself
    specialist_tokens = plan.specialists.tokens() * len(plan.specialist_domains)

    def stage(name, fn, needs, settings, external=None, call: RecipeCall | None = None, teacher=0.0, times=1,
              trains=False):
        return Stage(name, partial(fn, plan), needs, jsonable(settings), external or {},
                     tokens=call.tokens() * times if call else None,
                     flops=training_flops(plan, call, student, teacher) * times if call else None, trains=trains)

    has_dpo = plan.instruct.dpo is not None and (plan.instruct.dpo_data or not plan.instruct.sft_data)
    final = "dpo" if has_dpo else "sft"
    corpus_external = {f"file {d}": p for d, p in (plan.corpus.files or {}).items()}
    stages = [
        stage("corpus", corpus_stage, (), {"corpus": plan.corpus}, corpus_external),
        stage("tokenize", tokenize_stage, ("corpus",), {"val_fraction": plan.corpus.val_fraction},
              {"tokenizer": plan.tokenizer}),
        Stage("mix", partial(mix_stage, plan), ("tokenize",),
              jsonable({"mix": plan.mix, "proxy": plan.mix.proxy.summary()}), tokens=plan.mix.proxy.tokens(),
              flops=training_flops(plan, plan.mix.proxy, plan.mix.proxy("SHARDS", tokenizer="TOKENIZER").student)),
        stage("phase1", phase1_stage, ("tokenize", "mix"), {"recipe": plan.phase1.summary(), "student": student},
              {"teacher": plan.teacher}, call=plan.phase1, teacher=teacher_n, trains=True),
    ]
    if plan.baseline is not None:
        stages.append(stage("phase1-baseline", baseline_stage, ("tokenize", "mix", "phase1"),
                            {"recipe": plan.phase1.summary(), "baseline": plan.baseline, "eval": plan.eval},
                            {"teacher": plan.teacher}, call=plan.phase1, teacher=teacher_n / 2,
                            times=2 * len(plan.baseline.seeds) - 1))
    stages += [
        stage("phase2", phase2_stage, ("tokenize", "phase1"), {"recipe": plan.phase2.summary()},
              {"teacher": plan.teacher}, call=plan.phase2, teacher=teacher_n, trains=True),
        Stage("specialists", partial(specialists_stage, plan), ("tokenize", "phase2"),
              jsonable({"recipe": plan.specialists.summary(), "domains": plan.specialist_domains}),
              tokens=specialist_tokens,
              flops=training_flops(plan, plan.specialists, student) * len(plan.specialist_domains), trains=True),
        stage("merge", merge_stage, ("tokenize", "specialists"), {"merge": plan.merge}),
        stage("qat", qat_stage, ("tokenize", "merge"), {"recipe": plan.qat.summary()}, call=plan.qat,
              teacher=n_student, trains=True),
        stage("sft", sft_stage, ("qat",), {"recipe": plan.instruct.sft.summary(), "qat": plan.qat.summary(),
                                           "data": {k: v for k, v in dataclasses.asdict(plan.instruct).items()
                                                    if k not in ("sft", "dpo")}},
              {k: v for k, v in (("sft data", plan.instruct.sft_data), ("sft val", plan.instruct.sft_val),
                                 ("dpo data", plan.instruct.dpo_data)) if v},
              call=plan.instruct.sft, trains=True),
    ]
    if has_dpo:
        stages.append(stage("dpo", dpo_stage, ("sft",), {"recipe": plan.instruct.dpo.summary(),
                                                         "qat": plan.qat.summary()},
                            call=plan.instruct.dpo, teacher=n_student, trains=True))
    stages += [
        stage("eval", partial(eval_stage, final_stage=final), ("tokenize", "phase1", "phase2", "merge", "qat", final),
              {"eval": plan.eval, "qat": plan.qat.summary()}),
        stage("export", partial(export_stage, final_stage=final), (final,), {"export": plan.export}),
    ]
    return stages


def _params(config: ModelConfig) -> int:
    from ..model import build_model

    return build_model(config, device="meta").num_parameters()


def dry_run_text(plan: Plan, stages: list[Stage]) -> str:
    """The plan: each stage, what it reads, its token budget and, for a plan stating its compute, FLOPs and
    accelerator-hours at the stated MFU."""
    lines = [f"pipeline {plan.name}: {len(stages)} stages; student {plan.student.name} "
             f"({_params(plan.student):,} parameters), teacher {plan.teacher}"]
    header = f"{'stage':<16} {'reads':<44} {'tokens':>18}"
    compute = plan.compute
    if compute:
        header += f" {'FLOPs':>10} {compute.device + '-hours':>12}"
    lines += [header, "-" * len(header)]
    total_tokens = total_flops = 0.0
    for s in stages:
        row = f"{s.name:<16} {', '.join(s.needs) or '-':<44} {'' if s.tokens is None else f'{s.tokens:,}':>18}"
        total_tokens += s.tokens or 0
        if compute:
            hours = (s.flops or 0) / (compute.peak_flops * compute.mfu) / 3600
            total_flops += s.flops or 0
            row += f" {'' if s.flops is None else f'{s.flops:.2e}':>10} {'' if s.flops is None else f'{hours:,.0f}':>12}"
        lines.append(row)
    total = f"{'total':<16} {'':<44} {f'{total_tokens:,.0f}':>18}"
    if compute:
        hours = total_flops / (compute.peak_flops * compute.mfu) / 3600
        total += f" {total_flops:.2e} {f'{hours:,.0f}':>12}"
        lines += [total, f"at {compute.mfu:.0%} MFU of {compute.peak_flops / 1e12:,.0f} TFLOP/s per {compute.device} "
                  f"(dense bf16); KD teacher forward counted at {compute.teacher_params / 1e9:.0f}B active parameters "
                  "(2N FLOPs per token); student 6N + attention per token (train.metrics.flops_per_token)"]
    else:
        lines.append(total)
    return "\n".join(lines)
