"""A recipe: everything one training stage needs, as a typed value; `run_recipe` is the one way to set it up.

Every stage (KD pretraining, positional distillation, specialists, QAT, SFT) is a `Recipe`: where the
weights start (a fresh `student` or an `init` checkpoint, with optional config changes), the model
transforms (e.g. QAT `prepare`), the objective (a loss factory), the data (token shards and domain weights by
default, or any `BatchSource`: chat data for SFT, preference pairs for DPO) and the loop's own `TrainConfig`.
Recipes themselves live in the top-level `recipes/` package as functions returning a `Recipe`.

The global batch is the truth: `global_batch_rows` sequences per optimizer step whatever the number of
processes; each process takes its share in micro-batches of at most `micro_batch_rows` rows (a memory
cap), with gradient accumulation making up the rest.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..artifacts import resolve_checkpoint
from ..config import ModelConfig
from ..atomic import write_json_atomic
from ..data.batch_source import BatchLayout, BatchSource, TokenShards
from ..loading import load
from ..model import build_model
from ..tokenizer import TOKENIZER_FILE, Tokenizer, tokenizer_files
from .distributed import SingleProcess, init_parallel
from .hooks import StepHook
from .loop import TrainConfig, TrainResult, Transform, train
from .objectives import CE, Objective, StageContext
from .subclone import subclone_into


DATA_REPORT = "data.json"  # beside recipe.json: what reading the data found (truncated, dropped examples)


@dataclass(frozen=True)
class Recipe:
    name: str
    train: TrainConfig  # steps, schedule, optimizer, clipping, cadence; grad_accum follows from the batch split
    seq_len: int
    global_batch_rows: int  # sequences per optimizer step, all processes together
    shards: str | None = None  # token-shard folder (`mobilellm tokenize`), the default batch source
    objective: Objective = CE()
    student: ModelConfig | None = None  # the architecture of a run from scratch (seeded with `seed`)
    init: str | None = None  # or the checkpoint the weights start from: folder, fetchable name or .gguf
    inherit: str | None = None  # a bigger checkpoint (same tokenizer) the fresh student is subcloned from
    config_changes: dict = field(default_factory=dict)  # applied to init's config, e.g. {"rope_theta": 5e5}
    transforms: tuple[Transform, ...] = ()  # applied before training, e.g. quant.qat.QATPrepare
    tokenizer: str | None = None  # checked against the shards and teacher, copied into checkpoints (default: init's)
    domain_weights: dict[str, float] | str | None = None  # None: every domain equally; a str: a mix.json (`mobilellm mix`)
    # cut token-shard documents longer than this into pieces drawn apart (in shuffled order): a 60-row play
    # then no longer fills the consecutive batches of a short run, which chases one document's domain
    max_doc_tokens: int | None = None
    micro_batch_rows: int | None = None  # most sequences per forward pass on one process; None: no cap
    seed: int = 0
    val_batches: int = 4
    prepare: Callable[[], None] | None = field(default=None, compare=False)  # builds the shards when missing
    data: BatchSource | None = None  # batches from elsewhere than token shards (chat data, preference pairs)

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)

    def replace_train(self, **changes) -> "Recipe":
        return self.replace(train=dataclasses.replace(self.train, **changes))

    def with_steps(self, steps: int) -> "Recipe":
        """The same recipe over `steps` steps; warmup keeps its fraction of the run."""
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")
        schedule = self.train.schedule
        warmup = min(steps, round(schedule.warmup_steps * steps / schedule.total_steps))
        return self.replace_train(steps=steps, schedule=dataclasses.replace(schedule, total_steps=steps,
                                                                              warmup_steps=warmup))

    def batch_split(self, world_size: int, micro_batch: int | None = None) -> tuple[int, int]:
        """(rows per forward pass on one process, micro-batches per step) for `world_size` processes.

        `micro_batch` asks for an exact micro-batch; otherwise the largest that divides a process's rows
        within the recipe's `micro_batch_rows` cap.
        """
        rows = self.global_batch_rows
        if rows <= 0 or rows % world_size:
            raise ValueError(f"global batch of {rows} rows does not split over {world_size} processes: make it a "
                             f"multiple of the process count")
        per_process = rows // world_size
        if micro_batch is not None:
            if micro_batch <= 0 or per_process % micro_batch:
                raise ValueError(f"global batch of {rows} rows on {world_size} processes ({per_process} each) does "
                                 f"not split into micro-batches of {micro_batch} rows")
            return micro_batch, per_process // micro_batch
        cap = min(self.micro_batch_rows or per_process, per_process)
        micro = max(d for d in range(1, cap + 1) if per_process % d == 0)
        return micro, per_process // micro

    def validate(self, world_size: int, micro_batch: int | None = None) -> int:
        """Checks that need no data or weights; returns the gradient-accumulation steps."""
        if (self.student is None) == (self.init is None):
            raise ValueError(f"recipe {self.name!r} needs exactly one of a student config (from scratch) "
                             "and an init checkpoint")
        if self.inherit is not None and self.student is None:
            raise ValueError(f"recipe {self.name!r}: inherit subclones a fresh student; it has an init checkpoint")
        if self.config_changes and self.init is None:
            raise ValueError(f"recipe {self.name!r}: config_changes apply to an init checkpoint; change the student")
        self.objective.check(self.name)
        if self.data is not None and (self.shards or self.domain_weights or self.max_doc_tokens):
            raise ValueError(f"recipe {self.name!r} names both token shards and another batch source: give one")
        source = self.batch_source()
        source.check(self)
        if source.kind != self.objective.batch_kind:
            raise ValueError(f"recipe {self.name!r}: its objective {type(self.objective).__name__} reads "
                             f"{self.objective.batch_kind} but its data ({type(source).__name__}) gives {source.kind}")
        return self.batch_split(world_size, micro_batch)[1]

    def batch_source(self) -> BatchSource:
        return (self.data if self.data is not None
                else TokenShards(self.shards, self.domain_weights, max_doc_tokens=self.max_doc_tokens))

    def tokenizer_folder(self) -> Path | None:
        """The run's tokenizer: the recipe's, else the init checkpoint's own when it has one."""
        if self.tokenizer:
            return Path(self.tokenizer)
        if self.init and (Path(self.init) / TOKENIZER_FILE).exists():
            return Path(self.init)
        return None

    def summary(self) -> dict:
        """The recipe as JSON-ready data (recipe.json beside the run); paths and the like as strings."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("prepare",)}
        data["data"] = self.data.summary() if self.data is not None else None
        data["student"] = self.student.to_dict() if self.student else None
        data["train"] = dataclasses.asdict(self.train)
        data["objective"] = {"kind": type(self.objective).__name__, **dataclasses.asdict(self.objective)}
        data["transforms"] = [{"kind": type(t).__name__, **(dataclasses.asdict(t) if dataclasses.is_dataclass(t) else {})}
                              for t in self.transforms]
        return json.loads(json.dumps(data, default=str))


def start_model(recipe: Recipe):
    """The starting weights: a seeded fresh student (subcloned from `inherit` when named), or the init checkpoint
    (full precision, config changes applied)."""
    if recipe.init is None:
        model = build_model(recipe.student, seed=recipe.seed)
        if recipe.inherit is not None:
            parent = load(recipe.inherit)
            if parent.quant is not None:
                raise ValueError(f"recipe {recipe.name!r} inherits from {parent.source}, a quantized checkpoint: "
                                 "subclone from full-precision weights")
            subclone_into(model, parent.model)
        return model
    loaded = load(recipe.init, config_changes=recipe.config_changes)
    if loaded.quant is not None:
        raise ValueError(f"recipe {recipe.name!r} starts from {loaded.source}, a quantized checkpoint: training "
                         "starts from full-precision weights (QAT: start from the float model, the recipe prepares it)")
    return loaded.model


def run_recipe(recipe: Recipe, out: str | Path, *, resume: bool = False, parallel: SingleProcess | None = None,
               strategy: str | None = None, micro_batch: int | None = None,
               hooks: tuple[StepHook, ...] = ()) -> TrainResult:
    """Set up the stage `recipe` describes and train it into `out` (checkpoints, metrics.jsonl, recipe.json).

    `strategy` (ddp or fsdp) under torchrun; `micro_batch`: exact rows per forward pass (default: the
    recipe's cap); `hooks`: step hooks added to the loop (`mobilellm.train.hooks`).
    """
    parallel = parallel or init_parallel(strategy)
    micro_rows, grad_accum = recipe.batch_split(parallel.world_size, micro_batch)
    recipe.validate(parallel.world_size, micro_batch)
    if parallel.is_main:
        if recipe.prepare is not None:
            recipe.prepare()
        for start in (recipe.init, recipe.inherit):
            if start is not None:
                resolve_checkpoint(start)  # a fetchable name is fetched once, by one process
    parallel.barrier()
    if recipe.init is not None:
        recipe = recipe.replace(init=str(resolve_checkpoint(recipe.init)))
    if recipe.inherit is not None:
        recipe = recipe.replace(inherit=str(resolve_checkpoint(recipe.inherit)))
    model = start_model(recipe)
    if recipe.seq_len > model.config.max_seq_len:
        raise ValueError(f"recipe {recipe.name!r} trains on {recipe.seq_len:,}-token windows, past the model's "
                         f"{model.config.max_seq_len:,}-token context: raise max_seq_len (config_changes; phase 2 "
                         "extends it with mobilellm.train.context.context_extension)")
    tokenizer = recipe.tokenizer_folder()
    # One global stream: every step takes the next global batch, whatever the number of processes.
    layout = BatchLayout(recipe.seq_len, recipe.global_batch_rows, grad_accum, micro_rows, parallel.rank,
                         parallel.world_size, recipe.seed)
    batches = recipe.batch_source().build(layout, Tokenizer.load(tokenizer) if tokenizer is not None else None,
                                          model.config.vocab_size, recipe.val_batches if recipe.train.eval_every else None)
    out = Path(out)
    if parallel.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "recipe.json", recipe.summary())
        if batches.report:
            write_json_atomic(out / DATA_REPORT, batches.report)
            print("data: " + ", ".join(f"{key} {value:,}" if isinstance(value, int) else f"{key} {value}"
                                       for key, value in batches.report.items()), flush=True)
    loss = recipe.objective(StageContext(model, tokenizer, parallel.device, batches.train, out, parallel,
                                         recipe.seq_len))
    return train(model, batches.train, loss, dataclasses.replace(recipe.train, grad_accum=grad_accum), out,
                 transforms=recipe.transforms, val_batches=batches.validation, parallel=parallel, resume=resume,
                 hooks=hooks, extra_files=tokenizer_files(tokenizer))
