"""The pipeline: the whole MobileLLM-Pro recipe as a recipe of recipes (`mobilellm pipeline --recipe NAME`).

- `starter` (the default): every stage on a 2-core CPU within 20 minutes from a fresh clone: the starter
  corpus, SmolLM2-135M-Instruct teaching the 19M `starter-student` (its tokenizer). Phase 1 is its largest
  stage (80 steps of 8 x 128 tokens, 82k tokens, LR 1e-3): a smaller batch at a higher LR (4 rows, 2e-3) chased
  each batch's domain and its held-out CE rose. Long documents are cut into row-sized pieces drawn in shuffled
  order (a whole play otherwise filled ~60 consecutive rows): held-out CE at step 80 5.88 with the pieces vs 7.10
  without, the same run otherwise (unigram: 7.27). The student starts subcloned from the teacher (its layers,
  heads, neurons and residual dimensions that carry the most weight): 7.33 vs 7.58 from a random start, without
  the pieces (one seed each). It proves the chain end to end; a 19M model on 82k tokens is not yet a language model.
- `starter-kd`: the starter plus the KD-vs-CE arms of its phase 1 (two seeds, the starter's 82k tokens per arm,
  subcloned from the teacher): the KD experiment at the starter's scale (`--until phase1-baseline`).
- `starter-experiment`: the starter at a larger budget plus the KD-vs-CE experiment of phase 1 (SPEC.md 2.1:
  49.31 -> 53.74 average in the paper), both arms at the same tokens for two seeds, scored on held-out loss
  and BIG-bench multiple choice, paired on the same items. Phase 1 is 1,000 steps of 8 x 256 tokens (2M tokens)
  per arm: about 8-10 hours on 2 CPU cores.
- `pro-1b`: MobileLLM-Pro's budgets (SPEC.md 2): phase 1 1.34T tokens, phase 2 19.7B, 3 specialists x 500
  steps, QAT ~80B tokens (5% of the budget); `--dry-run` states its compute. Needs the user's teacher,
  tokenizer and corpus (`--corpus-files`, `--teacher`, `--tokenizer` of the pipeline command).
"""

from __future__ import annotations

from mobilellm.config import ModelConfig
from mobilellm.pipeline.plan import (BaselineSpec, Compute, CorpusSpec, EvalSpec, ExportSpec, InstructSpec, MergeSpec,
                                     MixSpec, Plan, RecipeCall)
from mobilellm.train.loop import TrainConfig
from mobilellm.train.objectives import CE, KD
from mobilellm.train.optim import OptimConfig, Schedule
from mobilellm.train.recipe import Recipe

import sys

from . import pro_1b as _  # noqa: F401 (the module, for its constants below)
from .dpo import dpo
from .phase2 import phase2
from .qat import qat
from .sdm import starter_proxy
from .sft import sft
from .specialists import specialist

pro = sys.modules[__package__ + ".pro_1b"]  # the package's `pro_1b` is the recipe function
LOSSES = {"kd": KD, "ce": CE}


def phase1(shards: str, mix: str, *, tokenizer: str, teacher: str, student: ModelConfig, steps: int = 60,
           batch_rows: int = 4, seq_len: int = 128, lr: float = 2e-3, loss: str = "kd", save_every: int = 20,
           eval_every: int = 20, micro_batch_rows: int | None = None, seed: int = 0, inherit: bool = False) -> Recipe:
    """Phase 1 from scratch on the SDM mix: KD from `teacher` (or CE), cosine LR to a tenth after 10% warmup.
    The student's context is recorded at the phase-1 length, which phase 2 extends. `inherit`: the fresh
    student is subcloned from the teacher (`mobilellm.train.subclone`) instead of drawn at random."""
    return Recipe(
        name=f"phase1-{loss}",
        student=student.replace(max_seq_len=seq_len),
        train=TrainConfig(steps=steps, schedule=Schedule(peak_lr=lr, total_steps=steps, warmup_steps=max(1, steps // 10),
                                                         decay="cosine", final_lr=lr / 10),
                          save_every=save_every, eval_every=eval_every, print_every=10),
        seq_len=seq_len,
        global_batch_rows=batch_rows,
        micro_batch_rows=micro_batch_rows,
        shards=shards,
        tokenizer=tokenizer,
        domain_weights=mix,
        max_doc_tokens=seq_len + 1,  # a row's worth: every row of a batch from a document of its own
        objective=KD(teacher=teacher) if loss == "kd" else CE(),
        seed=seed,
        inherit=teacher if inherit else None,
    )


def pro_1b_phase1(shards: str, mix: str, *, tokenizer: str, teacher: str, student: ModelConfig,
                  steps: int = pro.STEPS, batch_rows: int = 512, seq_len: int = pro.PHASE1_SEQ_LEN,
                  seed: int = 0) -> Recipe:
    """`recipes.pro_1b.pro_1b` on the pipeline's shards, mix, tokenizer and teacher."""
    recipe = pro.pro_1b().replace(shards=shards, tokenizer=tokenizer, domain_weights=mix, student=student,
                                  objective=KD(teacher=teacher, temperature=1.0, ce_weight=0.0), seed=seed,
                                  global_batch_rows=batch_rows, seq_len=seq_len)
    return recipe if steps == pro.STEPS else recipe.with_steps(steps)


def pro_1b_proxy(shards: str, *, tokenizer: str, steps: int = pro.PROXY_STEPS, batch_rows: int = 256,
                 seq_len: int = 2048) -> Recipe:
    recipe = pro.pro_1b_proxy().replace(shards=shards, tokenizer=tokenizer, global_batch_rows=batch_rows, seq_len=seq_len)
    return recipe if steps == pro.PROXY_STEPS else recipe.with_steps(steps)


def pro_1b_phase2(init: str, shards: str, *, teacher: str, tokenizer: str, steps: int = pro.PHASE2_STEPS,
                  batch_rows: int = pro.PHASE2_ROWS, seq_len: int = pro.PHASE2_SEQ_LEN) -> Recipe:
    recipe = pro.pro_1b_phase2(init, teacher, shards, tokenizer).replace(global_batch_rows=batch_rows, seq_len=seq_len)
    return recipe if steps == pro.PHASE2_STEPS else recipe.with_steps(steps)


def proxy(shards: str, *, tokenizer: str, steps: int = 40, batch_rows: int = 4, seq_len: int = 128,
          lr: float = 3e-3, seed: int = 0, model: ModelConfig | None = None) -> Recipe:
    """The starter's SDM proxy (`recipes.sdm.starter_proxy`) on the pipeline's shards and tokenizer."""
    extra = {"proxy": model} if model is not None else {}
    return starter_proxy(shards, steps=steps, rows=batch_rows, seq_len=seq_len, lr=lr, seed=seed, tokenizer=tokenizer,
                         **extra).replace(prepare=None)


SFT_TASKS = ("arithmetic", "causal_judgment", "general_knowledge", "navigate", "object_counting",
             "sports_understanding", "word_sorting")
EVAL_TASKS = ("bigbench_winowhy", "bigbench_elementary_math_qa")


def starter() -> Plan:
    """Every stage of the recipe within 20 minutes on 2 CPU cores; phase 1 trains for real (its held-out CE falls)."""
    return Plan(
        name="starter",
        tokenizer="smollm2-135m",
        teacher="smollm2-135m",
        student=ModelConfig.from_name("starter-student"),
        corpus=CorpusSpec(domains=("prose", "code", "math"), max_chars=2_000_000, val_fraction=0.02),
        mix=MixSpec(RecipeCall(proxy, {"steps": 40, "batch_rows": 4, "seq_len": 128}), target_domains=("math",),
                    checkpoints=4, probe_rows=8),
        phase1=RecipeCall(phase1, {"steps": 80, "batch_rows": 8, "seq_len": 128, "lr": 1e-3, "save_every": 20,
                                   "eval_every": 20, "inherit": True}),
        phase2=RecipeCall(phase2, {"seq_len": 512, "rope_theta": 400_000.0, "short_doc_tokens": 128, "steps": 16,
                                   "batch_rows": 2, "lr": 4e-4, "save_every": 8, "top_k": 32}),
        specialists=RecipeCall(specialist, {"steps": 10, "lr": 1e-4, "batch_rows": 4, "seq_len": 128, "save_every": 5}),
        specialist_domains=("prose", "code", "math"),
        merge=MergeSpec(step=0.25, seq_len=128, batch_size=4, val_batches=3),
        qat=RecipeCall(qat, {"scheme": "cpu", "steps": 16, "batch_rows": 4, "seq_len": 128, "lr": 1e-4,
                             "save_every": 8}),
        instruct=InstructSpec(sft=RecipeCall(sft, {"steps": 40, "batch_rows": 4, "seq_len": 256, "lr": 6e-4,
                                                   "save_every": 20}),
                              dpo=RecipeCall(dpo, {"steps": 8, "batch_rows": 2, "seq_len": 512, "lr": 5e-5,
                                                   "precompute_reference": True, "save_every": 4}),
                              tasks=SFT_TASKS, max_per_task=60),
        eval=EvalSpec(tasks=EVAL_TASKS, limit=40, seq_len=128, val_batches=8, needle_lengths=(128, 256),
                      needle_depths=(0.0, 0.5, 1.0), needle_trials=2, position_length=512, position_buckets=8),
        export=ExportSpec(prompt="What is the capital of France?", max_new_tokens=32),
    )


def starter_experiment() -> Plan:
    """The starter at a larger budget with the KD-vs-CE arms of phase 1 (two seeds): 8-10 hours on 2 CPU cores."""
    plan = starter()
    return plan.replace(
        name="starter-experiment",
        corpus=CorpusSpec(domains=("prose", "code", "math"), max_chars=8_000_000, val_fraction=0.01),
        mix=MixSpec(plan.mix.proxy.replace(steps=200), target_domains=("math",), checkpoints=4, probe_rows=16),
        phase1=plan.phase1.replace(steps=1000, batch_rows=8, seq_len=256, save_every=100, eval_every=100,
                                   inherit=False),  # from scratch, as the paper trains
        phase2=plan.phase2.replace(short_doc_tokens=256, seq_len=1024, steps=200, batch_rows=4, save_every=50),
        specialists=plan.specialists.replace(steps=100, seq_len=256, save_every=50),
        qat=plan.qat.replace(steps=200, seq_len=256, save_every=50),
        instruct=InstructSpec(sft=plan.instruct.sft.replace(steps=200, batch_rows=8, save_every=50),
                              dpo=plan.instruct.dpo.replace(steps=50, save_every=25), tasks=SFT_TASKS,
                              max_per_task=300),
        eval=EvalSpec(tasks=EVAL_TASKS + ("bigbench_strategyqa", "bigbench_social_iqa"), limit=300, seq_len=256,
                      val_batches=32, needle_lengths=(256, 512, 1024), needle_trials=3, position_length=1024),
        baseline=BaselineSpec(seeds=(0, 1)),
    )


def starter_kd() -> Plan:
    """The starter plus the KD-vs-CE arms of its phase 1 (two seeds, the starter's budget): four phase-1 runs the
    size of the starter's up to the baseline (`--until phase1-baseline`), every arm subcloned from the teacher as
    the starter is. The whole plan took 16.1 min on 2 cores (benchmarks/results/pipeline_starter_kd)."""
    return starter().replace(name="starter-kd", baseline=BaselineSpec(seeds=(0, 1)))


def pro_1b_plan() -> Plan:
    """MobileLLM-Pro's budgets (SPEC.md 2); the corpus, tokenizer and teacher are the user's."""
    h100 = Compute(peak_flops=pro.H100_BF16_PEAK, mfu=0.40, teacher_params=17e9, device="H100")
    qat_steps = 80_000_000_000 // (512 * pro.PHASE1_SEQ_LEN)  # ~80B tokens, 5% of the budget (SPEC.md 2.5)
    return Plan(
        name="pro-1b",
        tokenizer="TOKENIZER_DIR",  # the Llama 4 tokenizer (--tokenizer)
        teacher="TEACHER_DIR",  # Llama 4-Scout or another long-context teacher (--teacher)
        student=ModelConfig.from_name("pro-1b"),
        corpus=CorpusSpec(domains=pro.SDM_SOURCES, max_chars=0, val_fraction=0.001),
        mix=MixSpec(RecipeCall(pro_1b_proxy), target_domains=("fineweb-edu",), checkpoints=8, probe_rows=64),
        phase1=RecipeCall(pro_1b_phase1),
        phase2=RecipeCall(pro_1b_phase2),
        specialists=RecipeCall(specialist, {"steps": 500, "lr": 1e-5, "batch_rows": 512, "seq_len": pro.PHASE1_SEQ_LEN,
                                            "save_every": 100}),
        specialist_domains=("fineweb-edu", "starcoder", "openwebmath"),
        merge=MergeSpec(step=0.1, seq_len=pro.PHASE1_SEQ_LEN, batch_size=8, val_batches=32),
        qat=RecipeCall(qat, {"scheme": "cpu", "steps": qat_steps, "batch_rows": 512, "seq_len": pro.PHASE1_SEQ_LEN,
                             "lr": 2e-5, "save_every": 1000}),
        instruct=InstructSpec(sft=RecipeCall(sft, {"steps": 20_000, "batch_rows": 128, "seq_len": 4096, "lr": 2e-5,
                                                   "save_every": 1000}),
                              dpo=RecipeCall(dpo, {"steps": 2_000, "batch_rows": 64, "seq_len": 4096, "lr": 5e-7,
                                                   "precompute_reference": True, "save_every": 500}),
                              tasks=SFT_TASKS, max_per_task=100_000),
        eval=EvalSpec(tasks=("bigbench_social_iqa", "bigbench_winowhy", "bigbench_strategyqa",
                             "bigbench_elementary_math_qa"), limit=None, seq_len=pro.PHASE1_SEQ_LEN, val_batches=256,
                      needle_lengths=(4096, 16384, 65536, 131072), needle_trials=5, position_length=131072,
                      position_buckets=16),
        compute=h100,
    )


PLANS = {"starter": starter, "starter-kd": starter_kd, "starter-experiment": starter_experiment, "pro-1b": pro_1b_plan}


def get_plan(name: str) -> Plan:
    """A plan of PLANS by name, or `package.module:function` (a function of the user's code returning a Plan)."""
    if ":" in name:
        import importlib

        module, _, function = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"pipeline recipe {name!r}: cannot import {function} from {module} ({err})") from None
        plan = fn()
        if not isinstance(plan, Plan):
            raise ValueError(f"pipeline recipe {name!r} returned {type(plan).__name__}, not a Plan")
        return plan
    if name not in PLANS:
        raise ValueError(f"unknown pipeline recipe {name!r}; known: {', '.join(PLANS)}, or package.module:function")
    return PLANS[name]()
