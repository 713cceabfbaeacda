"""`mobilellm mix`: simulation-driven data mixing: one proxy run's gradient alignments become domain weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..mix import MixMapping, Target
from ..mix.simulate import simulate


def mix(*, recipe: str = "starter", data: Path | None = None, tokenizer: Path | None = None,
        target_domains: list[str] | None = None, target_file: list[Path] | None = None,
        target_bigbench: list[str] | None = None, target_rows: int | None = None, steps: int | None = None,
        checkpoints: int | None = None, probe_rows: int | None = None, junk: str | None = None,
        mapping: MixMapping = MixMapping(), out: Path = Path("runs/mix"), parallel: str | None = None,
        resume: bool = True) -> None:
    """Find a data mix for RECIPE: a small proxy trains on the uniform mix, and at K checkpoints each domain's
    gradient is compared with the target's (first-order influence, later checkpoints weighted by step).

    Writes OUT/mix.json (weights, per-checkpoint utilities, proxy, target, data hash, cost in tokens and
    seconds) and OUT/mix.png; `mobilellm pretrain --mix OUT/mix.json` trains on the weights. The target is the
    recipe's unless --target-domains / --target-file / --target-bigbench name one. Under torchrun pass
    --parallel ddp or fsdp: gradients are reduced across processes, the weights are the one-process weights.

    Args:
        recipe: whose data-mixing stage to run: starter or pro-1b
        data: token-shard folder (`mobilellm tokenize`; default: the recipe's)
        tokenizer: tokenizer folder of the shards (default: the recipe's)
        target_domains: held-out split of these domains of the shards as the target
        target_file: text or JSONL files as the target
        target_bigbench: BIG-bench tasks, rendered as text, as the target
        target_rows: at most this many sequences per target part (default: the recipe's)
        steps: proxy steps, a multiple of the checkpoint count (default: the recipe's)
        checkpoints: K, proxy checkpoints where utilities are measured, at least 4 (default: the recipe's)
        probe_rows: training rows per domain and checkpoint whose gradient is taken (default: the recipe's)
        junk: add a junk domain, this domain's tokens shuffled within each document (the mixer should rank it last)
        mapping: how utilities become weights
        out: output folder (the proxy run goes to OUT/proxy)
        parallel: ddp or fsdp, when launched with torchrun on several processes
        resume: reuse a finished proxy run in OUT/proxy
    """
    from recipes import get_sdm_stage  # the recipes package sits beside mobilellm

    stage = get_sdm_stage(recipe)
    proxy = stage.proxy.replace(**{k: str(v) for k, v in {"shards": data, "tokenizer": tokenizer}.items() if v})
    if data is not None:
        proxy = proxy.replace(prepare=None)
    if steps is not None:
        proxy = proxy.with_steps(steps)
    target = stage.target
    if target_domains or target_file or target_bigbench:
        target = Target(tuple(target_domains or ()), tuple(map(str, target_file or ())), tuple(target_bigbench or ()),
                        rows=target.rows)
    if target_rows is not None:
        target = dataclasses.replace(target, rows=target_rows)
    changes = {k: v for k, v in {"checkpoints": checkpoints, "probe_rows": probe_rows, "junk": junk}.items()
               if v is not None}
    config = dataclasses.replace(stage.config, mapping=mapping, **changes)
    simulate(proxy, target, out, config=config, strategy=parallel, resume=resume)
