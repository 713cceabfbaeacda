"""The one training loop: every stage (KD pretraining, positional distillation, specialists, QAT, SFT) runs here.

A stage differs only in what it passes: the batches, the loss object (CE, KD...), the model transforms
(e.g. QAT `prepare`), the schedule. Each step reads in order: lr, forward, backward, clip, step, log.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .distributed import SingleProcess
from .losses import IGNORE_INDEX, CrossEntropy, Loss
from .metrics import ProgressLog
from .optim import OptimConfig, Schedule, build_optimizer, set_lr

Transform = Callable[[nn.Module], "nn.Module | None"]


class NonFiniteLossError(RuntimeError):
    """Too many steps in a row had a NaN/inf loss or gradient."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    schedule: Schedule
    optim: OptimConfig = field(default_factory=OptimConfig)
    grad_accum: int = 1  # micro-batches per optimizer step
    clip_norm: float | None = 1.0
    bf16: bool | None = None  # autocast to bf16; None = on when training on a GPU
    compile: bool = False  # torch.compile each block (state-dict names unchanged)
    activation_checkpointing: bool = False  # recompute each block in the backward
    document_masking: bool = True  # attend within documents when batches carry doc_ids
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    save_every: int = 0  # 0: only at the end
    keep_last: int = 3
    eval_every: int = 0
    print_every: int = 1
    peak_flops: float | None = None  # hardware peak FLOP/s per process, for MFU

    def __post_init__(self):
        if self.steps <= 0 or self.grad_accum <= 0:
            raise ValueError(f"steps ({self.steps}) and grad_accum ({self.grad_accum}) must be positive")


@dataclass
class TrainResult:
    model: nn.Module
    losses: list[float]  # per optimizer step run in this call (nan for skipped steps)
    step: int  # optimizer steps completed in total
    checkpoint: Path | None


def checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing per block: keep block inputs, recompute the insides in the backward."""
    for block in model.layers:
        inner = block.forward
        block.forward = lambda *args, _inner=inner: checkpoint(_inner, *args, use_reentrant=False)


def check_batch_layout(batches, grad_accum: int, parallel) -> None:
    """A global-batch source that names its `world_size` and `grad_accum` must be cut for this run: otherwise
    the processes would take the wrong rows of each global batch, or a step would span two of them."""
    for name, want in (("world_size", parallel.world_size), ("grad_accum", grad_accum)):
        have = getattr(batches, name, want)
        if have != want:
            raise ValueError(f"the batch source is laid out for {name}={have} but this run has {name}={want}: "
                             "build it with the run's number of processes and gradient accumulation")


def load_data_state(batches, states: list, parallel) -> None:
    """Each process takes its own saved stream position; under another process count, the first one's
    (global streams, like MixtureLoader's, save the same state on every process)."""
    batches.load_state_dict(states[parallel.rank] if len(states) == parallel.world_size else states[0])


def count_targets(batches: Sequence[dict]) -> torch.Tensor:
    return sum((b["targets"] != IGNORE_INDEX).sum() for b in batches)


def evaluate(model: nn.Module, val_batches: Sequence[dict], parallel, autocast) -> float:
    """Mean next-token CE over the validation batches (all processes together)."""
    ce, total, tokens = CrossEntropy(), torch.zeros((), device=parallel.device), torch.zeros((), device=parallel.device)
    with torch.no_grad(), autocast():
        for batch in val_batches:
            batch = {k: v.to(parallel.device) for k, v in batch.items()}
            total += ce(model, batch)
            tokens += count_targets([batch])
    return (parallel.all_reduce_sum(total) / parallel.all_reduce_sum(tokens)).item()


def train(model: nn.Module, batches: Iterator[dict], loss: Loss, config: TrainConfig, run_dir: str | Path, *,
          transforms: Sequence[Transform] = (), val_batches: Sequence[dict] | None = None,
          parallel: SingleProcess | None = None, resume: bool = False,
          extra_files: dict[str, str] | None = None) -> TrainResult:
    """Train `model` for `config.steps` optimizer steps, checkpointing into `run_dir`.

    `batches`: an iterator of dicts of int64 tensors tokens/targets (B, T), optional positions/doc_ids, with
    `state_dict()` / `load_state_dict()` for exact resume; `config.grad_accum` calls make this process's share
    of one optimizer step (a source with `world_size` / `grad_accum` attributes is checked against the run).
    `transforms` run on the model before anything else
    (before sharding, compile and the optimizer); one may return a new model. `extra_files` (e.g. the
    tokenizer) are written into every checkpoint folder.
    """
    parallel = parallel or SingleProcess(next(model.parameters()).device)
    check_batch_layout(batches, config.grad_accum, parallel)
    for transform in transforms:
        model = transform(model) or model
    model.to(parallel.device).train()
    if config.compile:
        for block in model.layers:
            block.compile()
    if config.activation_checkpointing:
        checkpoint_blocks(model)
    step_fn = parallel.prepare(model, loss)
    optimizer = build_optimizer(model, config.optim, config.schedule.lr_at(0))
    bf16 = config.bf16 if config.bf16 is not None else parallel.device.type == "cuda"
    autocast = (lambda: torch.autocast(parallel.device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    run_dir, start, bad_steps = Path(run_dir), 0, 0
    if resume and (found := latest_checkpoint(run_dir)) is not None:
        state = load_checkpoint(found, model, optimizer, parallel)
        start, bad_steps = state["step"], state["bad_steps"]
        load_data_state(batches, state["data"], parallel)
    log = ProgressLog(run_dir, config.steps, model.config, config.peak_flops * parallel.world_size
                      if config.peak_flops else None, parallel.is_main, config.print_every, type(loss).__name__)
    log.start_at(start)
    losses, saved = [], None
    for step in range(start, config.steps):
        t0 = time.perf_counter()
        lr = config.schedule.lr_at(step)
        set_lr(optimizer, lr)
        micro = [{k: v.to(parallel.device, non_blocking=True) for k, v in next(batches).items()}
                 for _ in range(config.grad_accum)]
        if not config.document_masking:
            micro = [{k: v for k, v in b.items() if k != "doc_ids"} for b in micro]
        n_targets = parallel.all_reduce_sum(count_targets(micro).float())
        # Each micro-batch's summed loss over the step's token count: the gradient is the token mean of the
        # whole step, however it is split into micro-batches and processes (which average their gradients).
        loss_sum = torch.zeros((), device=parallel.device)
        for i, batch in enumerate(micro):
            with parallel.accumulating(sync=i == len(micro) - 1):
                with autocast():
                    part = step_fn(batch)
                (part * parallel.world_size / n_targets).backward()
            loss_sum += part.detach().float()
        step_loss = (parallel.all_reduce_sum(loss_sum) / n_targets).item()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm or math.inf)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # DTensor under FSDP
        skipped = not (math.isfinite(step_loss) and math.isfinite(grad_norm))
        if skipped:
            bad_steps += 1
            warnings.warn(f"step {step + 1}: non-finite loss {step_loss} / grad norm {grad_norm}; step skipped "
                          f"({bad_steps} in a row)")
            if bad_steps >= config.max_bad_steps:
                raise NonFiniteLossError(f"{bad_steps} non-finite steps in a row (last at step {step + 1}); "
                                         "lower the LR, check the data, or resume from an earlier checkpoint")
        else:
            optimizer.step()
            bad_steps = 0
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss if not skipped else math.nan)

        if parallel.device.type == "cuda":
            torch.cuda.synchronize()
        tokens = sum(b["tokens"].numel() for b in micro) * parallel.world_size
        log.step(step, step_loss, lr, grad_norm, tokens, micro[0]["tokens"].shape[1], time.perf_counter() - t0, skipped)
        done = step + 1
        if val_batches and config.eval_every and (done % config.eval_every == 0 or done == config.steps):
            log.validation(step, evaluate(model, val_batches, parallel, autocast))
        if (config.save_every and done % config.save_every == 0) or done == config.steps:
            saved = save_checkpoint(run_dir, done, model, optimizer,
                                    {"step": done, "bad_steps": bad_steps, "data": parallel.gather_object(batches.state_dict())},
                                    parallel, config.keep_last, extra_files)
    log.close()
    return TrainResult(model, losses, config.steps, saved or latest_checkpoint(run_dir))
