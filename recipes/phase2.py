"""Phase 2, context expansion by implicit positional distillation (SPEC.md 2.2), and its long-data baseline.

From a phase-1 checkpoint, RoPE theta and the maximum context are raised (`Recipe.config_changes`, so every
checkpoint of the stage records the new length) and the student trains on windows of the new length:
- `loss="kd"` (IPD): the phase-1 data, documents cut to at most `short_doc_tokens` (the phase-1 length) and
  packed into one causal window each, positions continuous and attention across documents, exactly the
  window the long-context teacher sees; full-vocabulary forward KL to that teacher, or its top-k, optionally
  from a cache shared by runs (`teacher_cache`), so the teacher runs once per window;
- `loss="ce"` (the long-data baseline): next-token CE on genuinely long documents only (at least
  `long_doc_tokens` tokens: whole acts of plays, whole standard-library modules), same windows and budget.
"""

from __future__ import annotations

from mobilellm.data.batch_source import TokenShards
from mobilellm.train.context import checkpoint_config, context_extension
from mobilellm.train.loop import TrainConfig
from mobilellm.train.objectives import CE, KD
from mobilellm.train.optim import OptimConfig, Schedule
from mobilellm.train.recipe import Recipe

LOSSES = ("kd", "ce")


def phase2(init: str, shards: str, *, seq_len: int, loss: str = "kd", teacher: str | None = None,
           max_seq_len: int | None = None, rope_theta: float | None = None, short_doc_tokens: int | None = None,
           long_doc_tokens: int | None = None, domain_weights: dict[str, float] | None = None,
           steps: int = 100, batch_rows: int = 4, micro_batch_rows: int | None = None, lr: float = 4e-5,
           warmup_steps: int | None = None, top_k: int | None = None, teacher_cache: str | None = None,
           tokenizer: str | None = None, seed: int = 0, save_every: int = 0, eval_every: int = 0,
           print_every: int = 10, train: TrainConfig | None = None) -> Recipe:
    """Extend `init` to a `max_seq_len` context (default: `seq_len`) on windows of `seq_len` tokens.

    `short_doc_tokens` (IPD) cuts documents into pieces of at most that many tokens, each packed apart (the
    phase-1 length: the data stays short); `long_doc_tokens` (CE) keeps documents of at least that many
    (default: one window). `train` replaces the loop's config whole (full-scale recipes).
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown phase-2 loss {loss!r}; expected {' or '.join(LOSSES)}")
    changes = context_extension(checkpoint_config(init), max_seq_len=max_seq_len or seq_len, rope_theta=rope_theta,
                                seq_len=seq_len)
    if loss == "kd":
        if long_doc_tokens is not None:
            raise ValueError("long_doc_tokens selects the long-data baseline's documents (loss ce), not IPD's")
        data = TokenShards(shards, domain_weights, packing="window", max_doc_tokens=short_doc_tokens)
        objective = KD(teacher=teacher, top_k=top_k, cache=teacher_cache)
    else:
        if teacher or top_k or teacher_cache or short_doc_tokens:
            raise ValueError("the long-data baseline (loss ce) learns from long documents alone: drop the teacher, "
                             "top_k, teacher cache and short_doc_tokens")
        data = TokenShards(shards, domain_weights, packing="window", min_doc_tokens=long_doc_tokens or seq_len + 1)
        objective = CE()
    if train is None:
        warmup = steps // 20 if warmup_steps is None else warmup_steps
        train = TrainConfig(steps=steps, schedule=Schedule(lr, steps, warmup_steps=warmup, decay="cosine"),
                            optim=OptimConfig(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1),
                            save_every=save_every, eval_every=eval_every, print_every=print_every)
    return Recipe(
        name=f"phase2-{'ipd' if loss == 'kd' else 'long-ce'}",
        init=init,
        config_changes=changes,
        train=train,
        seq_len=seq_len,
        global_batch_rows=batch_rows,
        micro_batch_rows=micro_batch_rows,
        data=data,
        objective=objective,
        tokenizer=tokenizer,
        seed=seed,
    )
