"""Context extension (phase 2): the config changes that take a checkpoint to a longer context, checked.

Implicit positional distillation (SPEC.md 2.2) raises RoPE's theta together with the maximum context: a
larger theta slows every rotation, so positions past the phase-1 length map onto angles the model has seen.
The changes are applied through `Recipe.config_changes` and so recorded in the config saved beside every
checkpoint of the stage: the result loads, and generates, at the new length.
"""

from __future__ import annotations

from pathlib import Path

from ..artifacts import resolve_checkpoint
from ..config import ModelConfig
from ..hf import read_config


class ContextError(ValueError):
    """A context change that cannot be what the user meant."""


def checkpoint_config(checkpoint: str | Path) -> ModelConfig:
    """The model config of a checkpoint folder (or fetchable name), without reading its weights."""
    source = resolve_checkpoint(checkpoint)
    if source.is_file():
        raise ContextError(f"{source} is a file: context extension starts from a checkpoint folder "
                           "(convert a GGUF first: `mobilellm convert`)")
    return read_config(source)


def context_extension(base: ModelConfig, *, max_seq_len: int | None, rope_theta: float | None = None,
                      seq_len: int | None = None) -> dict:
    """The config changes {max_seq_len, rope_theta} taking `base` to a longer context, refusing nonsense.

    A new theta without a longer context is refused: it only moves every position the model knows onto
    other angles. So is a shorter context, a lower theta (phase-wise RoPE scaling raises it), and a training
    window (`seq_len`) longer than the new context.
    """
    if max_seq_len is None or max_seq_len == base.max_seq_len:
        if rope_theta is not None and rope_theta != base.rope_theta:
            raise ContextError(f"rope_theta {base.rope_theta:g} -> {rope_theta:g} without a longer context "
                               f"(max_seq_len stays {base.max_seq_len:,}): theta is raised to extend the context; "
                               "give the new max_seq_len too")
        raise ContextError(f"{base.name} already has a {base.max_seq_len:,}-token context: context extension needs "
                           "a longer max_seq_len")
    if max_seq_len < base.max_seq_len:
        raise ContextError(f"max_seq_len {max_seq_len:,} is shorter than {base.name}'s {base.max_seq_len:,}: "
                           "context extension lengthens the context")
    if rope_theta is not None and rope_theta < base.rope_theta:
        raise ContextError(f"rope_theta {rope_theta:g} is below {base.name}'s {base.rope_theta:g}: a longer context "
                           "needs slower rotations (a larger theta), or keep it")
    if seq_len is not None and seq_len > max_seq_len:
        raise ContextError(f"training windows of {seq_len:,} tokens do not fit the new {max_seq_len:,}-token context")
    changes = {"max_seq_len": max_seq_len}
    if rope_theta is not None and rope_theta != base.rope_theta:
        changes["rope_theta"] = float(rope_theta)
    return changes
