"""The starter: a 19M-parameter student distilled from the real SmolLM2-135M on a CPU.

The student (`starter-student`) keeps pro-1b's local/global layout and shares SmolLM2's tokenizer
(vocab 49,152), which KD requires. Data: the starter corpus (Shakespeare, the Python standard library,
CHAMP math), tokenized once with SmolLM2's tokenizer and cached.
"""

from __future__ import annotations

from mobilellm.artifacts import cache_root, fetch_smollm2
from mobilellm.config import ModelConfig
from mobilellm.train.loop import TrainConfig
from mobilellm.train.objectives import KD
from mobilellm.train.optim import Schedule
from mobilellm.train.recipe import Recipe

STEPS = 100
SEQ_LEN = 128


def shards_dir():
    return cache_root() / "shards" / "starter-smollm2-135m"


def build_shards() -> None:
    """Build the starter corpus and tokenize it with SmolLM2's tokenizer, unless already cached."""
    from mobilellm.data.starter import starter_shards

    starter_shards(fetch_smollm2(), shards_dir())


def starter() -> Recipe:
    teacher = fetch_smollm2()
    return Recipe(
        name="starter",
        student=ModelConfig.from_name("starter-student"),
        train=TrainConfig(steps=STEPS, schedule=Schedule(peak_lr=2e-3, total_steps=STEPS, warmup_steps=10,
                                                         decay="cosine", final_lr=2e-4),
                          save_every=50, eval_every=25, print_every=1),
        seq_len=SEQ_LEN,
        global_batch_rows=4,
        micro_batch_rows=4,
        shards=str(shards_dir()),
        tokenizer=str(teacher),
        domain_weights={"prose": 0.45, "code": 0.45, "math": 0.10},
        max_doc_tokens=SEQ_LEN + 1,  # one row's worth: whole plays otherwise fill 60 consecutive rows
        objective=KD(teacher=str(teacher)),
        val_batches=4,
        prepare=build_shards,
    )
