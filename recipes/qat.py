"""QAT with self-distillation (MobileLLM-Pro phase 4): a full-precision checkpoint, prepared for a 4-bit
scheme, trained with KL to its own frozen full-precision weights, then converted to int4.

The defaults are a CPU budget for small models (SmolLM2-135M: 100 steps of 4 x 256 tokens, about 20 minutes
on 2 cores); the paper's run is far longer (SPEC.md 2.4). Constant-ish small LR: the weights are already
trained, QAT only adapts them to the quantization grid.
"""

from __future__ import annotations

from mobilellm.quant.config import QuantConfig
from mobilellm.quant.qat import QATPrepare
from mobilellm.train.loop import TrainConfig
from mobilellm.train.objectives import CE, SelfDistillation
from mobilellm.train.optim import OptimConfig, Schedule
from mobilellm.train.recipe import Recipe


def qat(checkpoint: str, shards: str, *, scheme: str = "cpu", steps: int = 100, batch_rows: int = 4,
        seq_len: int = 256, lr: float = 2e-5, self_distillation: bool = True, save_every: int = 0,
        eval_every: int = 0) -> Recipe:
    """QAT of `checkpoint` on `shards` (every domain equally), cosine LR with 10% warmup, no weight decay."""
    return Recipe(
        name=f"qat-{scheme}",
        init=checkpoint,
        transforms=(QATPrepare(QuantConfig.from_scheme(scheme)),),
        objective=SelfDistillation() if self_distillation else CE(),
        train=TrainConfig(steps=steps, schedule=Schedule(lr, steps, warmup_steps=max(1, steps // 10)),
                          optim=OptimConfig(weight_decay=0.0), save_every=save_every, eval_every=eval_every),
        seq_len=seq_len,
        global_batch_rows=batch_rows,
        shards=shards,
    )
