"""Training: one loop for every stage, pluggable losses (CE, KD) and model transforms (e.g. QAT prepare).

    from mobilellm.train import TrainConfig, Schedule, Distillation, frozen_copy, train
    teacher = frozen_copy(model)                       # self-distillation teacher, full precision
    train(model, batches, Distillation(teacher), TrainConfig(steps=1000, schedule=Schedule(1e-5, 1000)),
          "runs/qat", transforms=[lambda m: prepare(m, qconfig)])
"""

from .checkpoint import latest_checkpoint
from .distributed import init_parallel
from .loop import NonFiniteLossError, TrainConfig, TrainResult, train
from .losses import CrossEntropy, Distillation
from .optim import OptimConfig, Schedule
from .teacher import TeacherError, frozen_copy, load_teacher

__all__ = ["CrossEntropy", "Distillation", "NonFiniteLossError", "OptimConfig", "Schedule", "TeacherError",
           "TrainConfig", "TrainResult", "frozen_copy", "init_parallel", "latest_checkpoint", "load_teacher", "train"]
