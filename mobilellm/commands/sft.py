"""`mobilellm sft`, `mobilellm dpo` and `mobilellm sft-data`: instruction tuning through the one training loop."""

from __future__ import annotations

from pathlib import Path



def _run(recipe, out: Path, resume: bool, parallel: str | None, micro_batch: int | None) -> None:
    from ..train.recipe import run_recipe

    result = run_recipe(recipe, out, resume=resume, strategy=parallel, micro_batch=micro_batch)
    losses = [loss for loss in result.losses if loss == loss]
    summary = f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} steps" if losses else "no new steps"
    print(f"{recipe.name}: {summary}; checkpoint: {result.checkpoint}")


def sft(checkpoint: str, *, data: Path, out: Path, val: Path | None = None, steps: int = 200, batch_size: int = 8,
        seq_len: int = 512, lr: float = 2e-5, teacher: Path | None = None, ce_weight: float = 0.0,
        temperature: float = 1.0, packing: bool = True, overflow: str = "truncate", seed: int = 0,
        save_every: int = 0, eval_every: int = 0, resume: bool = False, parallel: str | None = None,
        micro_batch: int | None = None) -> None:
    """Supervised fine-tuning on chat data: the loss on the assistant's tokens only, conversations packed.

    The `sft` recipe (recipes/sft.py) run through the one training loop. DATA is JSONL, one conversation a line:
    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]} (every assistant turn learned) or
    {"prompt": ..., "completion": ...} (the completion learned), rendered with the checkpoint's own chat template.
    Conversations are packed into rows of SEQ_LEN tokens with document masks (they never attend to each other);
    longer ones are truncated or dropped, and the counts printed and written to OUT/data.json. The trained model
    is OUT/checkpoints/step_N, loadable by every other command.

    Args:
        checkpoint: the checkpoint to fine-tune (a folder with its tokenizer, or smollm2-135m)
        data: conversations JSONL (messages or prompt/completion)
        out: run folder (checkpoints, metrics.jsonl, recipe.json, data.json)
        val: held-out conversations JSONL for the validation loss (with --eval-every)
        steps: optimizer steps
        batch_size: rows of packed conversations per optimizer step (all processes together)
        seq_len: tokens per row
        lr: peak learning rate (3 percent warmup, cosine decay to a tenth, no weight decay)
        teacher: distill from this teacher on the assistant tokens (KD) instead of plain CE
        ce_weight: with --teacher, the weight of CE against the data (the rest is KL to the teacher)
        temperature: with --teacher, the distillation temperature
        packing: pack several conversations per row; --no-packing pads one per row
        overflow: a conversation longer than a row: truncate or drop
        seed: data-order seed
        save_every: a resumable checkpoint every N steps (0: only at the end)
        eval_every: validation loss on --val every N steps (0: never)
        resume: continue the run in OUT from its latest checkpoint
        parallel: ddp or fsdp, when launched with torchrun on several processes
        micro_batch: rows per forward pass on one process (default: all of the process's rows)
    """
    from recipes.sft import sft as sft_recipe

    if eval_every and val is None:
        raise ValueError("--eval-every measures the validation loss on held-out conversations: give --val")
    recipe = sft_recipe(checkpoint, str(data), val=str(val) if val else None, steps=steps, batch_rows=batch_size,
                        seq_len=seq_len, lr=lr, teacher=str(teacher) if teacher else None, ce_weight=ce_weight,
                        temperature=temperature, packing=packing, overflow=overflow, seed=seed,
                        save_every=save_every, eval_every=eval_every)
    _run(recipe, out, resume, parallel, micro_batch)


def dpo(checkpoint: str, *, data: Path, out: Path, loss: str = "sigmoid", beta: float = 0.1,
        label_smoothing: float = 0.0, reference: Path | None = None, precompute_reference: bool = False,
        steps: int = 100, batch_size: int = 8, seq_len: int = 1024, lr: float = 5e-6, packing: bool = True,
        overflow: str = "truncate", seed: int = 0, save_every: int = 0, resume: bool = False,
        parallel: str | None = None, micro_batch: int | None = None) -> None:
    """Preference optimisation (DPO, IPO or hinge) on prompt/chosen/rejected pairs against a frozen reference.

    The `dpo` recipe (recipes/dpo.py) run through the one training loop. DATA is JSONL, one pair a line:
    {"prompt": ..., "chosen": ..., "rejected": ...}, each a string or a list of messages, rendered with the
    checkpoint's chat template. Both sequences of a pair go into one row, and rows hold as many pairs as fit
    (document masks keep them apart); the loss is the mean per pair of each step. Every step logs the implicit
    rewards, their margin and the preference accuracy (reward_accuracy) to OUT/metrics.jsonl and the progress line.

    Args:
        checkpoint: the checkpoint to train (usually an SFT model), also the reference unless --reference is given
        data: preference pairs JSONL (prompt/chosen/rejected)
        out: run folder (checkpoints, metrics.jsonl, recipe.json, data.json)
        loss: sigmoid (DPO), ipo or hinge
        beta: the strength of the KL constraint to the reference
        label_smoothing: sigmoid only: the assumed fraction of wrong preferences (conservative DPO)
        reference: the frozen reference checkpoint (default: CHECKPOINT's starting weights)
        precompute_reference: compute the reference log-probs once before training and cache them in OUT
            (reference_logps/), keeping no reference model in memory during training
        steps: optimizer steps
        batch_size: rows of packed pairs per optimizer step (all processes together)
        seq_len: tokens per row (a pair takes the tokens of both its sequences)
        lr: peak learning rate (10 percent warmup, linear decay, no weight decay)
        packing: pack several pairs per row; --no-packing pads one pair per row
        overflow: a pair longer than a row: truncate (the longer side first) or drop
        seed: data-order seed
        save_every: a resumable checkpoint every N steps (0: only at the end)
        resume: continue the run in OUT from its latest checkpoint
        parallel: ddp or fsdp, when launched with torchrun on several processes
        micro_batch: rows per forward pass on one process (default: all of the process's rows)
    """
    from recipes.dpo import dpo as dpo_recipe

    recipe = dpo_recipe(checkpoint, str(data), loss=loss, beta=beta, label_smoothing=label_smoothing,
                        reference=str(reference) if reference else None, precompute_reference=precompute_reference,
                        steps=steps, batch_rows=batch_size, seq_len=seq_len, lr=lr, packing=packing,
                        overflow=overflow, seed=seed, save_every=save_every)
    _run(recipe, out, resume, parallel, micro_batch)


def sft_data(*, out: Path, tasks: list[str] | None = None, max_per_task: int = 500, val_fraction: float = 0.05,
             seed: int = 0) -> None:
    """Build instruction (SFT) and preference (DPO) JSONL from BIG-bench tasks, fetched once from PyPI.

    Writes OUT/sft.jsonl and OUT/sft_val.jsonl (prompt/completion: the task's input, a multiple-choice item's
    choices listed, and the correct answer), OUT/dpo.jsonl (prompt/chosen/rejected from multiple-choice items:
    the correct choice against a wrong one), OUT/dpo_val.jsonl (the pairs of the held-out items) and
    OUT/manifest.json (items per task). The BIG-bench tasks that
    `mobilellm eval` scores are never used. The first run downloads the BIG-bench sdist (358 MB) once.

    Args:
        out: folder for the JSONL files
        tasks: BIG-bench task names (default: 29 generative and multiple-choice tasks, none used for evaluation)
        max_per_task: at most this many examples per task (a seeded sample)
        val_fraction: the fraction of items held out (in sft_val.jsonl and dpo_val.jsonl)
        seed: sampling seed
    """
    from ..data.instructions import DEFAULT_TASKS, write_instructions

    data = write_instructions(out, list(tasks or DEFAULT_TASKS), max_per_task=max_per_task,
                              val_fraction=val_fraction, seed=seed)
    print(f"{len(data.train):,} instructions ({len(data.val):,} held out) and {len(data.pairs):,} preference pairs "
          f"({len(data.val_pairs):,} held out) from {len(data.counts)} BIG-bench tasks in {out}")
