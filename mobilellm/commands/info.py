"""`mobilellm info`: a config's shape, parameter count and memory footprint."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelConfig
from ..hf import read_config
from ..model import build_model

INT4_GROUP = 32


def resolve_config(name_or_folder: str) -> ModelConfig:
    """A named config, or the config saved in a checkpoint folder."""
    if Path(name_or_folder).is_dir():
        return read_config(name_or_folder)
    return ModelConfig.from_name(name_or_folder)


def memory_bytes(model: torch.nn.Module, scheme: str) -> int:
    """Weight bytes at bf16, or int4 (group-32 scales in bf16) for every matrix and the embedding."""
    total = 0
    for p in model.parameters():
        if scheme == "bf16" or p.ndim == 1:
            total += p.numel() * 2
        else:
            total += p.numel() // 2 + (p.numel() // INT4_GROUP) * 2
    return total


def describe(config: ModelConfig) -> str:
    model = build_model(config, device="meta")
    n_global = config.layer_types.count("full_attention")
    n_sliding = config.layer_types.count("sliding_attention")
    lines = [
        f"config         {config.name} ({config.family} layout)",
        f"layers         {config.n_layers}: {n_global} global, {n_sliding} sliding"
        + (f" (window {config.sliding_window})" if n_sliding else ""),
        f"hidden / ffn   {config.dim} / {config.ffn_dim}",
        f"heads          {config.n_heads} query, {config.n_kv_heads} KV, head dim {config.head_dim}",
        f"vocab          {config.vocab_size:,}" + (" (tied embeddings)" if config.tie_embeddings else ""),
        f"rope           theta {config.rope_theta:g}, {config.rope_layout} layout" + (", q/k L2 norm" if config.qk_norm else ""),
        f"max context    {config.max_seq_len:,}",
        f"parameters     {model.num_parameters():,}",
        f"weights bf16   {memory_bytes(model, 'bf16') / 1e6:,.1f} MB",
        f"weights int4   {memory_bytes(model, 'int4') / 1e6:,.1f} MB (group {INT4_GROUP}, bf16 scales)",
    ]
    return "\n".join(lines)


def info(config: str) -> None:
    """Show a model's shape, parameter count and weight memory at bf16 and int4.

    Args:
        config: a named config (pro-1b, r1-950m, smollm2-135m, tiny, ...) or a checkpoint folder
    """
    print(describe(resolve_config(config)))
