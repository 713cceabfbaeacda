"""Domain specialists (MobileLLM-Pro phase 3, SPEC.md 2.3): from one late checkpoint, each specialist anneals
on one domain with a small LR decaying linearly to 0, then `mobilellm merge` averages them.

The paper: about 500 steps per specialist, LR 1e-5 -> 0, specialists trained in parallel from the same
checkpoint. Here one recipe per domain; run them one after another or as separate processes (each under
torchrun at scale): they share nothing but the starting checkpoint.
"""

from __future__ import annotations

from mobilellm.train.loop import TrainConfig
from mobilellm.train.objectives import CE, KD
from mobilellm.train.optim import OptimConfig, Schedule
from mobilellm.train.recipe import Recipe

PAPER_STEPS, PAPER_LR = 500, 1e-5


def specialist(init: str, shards: str, domain: str, *, steps: int = PAPER_STEPS, lr: float = PAPER_LR,
               batch_rows: int = 4, seq_len: int = 256, teacher: str | None = None, seed: int = 0,
               save_every: int = 0) -> Recipe:
    """Anneal `init` on `domain` of `shards` alone: CE, or KD when a teacher is given."""
    return Recipe(
        name=f"specialist-{domain}",
        init=init,
        domain_weights={domain: 1.0},
        objective=KD(teacher=teacher) if teacher else CE(),
        train=TrainConfig(steps=steps, schedule=Schedule(lr, steps, warmup_steps=0, decay="linear", final_lr=0.0),
                          optim=OptimConfig(weight_decay=0.0), save_every=save_every, print_every=10),
        seq_len=seq_len,
        global_batch_rows=batch_rows,
        shards=shards,
        seed=seed,
    )


def continued(init: str, shards: str, domains: list[str], *, steps: int, lr: float = PAPER_LR, batch_rows: int = 4,
              seq_len: int = 256, teacher: str | None = None, seed: int = 0) -> Recipe:
    """The baseline a merge must match: the same annealing on the mix of `domains` (equal weights)."""
    recipe = specialist(init, shards, domains[0], steps=steps, lr=lr, batch_rows=batch_rows, seq_len=seq_len,
                        teacher=teacher, seed=seed)
    return recipe.replace(name="continued", domain_weights={d: 1.0 for d in domains})
