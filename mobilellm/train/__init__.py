"""Training: one loop for every stage, set up by one recipe runner; pluggable objectives, transforms, hooks.

    from recipes.qat import qat                          # a stage is a Recipe (recipes/ holds them as code)
    from mobilellm.train import run_recipe
    recipe = qat("smollm2-135m", "shards/", scheme="cpu", steps=100)   # init checkpoint, QATPrepare, self-KD
    result = run_recipe(recipe, "runs/qat", resume=True)               # torchrun: run_recipe(..., strategy="fsdp")

SFT and DPO are recipes too (recipes/sft.py, recipes/dpo.py): their `data` is a `ChatData` or `PreferenceData`
batch source instead of token shards, their objective CE / KD or `DPO`.
"""

from .checkpoint import latest_checkpoint
from .distributed import init_parallel
from .loop import NonFiniteLossError, TrainConfig, TrainResult, train
from .losses import CrossEntropy, Distillation
from .hooks import StepHook, StepState
from .objectives import CE, DPO, KD, Objective, SelfDistillation
from .optim import OptimConfig, Schedule
from .preference import PreferenceLoss
from .recipe import Recipe, run_recipe
from .teacher import TeacherError, frozen_copy, load_teacher

__all__ = ["CE", "CrossEntropy", "DPO", "Distillation", "KD", "NonFiniteLossError", "Objective", "OptimConfig",
           "PreferenceLoss", "Recipe", "Schedule", "SelfDistillation", "StepHook", "StepState", "TeacherError",
           "TrainConfig", "TrainResult", "frozen_copy", "init_parallel", "latest_checkpoint", "load_teacher",
           "run_recipe", "train"]
