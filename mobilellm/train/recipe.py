"""A recipe: everything one training stage needs, as a typed value; `run_recipe` turns it into a `train` call.

Recipes themselves live in the top-level `recipes/` package as functions returning a `Recipe`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config import ModelConfig
from ..data import MixtureLoader, TokenDataset, validation_batches
from ..model import build_model
from ..tokenizer import Tokenizer, tokenizer_files
from .distributed import SingleProcess, init_parallel
from .loop import TrainConfig, TrainResult, train
from .losses import CrossEntropy, Distillation
from .optim import OptimConfig, Schedule
from .teacher import load_teacher

LOSSES = ("kd", "ce")


@dataclass(frozen=True)
class Recipe:
    name: str
    student: ModelConfig
    steps: int
    schedule: Schedule
    seq_len: int
    global_batch_rows: int  # sequences per optimizer step, all processes together
    micro_batch_rows: int  # sequences per forward pass on one process
    shards: str | None  # token-shard folder (`mobilellm tokenize`)
    tokenizer: str | None  # its tokenizer folder: checked against the shards and teacher, copied into checkpoints
    domain_weights: dict[str, float] | None = None  # None: every domain of the shards equally
    teacher: str | None = None
    loss: str = "kd"
    kd_temperature: float = 1.0
    ce_weight: float = 0.0
    optim: OptimConfig = field(default_factory=OptimConfig)
    clip_norm: float = 1.0
    seed: int = 0
    save_every: int = 0
    eval_every: int = 0
    val_batches: int = 4
    keep_last: int = 3
    print_every: int = 1
    compile: bool = False
    activation_checkpointing: bool = False
    peak_flops: float | None = None  # per process, FLOP/s
    prepare: Callable[[], None] | None = field(default=None, compare=False)  # builds the shards when missing

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)

    def with_steps(self, steps: int) -> "Recipe":
        """The same recipe over `steps` steps; warmup keeps its fraction of the run."""
        warmup = min(steps, round(self.schedule.warmup_steps * steps / self.schedule.total_steps))
        schedule = dataclasses.replace(self.schedule, total_steps=steps, warmup_steps=warmup)
        return self.replace(steps=steps, schedule=schedule)

    def validate(self, world_size: int) -> int:
        """Checks that need no data; returns the gradient-accumulation steps for `world_size` processes."""
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; expected one of {LOSSES}")
        if self.loss == "kd" and not self.teacher:
            raise ValueError(f"recipe {self.name!r} distills: give a teacher checkpoint folder (--teacher)")
        if not self.shards:
            raise ValueError(f"recipe {self.name!r} needs token shards (--data, made by `mobilellm tokenize`)")
        per_step = self.micro_batch_rows * world_size
        if self.global_batch_rows % per_step:
            raise ValueError(f"global batch of {self.global_batch_rows} rows does not split into micro-batches of "
                             f"{self.micro_batch_rows} rows on {world_size} processes")
        return self.global_batch_rows // per_step

    def summary(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "prepare"}
        data["student"] = self.student.to_dict()
        data["schedule"], data["optim"] = dataclasses.asdict(self.schedule), dataclasses.asdict(self.optim)
        return data


def run_recipe(recipe: Recipe, out: str | Path, *, resume: bool = False,
               parallel: SingleProcess | None = None, strategy: str | None = None) -> TrainResult:
    parallel = parallel or init_parallel(strategy)
    grad_accum = recipe.validate(parallel.world_size)
    if recipe.prepare is not None and parallel.is_main:
        recipe.prepare()
    parallel.barrier()
    dataset = TokenDataset(recipe.shards)
    dataset.check_model_vocab(recipe.student.vocab_size)
    if recipe.tokenizer:
        dataset.check_tokenizer(Tokenizer.load(recipe.tokenizer))
    weights = recipe.domain_weights or {name: 1.0 for name in dataset.domains}
    processes = dict(rank=parallel.rank, world_size=parallel.world_size)
    # One global stream: every step takes the next global batch, whatever the number of processes.
    loader = MixtureLoader(dataset, weights, seq_len=recipe.seq_len, global_batch_size=recipe.global_batch_rows,
                           grad_accum=grad_accum, seed=recipe.seed, **processes)
    val = list(validation_batches(dataset, seq_len=recipe.seq_len, batch_size=recipe.micro_batch_rows,
                                  max_batches=recipe.val_batches, **processes)) if recipe.eval_every else None
    on_gpu = parallel.device.type == "cuda"
    if recipe.loss == "kd":
        teacher = load_teacher(recipe.teacher, recipe.student, recipe.tokenizer,
                               dtype=torch.bfloat16 if on_gpu else torch.float32, device=parallel.device)
        loss = Distillation(teacher, temperature=recipe.kd_temperature, ce_weight=recipe.ce_weight)
    else:
        loss = CrossEntropy()
    config = TrainConfig(steps=recipe.steps, schedule=recipe.schedule, optim=recipe.optim, grad_accum=grad_accum,
                         clip_norm=recipe.clip_norm, compile=recipe.compile,
                         activation_checkpointing=recipe.activation_checkpointing, save_every=recipe.save_every,
                         keep_last=recipe.keep_last, eval_every=recipe.eval_every, print_every=recipe.print_every,
                         peak_flops=recipe.peak_flops)
    out = Path(out)
    if parallel.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.json").write_text(json.dumps(recipe.summary(), indent=2, default=str) + "\n")
    model = build_model(recipe.student, seed=recipe.seed)
    return train(model, loader, loss, config, out, val_batches=val, parallel=parallel, resume=resume,
                 extra_files=tokenizer_files(recipe.tokenizer))
