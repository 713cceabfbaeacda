"""`mobilellm pretrain`: run a training recipe (KD or CE) with checkpoints, logs and resume."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..train.objectives import CE, KD
from ..train.recipe import run_recipe


def objective_name(objective) -> str:
    return {CE: "ce", KD: "kd"}.get(type(objective), type(objective).__name__.lower())


def pretrain(*, recipe: str = "starter", loss: str | None = None, steps: int | None = None,
             out: Path | None = None, resume: bool = False, teacher: Path | None = None,
             tokenizer: Path | None = None, data: Path | None = None, parallel: str | None = None,
             micro_batch: int | None = None, compile: bool | None = None, mix: Path | None = None) -> None:
    """Pretrain a student from a recipe: knowledge distillation from a teacher (kd) or plain next-token CE (ce).

    `starter` distills a 19M-parameter student from the real SmolLM2-135M on the starter corpus, on a CPU;
    `pro-1b` is MobileLLM-Pro's phase 1 (needs --teacher, --tokenizer and --data). Under torchrun, pass
    --parallel ddp or fsdp: the recipe's global batch stays the same, split over the processes. Prints one
    line per step; metrics go to OUT/metrics.jsonl, checkpoints to OUT/checkpoints/step_N (loadable by every
    other command); `mobilellm plot OUT` draws the loss curves into OUT/loss.png.

    Args:
        recipe: starter or pro-1b
        loss: kd or ce (default: the recipe's)
        steps: optimizer steps (default: the recipe's); the LR schedule is rescaled to it
        out: run folder for checkpoints and metrics.jsonl (default: runs/RECIPE-LOSS, e.g. runs/starter-kd, runs/starter-ce)
        resume: continue from the latest checkpoint in OUT
        teacher: teacher checkpoint folder (default: the recipe's)
        tokenizer: tokenizer folder of the student, shards and teacher (default: the recipe's)
        data: token-shard folder made by `mobilellm tokenize` (default: the recipe's)
        parallel: ddp or fsdp, when launched with torchrun on several processes
        micro_batch: rows per forward pass on one process (default: as many as the recipe's cap allows)
        compile: torch.compile each block (default: the recipe's)
        mix: a mix.json made by `mobilellm mix`: train on its domain weights instead of the recipe's
    """
    from recipes import get_recipe  # the recipes package sits beside mobilellm

    chosen = get_recipe(recipe)
    if loss not in (None, "kd", "ce"):
        raise ValueError(f"unknown loss {loss!r}; expected kd or ce")
    if loss == "ce":
        chosen = chosen.replace(objective=CE())
    elif loss == "kd" and not isinstance(chosen.objective, KD):
        chosen = chosen.replace(objective=KD(teacher=None))
    if teacher is not None:
        if not isinstance(chosen.objective, KD):
            raise ValueError("--teacher is for distillation: drop it, or use --loss kd")
        chosen = chosen.replace(objective=dataclasses.replace(chosen.objective, teacher=str(teacher)))
    changes = {key: str(value) for key, value in {"tokenizer": tokenizer, "shards": data, "domain_weights": mix}.items()
               if value is not None}
    chosen = chosen.replace(**changes)
    if compile is not None:
        chosen = chosen.replace_train(compile=compile)
    if steps is not None:
        chosen = chosen.with_steps(steps)
    # Named by recipe and loss: a CE run never lands in the KD run's folder (nor in the pipeline's runs/RECIPE).
    default_out = Path("runs") / f"{recipe}-{objective_name(chosen.objective)}"
    result = run_recipe(chosen, out if out is not None else default_out, resume=resume, strategy=parallel,
                        micro_batch=micro_batch)
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint}")
