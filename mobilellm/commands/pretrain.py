"""`mobilellm pretrain`: run a training recipe (KD or CE) with checkpoints, logs and resume."""

from __future__ import annotations

from pathlib import Path

from ..train.recipe import run_recipe


def pretrain(*, recipe: str = "starter", loss: str | None = None, steps: int | None = None,
             out: Path | None = None, resume: bool = False, teacher: Path | None = None,
             tokenizer: Path | None = None, data: Path | None = None, parallel: str | None = None,
             compile: bool | None = None) -> None:
    """Pretrain a student from a recipe: knowledge distillation from a teacher (kd) or plain next-token CE (ce).

    `starter` distills a 19M-parameter student from the real SmolLM2-135M on the starter corpus, on a CPU;
    `pro-1b` is MobileLLM-Pro's phase 1 (needs --teacher, --tokenizer and --data). Under torchrun, pass
    --parallel ddp or fsdp. Prints one line per step; metrics go to OUT/metrics.jsonl, checkpoints to
    OUT/checkpoints/step_N (loadable by every other command).

    Args:
        recipe: starter or pro-1b
        loss: kd or ce (default: the recipe's)
        steps: optimizer steps (default: the recipe's); the LR schedule is rescaled to it
        out: run folder for checkpoints, metrics.jsonl and loss.png (default: runs/RECIPE)
        resume: continue from the latest checkpoint in OUT
        teacher: teacher checkpoint folder (default: the recipe's)
        tokenizer: tokenizer folder of the student, shards and teacher (default: the recipe's)
        data: token-shard folder made by `mobilellm tokenize` (default: the recipe's)
        parallel: ddp or fsdp, when launched with torchrun on several processes
        compile: torch.compile each block (default: the recipe's)
    """
    from recipes import get_recipe  # the recipes package sits beside mobilellm

    chosen = get_recipe(recipe)
    changes = {key: value for key, value in {"loss": loss, "compile": compile}.items() if value is not None}
    changes.update({key: str(value) for key, value in
                    {"teacher": teacher, "tokenizer": tokenizer, "shards": data}.items() if value is not None})
    chosen = chosen.replace(**changes)
    if steps is not None:
        if steps <= 0:
            raise ValueError(f"--steps must be positive, got {steps}")
        chosen = chosen.with_steps(steps)
    result = run_recipe(chosen, out if out is not None else Path("runs") / recipe, resume=resume, strategy=parallel)
    print(f"checkpoint: {result.checkpoint}")
