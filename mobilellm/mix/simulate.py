"""Simulation-driven data mixing (MobileLLM-Pro's SDM, SPEC.md 2.4): one proxy run, then weights for the main run.

    proxy recipe --run_recipe--> K checkpoints --influence.alignments--> utilities per checkpoint
                 --weights.aggregate (later steps count more)--> --MixMapping--> mix.json (+ mix.png)

The proxy is a small model trained on a candidate mix (by default every domain alike) through the one loop;
its checkpoints are saved at K evenly spaced steps (steps/K, 2 steps/K, ..., steps). At each, every domain's
utility is the cosine of its gradient (a fresh block of its training rows) with the target's gradient (fixed
rows, `Target`). `mix.json` holds the weights, the per-checkpoint utilities, the proxy, the target, the data's
hash and the cost; `mobilellm pretrain --mix mix.json` and a recipe's `domain_weights="mix.json"` read it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..atomic import write_json_atomic
from ..data import DataError, TokenDataset
from ..data.mixture import DocLengths, normalize_weights
from ..loading import load
from ..tokenizer import Tokenizer
from ..train.checkpoint import CHECKPOINTS, STEP_DIR
from ..train.distributed import SingleProcess, init_parallel
from ..train.recipe import Recipe, run_recipe
from .influence import alignments
from .mixfile import FORMAT, MIX_FILE, read_mix
from .junk import JUNK_PREFIX, with_junk_domain
from .target import Target, domain_probes
from .weights import MixMapping, aggregate

MIX_PLOT = "mix.png"


@dataclass(frozen=True)
class MixConfig:
    """The simulation's own settings (the proxy's are its recipe's).

    Args:
        checkpoints: K, the proxy checkpoints where utilities are measured (at least 4, evenly spread)
        probe_rows: training rows per domain whose gradient is taken at each checkpoint
        micro_rows: rows per forward pass of a gradient
        junk: also mix in a junk domain: this domain's tokens shuffled within each document (tests the mixer)
    """
    checkpoints: int = 4
    probe_rows: int = 16
    micro_rows: int = 8
    junk: str | None = None
    mapping: MixMapping = field(default_factory=MixMapping)

    def check(self, steps: int) -> None:
        if self.checkpoints < 4:
            raise ValueError(f"the simulation needs at least 4 checkpoints, got {self.checkpoints}")
        if steps % self.checkpoints:
            raise ValueError(f"the proxy's {steps} steps do not split into {self.checkpoints} checkpoints: make the "
                             "steps a multiple of the checkpoint count")
        if self.probe_rows <= 0 or self.micro_rows <= 0:
            raise ValueError(f"probe_rows ({self.probe_rows}) and micro_rows ({self.micro_rows}) must be positive")


@dataclass(frozen=True)
class MixStage:
    """A recipe's SDM stage: the proxy run, what the mix is for, and the simulation's settings."""
    proxy: Recipe
    target: Target
    config: MixConfig = field(default_factory=MixConfig)


def data_hash(dataset: TokenDataset, domains: list[str]) -> str:
    """sha256 over the tokenizer identity and each domain's shard contents (their input digests)."""
    record = {"tokenizer": dataset.manifest["tokenizer"],
              "domains": {d: [s["input_digest"] for s in dataset.manifest["domains"][d]["shards"]]
                          + dataset.manifest["domains"][d]["sources"] for d in sorted(domains)}}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def natural_weights(dataset: TokenDataset, domains: list[str]) -> dict[str, float]:
    """Token-proportional weights: each domain's share of the training tokens."""
    tokens = {d: dataset.manifest["domains"][d]["train_tokens"] for d in domains}
    return {d: n / sum(tokens.values()) for d, n in tokens.items()}


def checkpoint_steps(run: Path) -> dict[int, Path]:
    folder = run / CHECKPOINTS
    found = {int(m.group(1)): p for p in folder.iterdir() if (m := STEP_DIR.match(p.name))} if folder.exists() else {}
    return dict(sorted(found.items()))


def candidate_mix(proxy: Recipe, dataset: TokenDataset, junk: str | None) -> dict[str, float]:
    """The proxy's mix: its recipe's weights (uniform when none), the junk domain at the mean weight."""
    given = read_mix(proxy.domain_weights) if isinstance(proxy.domain_weights, str) else proxy.domain_weights
    weights = normalize_weights(given or {d: 1.0 for d in dataset.domains
                                                         if d != JUNK_PREFIX + str(junk)}, dataset.domains)
    if junk:
        weights[JUNK_PREFIX + junk] = 1 / len(weights)
    return normalize_weights(weights, dataset.domains)


def simulate(proxy: Recipe, target: Target, out: str | Path, *, config: MixConfig = MixConfig(),
             parallel: SingleProcess | None = None, strategy: str | None = None, resume: bool = True,
             log: Callable[[str], None] = print) -> dict:
    """Run the proxy into OUT/proxy, measure utilities at its K checkpoints, write OUT/mix.json (+ mix.png).

    Returns mix.json's content. Under torchrun (`strategy` ddp or fsdp) the proxy trains data-parallel and every
    gradient is all-reduced: the weights are the one-process weights. `resume`: a finished proxy run is reused.
    """
    start = time.perf_counter()
    if proxy.data is not None or not proxy.shards:
        raise DataError(f"the mix simulation samples domains of token shards: recipe {proxy.name!r} names none")
    config.check(proxy.train.steps)
    parallel = parallel or init_parallel(strategy)
    if parallel.is_main and proxy.prepare is not None:
        proxy.prepare()  # builds the shards when missing
    parallel.barrier()
    out = Path(out)
    shards = Path(proxy.shards)
    if config.junk:
        derived = out / f"shards-with-{JUNK_PREFIX}{config.junk}"
        if parallel.is_main:
            with_junk_domain(shards, config.junk, derived, seed=proxy.seed)
        parallel.barrier()
        shards = derived
    dataset = TokenDataset(shards)
    mix = candidate_mix(proxy, dataset, config.junk)
    domains = list(mix)
    tokenizer_dir = proxy.tokenizer_folder()
    tokenizer = Tokenizer.load(tokenizer_dir) if tokenizer_dir is not None else None
    target_rows = target.parts(dataset, tokenizer, proxy.seq_len)  # bad targets fail before any training
    every = proxy.train.steps // config.checkpoints
    recipe = proxy.replace(shards=str(shards), domain_weights=mix).replace_train(save_every=every,
                                                                                   keep_last=config.checkpoints)
    run_recipe(recipe, out / "proxy", resume=resume, parallel=parallel)
    parallel.barrier()
    train_seconds = time.perf_counter() - start
    found = checkpoint_steps(out / "proxy")
    steps = [every * (k + 1) for k in range(config.checkpoints)]
    missing = [s for s in steps if s not in found]
    if missing:
        raise DataError(f"proxy run {out / 'proxy'} lacks the checkpoints of steps {missing} (it was run with other "
                        "settings?): remove it, or give another --out")

    probes = domain_probes(dataset, domains, proxy.seq_len, config.probe_rows, seed=proxy.seed + 1,
                           lengths=DocLengths(max_tokens=proxy.max_doc_tokens))
    measured = []
    for step in steps:
        model = load(found[step]).model.to(parallel.device)
        result = alignments(model, target_rows, next(probes), parallel, config.micro_rows)
        measured.append({"step": step, **result})
        log(f"mix: step {step}: " + "  ".join(f"{d} {u:+.3f}" for d, u in result["utilities"].items()))
    utilities = aggregate([m["utilities"] for m in measured], steps)
    weights = config.mapping.weights(utilities)
    seconds = time.perf_counter() - start
    train_tokens = proxy.train.steps * proxy.global_batch_rows * proxy.seq_len
    gradient_tokens = config.checkpoints * proxy.seq_len * (
        config.probe_rows * len(domains) + sum(len(rows["tokens"]) for rows in target_rows.values()))
    summary = {
        "format": FORMAT,
        "weights": weights,
        "utilities": utilities,
        "natural": natural_weights(dataset, domains),
        "uniform": {d: 1 / len(domains) for d in domains},
        "candidate": mix,
        "checkpoints": measured,
        "checkpoint_weighting": "proportional to step",
        "mapping": dataclasses.asdict(config.mapping),
        "simulation": {k: v for k, v in dataclasses.asdict(config).items() if k != "mapping"},
        "proxy": recipe.summary(),
        "proxy_parameters": sum(p.numel() for p in model.parameters()),
        "target": {**target.summary(), "parts": {name: int((rows["targets"] != -100).sum()) for name, rows
                                                 in target_rows.items()}},
        "data": {"shards": str(shards), "sha256": data_hash(dataset, domains)},
        "cost": {"train_tokens": train_tokens, "gradient_tokens": gradient_tokens,
                 "tokens": train_tokens + gradient_tokens, "seconds": seconds, "train_seconds": train_seconds,
                 "gradient_seconds": seconds - train_seconds, "processes": parallel.world_size},
    }
    if parallel.is_main:
        write_json_atomic(out / MIX_FILE, summary)
        from .plot import plot_mix
        plot_mix(summary, out / MIX_PLOT)
        log("mix: weights " + "  ".join(f"{d} {w:.3f}" for d, w in weights.items()) + f" -> {out / MIX_FILE}")
    return summary
