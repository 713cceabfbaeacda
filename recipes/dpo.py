"""Direct preference optimisation (MobileLLM-Pro-instruct's final SFT + DPO stage): an SFT checkpoint trained on
prompt/chosen/rejected pairs against a frozen reference, pairs packed with document masks.

Defaults after the DPO paper and TRL: beta 0.1, LR 5e-7 for large models; small models take more (5e-6 here),
linear decay after 10% warmup, no weight decay. Rows of 1,024 tokens, as a pair takes both its sequences (on the
BIG-bench pairs of `mobilellm sft-data` with SmolLM2's template, 512 cut 12% of the pairs and left 10% without a
completion token; 1,024 cuts 0.6%). The reference is the starting checkpoint unless named; with
`precompute_reference` its log-probs are computed once and cached in the run folder, freeing its memory.
"""

from __future__ import annotations

from mobilellm.data.pair_batches import PreferenceData
from mobilellm.train.loop import TrainConfig
from mobilellm.train.objectives import DPO
from mobilellm.train.optim import OptimConfig, Schedule
from mobilellm.train.recipe import Recipe


def dpo(checkpoint: str, data: str, *, loss: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
        reference: str | None = None, precompute_reference: bool = False, steps: int = 100, batch_rows: int = 8,
        seq_len: int = 1024, lr: float = 5e-6, packing: bool = True, overflow: str = "truncate", seed: int = 0,
        save_every: int = 0) -> Recipe:
    """DPO (or IPO, hinge) of `checkpoint` on the preference pairs of `data`; `batch_rows` rows of packed pairs."""
    return Recipe(
        name=f"dpo-{loss}",
        init=checkpoint,
        data=PreferenceData(data, packing=packing, overflow=overflow),
        objective=DPO(loss=loss, beta=beta, label_smoothing=label_smoothing, reference=reference,
                      precompute=precompute_reference),
        train=TrainConfig(steps=steps, schedule=Schedule(lr, steps, warmup_steps=max(1, steps // 10), decay="linear"),
                          optim=OptimConfig(weight_decay=0.0), save_every=save_every),
        seq_len=seq_len,
        global_batch_rows=batch_rows,
        seed=seed,
    )
