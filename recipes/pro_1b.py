"""MobileLLM-Pro phase 1 (language learning): KD pretraining of pro-1b on the SDM data mix (SPEC.md 2, 2.1).

From the paper: 640k steps of 2M-token batches (1.4T tokens), peak LR 4e-4 after 10k warmup steps,
cosine to 0, Adam b1 0.9 / b2 0.95 / eps 1e-8, weight decay 0.1, forward KL to the teacher's full
distribution instead of one-hot CE. Not published, chosen here:
- sequence length 4096, 512 rows per step (2,097,152 tokens): the release's base context and eval
  lengths are 4k, and with 21 of 30 layers sliding (window 512) a 4k window costs little more than 2k;
  640k steps x 2.1M = 1.34T tokens, close to the reported 1.4T;
- pure KD (ce_weight 0) at temperature 1, the paper's "in place of CE";
- 4 rows (16k tokens) per GPU forward, bf16 autocast, per-block torch.compile and activation
  checkpointing: sized for 80 GB GPUs; gradient accumulation fills the batch for any GPU count.
The teacher (Llama 4-Scout in the paper), the Llama 4 tokenizer and the tokenized mix are the user's:
`mobilellm pretrain --recipe pro-1b --teacher DIR --tokenizer DIR --data SHARDS`.

Its SDM stage (`pro_1b_sdm`, SPEC.md 2.4) finds that mix: a proxy trains on the uniform mix of the paper's seven
sources, and its checkpoints score each source against the target. Not published, chosen here: the proxy is
pro-1b's layout at 12 layers x 512 (149,074,432 parameters with the tied 202,048-token embedding; AutoMixer found
a few-hundred-million proxy best), 20k steps of 256 x 2048 tokens (10.5B tokens, 0.8% of phase 1), CE, K=8
checkpoints; the target is BIG-bench reasoning and knowledge tasks rendered as text, and the held-out split of
FineWeb-Edu (general English):

    torchrun --nproc-per-node 8 -m mobilellm.cli mix --recipe pro-1b --data SHARDS --tokenizer DIR --parallel ddp
    mobilellm pretrain --recipe pro-1b --teacher DIR --tokenizer DIR --data SHARDS --mix runs/mix/mix.json

Phase 1's checkpoints record a 4,096-token context (the length it trains at); phase 2 extends it.

Phase 2 (context expansion by implicit positional distillation, SPEC.md 2.2): 100k steps, 20B tokens, LR 4e-5,
the phase-1 mix cut to phase-1-length pieces and packed into long windows, KD from a long-context teacher.
Not published, chosen here:
- windows of 65,536 tokens, 3 per step: 196,608 tokens x 100k steps = 19.7B tokens, the nearest whole number of
  windows to 20B (two full 131,072-token windows would make 26B); the context recorded is the release's 131,072;
- RoPE theta 500k -> 8M (MobileLLM-R1's final theta, SPEC.md 1): phase-wise RoPE scaling raises it per phase;
- 1k warmup steps, cosine to 0; one row (64k tokens) per GPU forward with activation checkpointing.
`mobilellm extend-context PHASE1_CKPT --recipe pro-1b --teacher LONG_CONTEXT_TEACHER --data SHARDS`.
"""

from __future__ import annotations

from mobilellm.config import ModelConfig, local_global_pattern
from mobilellm.mix import MixConfig, MixStage, Target
from mobilellm.train.loop import TrainConfig
from mobilellm.train.objectives import CE, KD
from mobilellm.train.optim import OptimConfig, Schedule
from mobilellm.train.recipe import Recipe

STEPS = 640_000
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of one H100 SXM

# Phase-1 mix found by SDM, percent (SPEC.md 2); domain names as given to `mobilellm tokenize`.
SDM_WEIGHTS = {"fineweb-edu": 89.75, "starcoder": 4.66, "openwebmath": 1.92, "arxiv": 1.35, "wiki": 1.02,
               "stackexchange": 1.02, "algebraic-stack": 0.24}


PHASE1_SEQ_LEN = 4096
PHASE2_STEPS, PHASE2_LR, PHASE2_SEQ_LEN, PHASE2_ROWS = 100_000, 4e-5, 65_536, 3
PHASE2_CONTEXT, PHASE2_THETA = 131_072, 8_000_000.0


def pro_1b() -> Recipe:
    return Recipe(
        name="pro-1b",
        student=ModelConfig.from_name("pro-1b").replace(max_seq_len=PHASE1_SEQ_LEN),
        train=TrainConfig(
            steps=STEPS,
            schedule=Schedule(peak_lr=4e-4, total_steps=STEPS, warmup_steps=10_000, decay="cosine", final_lr=0.0),
            optim=OptimConfig(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1),
            clip_norm=1.0,
            compile=True,
            activation_checkpointing=True,
            save_every=2000,
            eval_every=1000,
            print_every=10,
            peak_flops=H100_BF16_PEAK,
        ),
        seq_len=PHASE1_SEQ_LEN,
        global_batch_rows=512,
        micro_batch_rows=4,
        shards=None,
        tokenizer=None,
        domain_weights=SDM_WEIGHTS,
        objective=KD(teacher=None, temperature=1.0, ce_weight=0.0),
        val_batches=16,
    )


SDM_SOURCES = tuple(SDM_WEIGHTS)
PROXY = ModelConfig.from_name("pro-1b").replace(name="pro-1b-proxy", dim=512, n_layers=12, n_heads=8, n_kv_heads=2,
                                                ffn_dim=2048, layer_types=local_global_pattern(12, 4, last_global=True))
PROXY_STEPS = 20_000
SDM_TARGET_TASKS = ("social_iqa", "strategyqa", "elementary_math_qa", "logical_deduction", "winowhy")


def pro_1b_proxy() -> Recipe:
    recipe = pro_1b()
    return recipe.replace(
        name="pro-1b-proxy", student=PROXY, objective=CE(), seq_len=2048,
        global_batch_rows=256, micro_batch_rows=16, domain_weights={source: 1.0 for source in SDM_SOURCES},
        train=TrainConfig(steps=PROXY_STEPS, schedule=Schedule(peak_lr=1e-3, total_steps=PROXY_STEPS, warmup_steps=1000,
                                                               decay="cosine", final_lr=1e-4),
                          optim=recipe.train.optim, compile=True, print_every=10, peak_flops=H100_BF16_PEAK))


def pro_1b_sdm() -> MixStage:
    return MixStage(pro_1b_proxy(), Target(domains=("fineweb-edu",), bigbench=SDM_TARGET_TASKS, rows=64),
                    MixConfig(checkpoints=8, probe_rows=64, micro_rows=16))


def pro_1b_phase2(init: str, teacher: str | None, shards: str | None, tokenizer: str | None = None) -> Recipe:
    """Phase 2 of pro-1b from the phase-1 checkpoint `init`, distilled from the long-context `teacher`."""
    from .phase2 import phase2

    train = TrainConfig(
        steps=PHASE2_STEPS,
        schedule=Schedule(peak_lr=PHASE2_LR, total_steps=PHASE2_STEPS, warmup_steps=1000, decay="cosine", final_lr=0.0),
        optim=OptimConfig(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1),
        clip_norm=1.0, compile=True, activation_checkpointing=True, save_every=2000, eval_every=1000, print_every=10,
        peak_flops=H100_BF16_PEAK,
    )
    recipe = phase2(init, shards, seq_len=PHASE2_SEQ_LEN, max_seq_len=PHASE2_CONTEXT, rope_theta=PHASE2_THETA,
                    teacher=teacher, short_doc_tokens=PHASE1_SEQ_LEN, domain_weights=SDM_WEIGHTS,
                    batch_rows=PHASE2_ROWS, micro_batch_rows=1, tokenizer=tokenizer, train=train)
    return recipe.replace(name="pro-1b-phase2", val_batches=4)
