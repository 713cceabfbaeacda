"""The one training loop: every stage (KD pretraining, positional distillation, specialists, QAT, SFT) runs here.

A stage differs only in what it passes: the batches, the loss object (CE, KD...), the model transforms
(e.g. QAT `prepare`), the schedule, its step hooks. Each step reads in order: lr, forward, backward, clip,
step, log. Stages are set up by `mobilellm.train.recipe.run_recipe`, not by calling this directly.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .checkpoint import latest_checkpoint, load_checkpoint, nothing_to_resume, save_checkpoint
from .distributed import SingleProcess
from .hooks import StepHook, StepState
from .losses import CrossEntropy, Loss
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


def validation_loss(model: nn.Module, val_batches: Sequence[dict], parallel: SingleProcess | None = None,
                    autocast: Callable = contextlib.nullcontext) -> float:
    """Mean next-token CE per target token over `val_batches` (all processes together), without gradients,
    in the model's current mode (the loop measures mid-training, fake quantizers included)."""
    return validation_losses(model, val_batches, parallel, autocast)["all"]


def validation_losses(model: nn.Module, val_batches: Sequence[dict] | dict[str, Sequence[dict]],
                      parallel: SingleProcess | None = None, autocast: Callable = contextlib.nullcontext) -> dict[str, float]:
    """{"all": CE per target token over every batch, and for batches given by domain ({domain: batches}) each
    domain's own}: a mean over all domains can fall while one of them rises."""
    parallel = parallel or SingleProcess(next(model.parameters()).device)
    by_domain = val_batches if isinstance(val_batches, dict) else {"all": val_batches}
    ce, sums = CrossEntropy(), {}
    with torch.no_grad(), autocast():
        for domain, batches in by_domain.items():
            total, tokens = torch.zeros((), device=parallel.device), torch.zeros((), device=parallel.device)
            for batch in batches:
                batch = {k: v.to(parallel.device) for k, v in batch.items()}
                total += ce(model, batch)
                tokens += ce.count(batch)
            sums[domain] = (parallel.all_reduce_sum(total), parallel.all_reduce_sum(tokens))
    losses = {domain: (total / tokens).item() for domain, (total, tokens) in sums.items()}
    if isinstance(val_batches, dict):
        losses["all"] = (sum(t for t, _ in sums.values()) / sum(n for _, n in sums.values())).item()
    return losses


def next_micro_batches(batches: Iterator[dict], config: TrainConfig, device: torch.device) -> list[dict]:
    """This process's share of one optimizer step: `grad_accum` micro-batches, on the device."""
    micro = [{k: v.to(device, non_blocking=True) for k, v in next(batches).items()} for _ in range(config.grad_accum)]
    if not config.document_masking:
        micro = [{k: v for k, v in b.items() if k != "doc_ids"} for b in micro]
    return micro


def accumulate_gradients(micro: list[dict], step_fn: Callable, loss: Loss, parallel: SingleProcess,
                         autocast: Callable) -> tuple[float, torch.Tensor]:
    """Forward and backward over the step's micro-batches; returns the step's mean loss and its count (tokens or
    pairs), all processes together.

    Each micro-batch's summed loss is divided by the whole step's count (tokens, or pairs: `loss.count`), so
    the gradient is the mean over the step however it is split into micro-batches and processes (which
    average their gradients, hence the factor world_size).
    """
    count = parallel.all_reduce_sum(sum(loss.count(b) for b in micro).float())
    loss_sum = torch.zeros((), device=parallel.device)
    for i, batch in enumerate(micro):
        with parallel.accumulating(sync=i == len(micro) - 1):
            with autocast():
                part = step_fn(batch)
            (part * parallel.world_size / count).backward()
        loss_sum += part.detach().float()
    return (parallel.all_reduce_sum(loss_sum) / count).item(), count


def loss_metrics(loss: Loss, count: torch.Tensor, parallel: SingleProcess) -> dict[str, float]:
    """The loss's own figures of the step (`Loss.take_metrics`), as means over the step's count."""
    return {name: (parallel.all_reduce_sum(value.detach().float()) / count).item()
            for name, value in sorted(loss.take_metrics().items())}


def train(model: nn.Module, batches: Iterator[dict], loss: Loss, config: TrainConfig, run_dir: str | Path, *,
          transforms: Sequence[Transform] = (), val_batches: Sequence[dict] | dict[str, Sequence[dict]] | None = None,
          parallel: SingleProcess | None = None, resume: bool = False, hooks: Sequence[StepHook] = (),
          extra_files: dict[str, str] | None = None) -> TrainResult:
    """Train `model` for `config.steps` optimizer steps, checkpointing into `run_dir`.

    `batches`: an iterator of dicts of int64 tensors tokens/targets (B, T), optional positions/doc_ids, with
    `state_dict()` / `load_state_dict()` for exact resume; `config.grad_accum` calls make this process's share
    of one optimizer step (a source with `world_size` / `grad_accum` attributes is checked against the run).
    `transforms` run on the model before anything else
    (before sharding, compile and the optimizer); one may return a new model. `hooks` run at fixed points of
    every step (`mobilellm.train.hooks`). `extra_files` (e.g. the tokenizer) are written into every checkpoint
    folder.
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
    elif resume and parallel.is_main:
        print(nothing_to_resume(run_dir), file=sys.stderr, flush=True)
    log = ProgressLog(run_dir, config.steps, model.config, config.peak_flops * parallel.world_size
                      if config.peak_flops else None, parallel.is_main, config.print_every, type(loss).__name__)
    log.start_at(start)
    losses, saved = [], None
    for step in range(start, config.steps):
        t0 = time.perf_counter()
        lr = config.schedule.lr_at(step)
        set_lr(optimizer, lr)
        state = StepState(step, config.steps, model, loss, optimizer, lr)
        for hook in hooks:
            hook.begin(state)
        micro = next_micro_batches(batches, config, parallel.device)
        step_loss, count = accumulate_gradients(micro, step_fn, loss, parallel, autocast)
        state.metrics = loss_metrics(loss, count, parallel)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm or math.inf)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # DTensor under FSDP
        skipped = not (math.isfinite(step_loss) and math.isfinite(grad_norm))
        state.loss, state.grad_norm, state.skipped = step_loss, grad_norm, skipped
        for hook in hooks:
            hook.after_backward(state)
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
        for hook in hooks:
            hook.end(state)
        losses.append(step_loss if not skipped else math.nan)

        if parallel.device.type == "cuda":
            torch.cuda.synchronize()
        tokens = sum(b["tokens"].numel() for b in micro) * parallel.world_size
        log.step(step, step_loss, lr, grad_norm, tokens, micro[0]["tokens"].shape[1], time.perf_counter() - t0, skipped,
                 state.metrics)
        done = step + 1
        if val_batches and config.eval_every and (done % config.eval_every == 0 or done == config.steps):
            log.validation(step, validation_losses(model, val_batches, parallel, autocast))
        if (config.save_every and done % config.save_every == 0) or done == config.steps:
            saved = save_checkpoint(run_dir, done, model, optimizer,
                                    {"step": done, "bad_steps": bad_steps, "data": parallel.gather_object(batches.state_dict())},
                                    parallel, config.keep_last, extra_files)
    log.close()
    return TrainResult(model, losses, config.steps, saved or latest_checkpoint(run_dir))
