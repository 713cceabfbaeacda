"""A pipeline plan: the recipe of recipes. Each stage's settings are typed values; the training stages hold a
`RecipeCall`, a recipe function of `recipes/` with its settings, called at run time with what the stages before
it produced (the shards, the mix, the checkpoint it starts from).

The plans themselves live in `recipes/pipeline.py` (starter, starter-kd, starter-experiment, pro-1b).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from dataclasses import dataclass, field
from typing import Callable

from ..config import ModelConfig


def jsonable(value):
    """Settings as JSON-ready data: configs by their dicts, functions by module:name, the rest as text."""
    def default(obj):
        if isinstance(obj, ModelConfig):
            return obj.to_dict()
        if dataclasses.is_dataclass(obj):
            return {"kind": type(obj).__name__, **dataclasses.asdict(obj)}
        if callable(obj):
            return f"{obj.__module__}:{obj.__qualname__}"
        return str(obj)
    return json.loads(json.dumps(value, default=default, sort_keys=True))


@dataclass(frozen=True)
class RecipeCall:
    """`fn(*run_time_inputs, **kwargs)` -> Recipe: a recipe function of `recipes/` and the stage's settings."""
    fn: Callable
    kwargs: dict = field(default_factory=dict)

    def __call__(self, *args, **run_time):
        return self.fn(*args, **{**self.kwargs, **run_time})

    def setting(self, name: str):
        """A setting's value: given, else the recipe function's default (None when it has none)."""
        if name in self.kwargs:
            return self.kwargs[name]
        param = inspect.signature(self.fn).parameters.get(name)
        return None if param is None or param.default is inspect.Parameter.empty else param.default

    def tokens(self) -> int:
        """Training tokens: steps x rows per step x tokens per row."""
        return int(self.setting("steps") * self.setting("batch_rows") * self.setting("seq_len"))

    def summary(self) -> dict:
        return jsonable({"recipe": self.fn, **self.kwargs})

    def replace(self, **kwargs) -> "RecipeCall":
        return RecipeCall(self.fn, {**self.kwargs, **kwargs})


@dataclass(frozen=True)
class CorpusSpec:
    """The documents: the starter corpus built from the package registries (`domains`, at most `max_chars`
    each), or local JSONL files by domain (`files`: {domain: path}, e.g. a test's)."""
    domains: tuple[str, ...] = ("prose", "code", "math")
    max_chars: int = 8_000_000
    files: dict[str, str] | None = None
    val_fraction: float = 0.01


@dataclass(frozen=True)
class MixSpec:
    """SDM: `proxy(shards, tokenizer=)` -> the proxy recipe; the target is the held-out split of `target_domains`."""
    proxy: RecipeCall
    target_domains: tuple[str, ...]
    checkpoints: int = 4
    probe_rows: int = 16


@dataclass(frozen=True)
class MergeSpec:
    """Merge-weight search on held-out data of the shards (grid of `step`), scored per domain."""
    step: float = 0.25
    seq_len: int = 128
    batch_size: int = 4
    val_batches: int = 4


@dataclass(frozen=True)
class InstructSpec:
    """SFT (then DPO where preference pairs exist), QAT-aware (the QAT scheme's fake quant kept on).

    Data: local JSONL files (`sft_data`, optional `sft_val`, `dpo_data`), or built from the BIG-bench `tasks`.
    """
    sft: RecipeCall
    dpo: RecipeCall | None = None
    sft_data: str | None = None
    sft_val: str | None = None
    dpo_data: str | None = None
    tasks: tuple[str, ...] = ()
    max_per_task: int = 100


@dataclass(frozen=True)
class EvalSpec:
    """Full precision vs PTQ vs QAT vs the final int4 model: held-out loss, multiple choice, needle, position loss."""
    tasks: tuple[str, ...] = ()
    limit: int | None = 50
    num_fewshot: int = 0
    data_dir: str | None = None  # local task files (standard tasks)
    seq_len: int = 128
    val_batches: int = 8
    needle_lengths: tuple[int, ...] = (128, 256)
    needle_depths: tuple[float, ...] = (0.0, 0.5, 1.0)
    needle_trials: int = 2
    position_length: int = 256
    position_buckets: int = 8


@dataclass(frozen=True)
class ExportSpec:
    prompt: str = "What is the capital of France?"
    max_new_tokens: int = 32
    pte: bool = True  # a .pte where ExecuTorch is installed


@dataclass(frozen=True)
class BaselineSpec:
    """The KD experiment: phase 1 with KD and with plain CE at the same budget, for each seed."""
    seeds: tuple[int, ...] = (0, 1)


@dataclass(frozen=True)
class Compute:
    """What a full-scale plan's compute is stated against."""
    peak_flops: float  # per accelerator, dense bf16
    mfu: float  # assumed model FLOPs utilisation
    teacher_params: float  # active parameters of the KD teacher (forward only, 2N per token)
    device: str


@dataclass(frozen=True)
class Plan:
    name: str
    tokenizer: str  # tokenizer folder or fetchable name: the student's, the shards', the teacher's
    teacher: str  # KD teacher of phases 1 and 2
    student: ModelConfig  # the model phase 1 trains from scratch, carried through every later stage
    corpus: CorpusSpec
    mix: MixSpec
    phase1: RecipeCall  # (shards, mix_file, tokenizer=, teacher=) -> Recipe
    phase2: RecipeCall  # recipes.phase2.phase2 (init, shards, teacher=, tokenizer=)
    specialists: RecipeCall  # recipes.specialists.specialist (init, shards, domain)
    specialist_domains: tuple[str, ...]
    merge: MergeSpec
    qat: RecipeCall  # recipes.qat.qat (checkpoint, shards)
    instruct: InstructSpec
    eval: EvalSpec
    export: ExportSpec = ExportSpec()
    baseline: BaselineSpec | None = None  # the experiment tier's KD-vs-CE arms
    compute: Compute | None = None  # full-scale plans state their compute in the dry run

    def replace(self, **changes) -> "Plan":
        return dataclasses.replace(self, **changes)
