"""The starter's SDM stage (simulation-driven data mixing, SPEC.md 2.4): a small proxy of the starter student.

The proxy keeps the student's tokenizer (SmolLM2's, vocab 49,152) and local/global layout at a quarter of its
width and half its depth; it trains with CE on the uniform mix of the shards' domains (the candidate mix),
and its K=4 checkpoints score each domain against the target (`mobilellm mix --recipe starter`):

    mobilellm mix --recipe starter --data SHARDS --target-domains math --out runs/mix
    mobilellm pretrain --recipe starter --loss ce --data SHARDS --mix runs/mix/mix.json
"""

from __future__ import annotations

from mobilellm.artifacts import fetch_smollm2
from mobilellm.config import ModelConfig, local_global_pattern
from mobilellm.mix import MixConfig, MixStage, Target
from mobilellm.train.loop import TrainConfig
from mobilellm.train.objectives import CE
from mobilellm.train.optim import Schedule
from mobilellm.train.recipe import Recipe

from .starter import build_shards, shards_dir

PROXY = ModelConfig.from_name("starter-student").replace(
    name="starter-proxy", dim=128, n_layers=4, n_heads=2, n_kv_heads=1, ffn_dim=384, head_dim=64,
    layer_types=local_global_pattern(4, 2, last_global=True))


def starter_proxy(shards: str | None = None, *, steps: int = 40, rows: int = 4, seq_len: int = 128,
                  lr: float = 3e-3, seed: int = 0, tokenizer: str | None = None, proxy: ModelConfig = PROXY) -> Recipe:
    """The proxy run; `tokenizer` (default: SmolLM2's, fetched) and `proxy` (the model) for other shards."""
    return Recipe(
        name="starter-proxy",
        student=proxy,
        train=TrainConfig(steps=steps, schedule=Schedule(peak_lr=lr, total_steps=steps, warmup_steps=max(1, steps // 10),
                                                         decay="cosine", final_lr=lr / 10), print_every=10),
        seq_len=seq_len,
        global_batch_rows=rows,
        shards=shards or str(shards_dir()),
        tokenizer=tokenizer or str(fetch_smollm2()),
        objective=CE(),
        seed=seed,
        val_batches=0,
        max_doc_tokens=seq_len + 1,  # as the starter draws its data: every row from a document of its own
        prepare=None if shards else build_shards,
    )


def starter_sdm() -> MixStage:
    """The proxy on the starter shards, its target the held-out math (the starter's weakest, smallest domain)."""
    return MixStage(starter_proxy(), Target(domains=("math",)), MixConfig(checkpoints=4))
