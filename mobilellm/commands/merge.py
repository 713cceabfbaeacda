"""`mobilellm specialize`, `mobilellm merge` and `mobilellm merge-search`: MobileLLM-Pro's phase 3."""

from __future__ import annotations

from pathlib import Path

from ..atomic import write_json_atomic
from ..merge import MergeError, MergeMethod, merge_checkpoints
from ..schema import Schema


_FIX_RECIPE = "restore it, or remove that run folder"
RECIPE_FILE = Schema({"name": (str,), "init": (str, type(None))}, fix=_FIX_RECIPE)


def specialize(checkpoint: str, *, data: Path, domains: list[str], out: Path, steps: int = 500, lr: float = 1e-5,
               batch_size: int = 4, seq_len: int = 256, teacher: Path | None = None, seed: int = 0,
               resume: bool = False, parallel: str | None = None) -> None:
    """Anneal one specialist per domain from a checkpoint (LR decaying linearly to 0), one after another.

    Each specialist is the `specialist` recipe (recipes/specialists.py) run through the one training loop into
    OUT/DOMAIN (its recipe.json names the parent checkpoint); OUT/specialists.json lists the parent and each
    specialist's final checkpoint, ready for `mobilellm merge`. Run domains as separate processes (or torchrun
    jobs) by calling this once per domain with the same OUT.

    Args:
        checkpoint: the late checkpoint every specialist starts from (a folder or smollm2-135m)
        data: token-shard folder (mobilellm tokenize) holding the domains
        domains: one specialist per domain
        out: folder for the specialists' runs
        steps: optimizer steps per specialist (the paper: about 500)
        lr: peak learning rate, decaying linearly to 0 (the paper: 1e-5)
        batch_size: sequences per optimizer step
        seq_len: tokens per sequence
        teacher: distill from this teacher instead of plain CE
        seed: data-order seed
        resume: continue each specialist's run from its latest checkpoint
        parallel: ddp or fsdp, when launched with torchrun on several processes
    """
    from recipes.specialists import specialist

    from ..artifacts import resolve_checkpoint
    from ..train.recipe import run_recipe

    parent = str(resolve_checkpoint(checkpoint))
    out = Path(out)
    for domain in domains:
        known = specialists_of(out)
        if known and known["parent"] != parent:
            raise ValueError(f"{out} holds specialists of {known['parent']}, not of {parent}: use another --out")
        recipe = specialist(parent, str(data), domain, steps=steps, lr=lr, batch_rows=batch_size, seq_len=seq_len,
                            teacher=str(teacher) if teacher else None, seed=seed)
        result = run_recipe(recipe, out / domain, resume=resume, strategy=parallel)
        write_json_atomic(out / "specialists.json", specialists_of(out))
        print(f"specialist {domain}: {result.checkpoint}")


def specialists_of(out: Path) -> dict | None:
    """{parent, specialists: {domain: final checkpoint}} read from the runs in `out` (each run's recipe.json
    names its parent), so processes training specialists into the same folder at once never lose one."""
    from ..schema import read_json_object
    from ..train.checkpoint import latest_checkpoint

    found, parents = {}, set()
    for recipe_file in sorted(out.glob("*/recipe.json")):
        recipe = RECIPE_FILE.check(read_json_object(recipe_file, fix=_FIX_RECIPE), recipe_file)
        final = latest_checkpoint(recipe_file.parent)
        if not recipe.get("name", "").startswith("specialist-") or final is None:
            continue
        parents.add(recipe["init"])
        found[recipe_file.parent.name] = str(final)
    if len(parents) > 1:
        raise ValueError(f"{out} holds specialists of several parents: {sorted(parents)}")
    return {"parent": parents.pop(), "specialists": found} if found else None


def merge(models: list[str] | None = None, *, out: Path, weights: list[float] | None = None,
          method: str = "linear", base: str | None = None, density: float = 1.0, lam: float = 1.0,
          config: Path | None = None) -> None:
    """Merge checkpoints tensor by tensor (streamed: memory stays near one tensor per input, not the model).

    linear: sum_b w_b theta_b (weights sum to 1; MobileLLM-Pro's merge); task_arithmetic: base + sum_b w_b
    (theta_b - base); ties: trimmed, sign-elected task vectors as mergekit runs them. Writes a normal
    checkpoint with merge.json (sources with weight-file hashes, method, weights).

    Args:
        models: checkpoint folders to merge (or give --config)
        out: the merged checkpoint folder (written atomically)
        weights: one weight per model (default: equal, summing to 1)
        method: linear, task_arithmetic or ties
        base: the base checkpoint of task_arithmetic and ties
        density: ties: fraction of each task vector kept, by magnitude
        lam: ties: scale of the merged task vector
        config: a mergekit YAML config (merge_method, base_model, models with parameters.weight)
    """
    if config is not None:
        if models:
            raise MergeError("give either models or --config, not both")
        from ..merge.mergekit_config import read_mergekit_config

        plan = read_mergekit_config(config)
        chosen, models, weights, base = plan.method, plan.models, plan.weights, plan.base
    else:
        if not models:
            raise MergeError("no models to merge: list checkpoint folders, or give --config")
        chosen = MergeMethod(method, density=density, lam=lam)
        weights = weights or [1.0 / len(models)] * len(models)
    merge_checkpoints(models, weights, chosen, out, base=base)
    print(f"merged {len(models)} checkpoints ({chosen.name}, weights {[round(w, 4) for w in weights]}) -> {out}")


def merge_search(models: list[str], *, data: Path, out: Path, domains: list[str] | None = None,
                 strategy: str = "grid", step: float = 0.1, budget: int = 60, method: str = "linear",
                 base: str | None = None, seq_len: int = 256, batch_size: int = 4, val_batches: int = 8,
                 seed: int = 0) -> None:
    """Search merge weights on held-out data, then write the best merge.

    Each candidate is merged in memory (every input is held once: for models that fit) and scored by its mean
    next-token loss over the target domains on one half of their held-out documents; the best weights and the
    uniform merge are then reported on the other half. Writes the merged checkpoint OUT (merge.json holds the
    search), OUT.search.json with every trial and OUT.search.png.

    Args:
        models: checkpoint folders (e.g. the specialists of mobilellm specialize)
        data: token-shard folder with held-out documents of the target domains
        out: the merged checkpoint folder
        domains: target domains (default: every domain of the shards)
        strategy: grid (every simplex point of --step; few models) or cma (CMA-ES, --budget evaluations)
        step: grid spacing of the weights (1/step an integer)
        budget: CMA-ES evaluations
        method: linear or task_arithmetic (weights on the simplex either way)
        base: the base checkpoint of task_arithmetic
        seq_len: tokens per held-out sequence
        batch_size: sequences per held-out batch
        val_batches: held-out batches per domain and half
        seed: CMA-ES seed
    """
    from ..hf import model_from_tensors
    from ..merge import load_states, merge_states, search_weights
    from ..merge.checkpoints import resolve
    from ..merge.plot import plot_search
    from ..merge.target import DomainTarget

    chosen = MergeMethod(method)
    folders, base_folder = resolve(models, base, chosen, [1.0 / len(models)] * len(models))
    config, states = load_states(folders + ([base_folder] if base_folder else []))
    base_state = states.pop() if base_folder else None
    targets = {part: DomainTarget.from_shards(str(data), domains, part, seq_len=seq_len, batch_size=batch_size,
                                              max_batches=val_batches) for part in ("search", "report")}

    def losses(weights, part):
        return targets[part].losses(model_from_tensors(config, merge_states(states, weights, chosen, base_state)))

    def show(weights, score):
        print(f"weights {[round(w, 3) for w in weights]}: search loss {score:.4f}", flush=True)

    result = search_weights(lambda w: losses(w, "search")["mean"], len(folders), strategy=strategy, step=step,
                            budget=budget, seed=seed, on_trial=show)
    best, best_score = result.best
    uniform = [1.0 / len(folders)] * len(folders)
    report = {"best": {"weights": best, "search_loss": best_score, "report_losses": losses(best, "report")},
              "uniform": {"weights": uniform, "report_losses": losses(uniform, "report")},
              "models": [str(f) for f in folders], "strategy": strategy, "method": method,
              "target": {"shards": str(data), "domains": list(targets["search"].batches)}}
    record = {"search": {k: report[k] for k in ("best", "uniform", "strategy", "target")}}
    merge_checkpoints(folders, best, chosen, out, base=base_folder, record=record)
    out = Path(out)
    write_json_atomic(out.with_name(out.name + ".search.json"), {**report, **result.to_dict()})
    plot_search(result, [f.parent.parent.name if f.parent.name == "checkpoints" else f.name for f in folders],
                out.with_name(out.name + ".search.png"))
    print(f"best weights {[round(w, 3) for w in best]}: report loss {report['best']['report_losses']['mean']:.4f} "
          f"(uniform {report['uniform']['report_losses']['mean']:.4f}) -> {out}")
