"""`mobilellm pipeline`: the whole MobileLLM-Pro recipe in one command, resumable stage by stage, with a report."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path


def pipeline(*, recipe: str = "starter", out: Path | None = None, from_: str | None = None, until: str | None = None,
             dry_run: bool = False, nproc_per_node: int = 1, teacher: str | None = None, tokenizer: str | None = None,
             corpus: list[str] | None = None, stage: str | None = None, parallel: str | None = None) -> None:
    """Run the whole recipe: corpus -> tokenize -> mix (SDM) -> phase1 (KD) -> phase2 (IPD) -> specialists -> merge
    -> qat (cpu scheme) -> sft -> dpo -> eval (full precision vs PTQ vs QAT vs final int4) -> export (int4, .pte
    where ExecuTorch is installed), then OUT/report.md and OUT/report.html.

    Each stage runs in OUT/STAGE.partial and is renamed to OUT/STAGE with its stage.json (inputs and outputs with
    content hashes, its recipe, time, tokens, metrics) when finished. Run it again and finished stages whose inputs
    are unchanged are skipped, a killed stage resumes from its last checkpoint, and a stage whose recipe changed
    runs again with the stages after it. The recipes are `recipes/pipeline.py`: starter (the default, minutes on a
    CPU), starter-kd (the starter with its phase 1 by KD and by CE side by side, two seeds), starter-experiment
    (larger, the same KD-vs-CE arms), pro-1b (MobileLLM-Pro's budgets; --dry-run states its compute).

    Args:
        recipe: starter, starter-kd, starter-experiment or pro-1b (recipes/pipeline.py), or package.module:function, a
            function of your own code returning a mobilellm.pipeline.Plan
        out: the run folder (default: runs/RECIPE)
        from_: run again from this stage on (the stages before it must be finished)
        until: stop after this stage
        dry_run: print the plan, each stage's token budget and (pro-1b) its FLOPs and GPU-hours; run nothing
        nproc_per_node: run each training stage under torchrun with this many processes (DDP)
        teacher: the KD teacher checkpoint (default: the recipe's)
        tokenizer: the tokenizer folder of student, teacher and shards (default: the recipe's)
        corpus: DOMAIN=PATH JSONL files to train on instead of the recipe's corpus
        stage: run this one stage only (what each torchrun process is given)
        parallel: ddp or fsdp, for a stage run under torchrun
    """
    from recipes.pipeline import get_plan

    from ..pipeline import CorpusSpec, build_stages, dry_run_text, run_pipeline, write_report

    plan = get_plan(recipe)
    changes = {k: v for k, v in {"teacher": teacher, "tokenizer": tokenizer}.items() if v}
    if corpus:
        files = dict(item.partition("=")[::2] for item in corpus)
        if any(not path for path in files.values()):
            raise ValueError(f"--corpus takes DOMAIN=PATH items, got {corpus}")
        changes["corpus"] = dataclasses.replace(plan.corpus, files=files)
    plan = plan.replace(**changes)
    stages = build_stages(plan)
    if dry_run:
        print(dry_run_text(plan, stages))
        return
    out = Path(out) if out is not None else Path("runs") / recipe
    relaunch = [a for a in sys.argv[1:] if a != "pipeline"] if nproc_per_node > 1 else None
    if relaunch is not None:  # the torchrun processes run one stage each, without another launch
        relaunch = [a for i, a in enumerate(relaunch) if a != "--nproc-per-node"
                    and (i == 0 or relaunch[i - 1] != "--nproc-per-node")]
    records = run_pipeline(stages, out, from_=from_, until=until, only=stage, nproc_per_node=nproc_per_node,
                           relaunch=relaunch, strategy=parallel)
    if stage is not None:
        return
    report = write_report(plan, out, [s.name for s in stages if s.name in records])
    print(f"report: {report} and {report.with_suffix('.html')}")
    if "export" in records:
        m = records["export"].data["metrics"]
        answer = m["answer"] if m["answer"].strip() else f"(no text: {m['answer']!r}, {m['new_tokens']} tokens)"
        print(f"final int4 model {records['export'].path('int4')} ({m['size_bytes'] / 1e6:.1f} MB, "
              f"{m['decode_tokens_per_s'] or 0:.1f} tok/s decode)\n> {m['prompt']}\n{answer}")
