"""Supervised fine-tuning on chat data (MobileLLM-Pro-instruct's SFT stages, MobileLLM-R1's SFT on Tulu-3): a
checkpoint trained on conversations, the loss on the assistant's tokens only, conversations packed with
document masks. Plain CE, or KD from a teacher on the same tokens (`teacher`).

The defaults are a CPU budget for small models (SmolLM2-135M: 200 steps of 8 x 512 tokens); LR 2e-5 with 3%
warmup and cosine decay to a tenth, no weight decay: the weights are trained already, SFT teaches the format.
"""

from __future__ import annotations

from mobilellm.data.chat_batches import ChatData
from mobilellm.train.loop import TrainConfig
from mobilellm.train.objectives import CE, KD
from mobilellm.train.optim import OptimConfig, Schedule
from mobilellm.train.recipe import Recipe


def sft(checkpoint: str, data: str, *, val: str | None = None, steps: int = 200, batch_rows: int = 8,
        seq_len: int = 512, lr: float = 2e-5, teacher: str | None = None, ce_weight: float = 0.0,
        temperature: float = 1.0, packing: bool = True, overflow: str = "truncate", seed: int = 0,
        save_every: int = 0, eval_every: int = 0) -> Recipe:
    """SFT of `checkpoint` on the conversations of `data` (JSONL: messages or prompt/completion)."""
    objective = KD(teacher=teacher, temperature=temperature, ce_weight=ce_weight) if teacher else CE()
    return Recipe(
        name="sft",
        init=checkpoint,
        data=ChatData(data, val_path=val, packing=packing, overflow=overflow),
        objective=objective,
        train=TrainConfig(steps=steps, schedule=Schedule(lr, steps, warmup_steps=max(1, round(0.03 * steps)),
                                                         final_lr=lr / 10),
                          optim=OptimConfig(weight_decay=0.0), save_every=save_every, eval_every=eval_every),
        seq_len=seq_len,
        global_batch_rows=batch_rows,
        seed=seed,
    )
