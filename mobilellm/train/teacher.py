"""Teachers for distillation: any checkpoint our loader reads, frozen, in eval mode, sharing the student's tokenizer.

KD compares distributions token id by token id, so a teacher with another vocabulary or tokenizer would
teach nonsense without any error: such a teacher is refused here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..artifacts import resolve_checkpoint
from ..config import ModelConfig
from ..data.shards import tokenizer_identity
from ..errors import UserError
from ..hf import load_pretrained, read_config
from ..tokenizer import TOKENIZER_FILE, Tokenizer


class TeacherError(UserError):
    """A teacher that cannot teach this student."""


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the loss runs the teacher under no_grad as well."""
    model.eval()
    model.requires_grad_(False)
    return model


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen full-precision copy, e.g. the self-distillation teacher of QAT (take it before `prepare`)."""
    return freeze(copy.deepcopy(model))


def check_compatible(teacher_dir: str | Path, student: ModelConfig, student_tokenizer: str | Path | None,
                     seq_len: int | None = None) -> None:
    """Same vocabulary size, the same tokenizer when both folders hold a tokenizer.json, and a context that
    holds the training window (`seq_len`): past its context a teacher teaches positions it never learned."""
    teacher_dir = Path(teacher_dir)
    t_config = read_config(teacher_dir)
    if t_config.vocab_size != student.vocab_size:
        raise TeacherError(f"teacher {teacher_dir} has vocab {t_config.vocab_size:,} but the student "
                           f"({student.name}) has {student.vocab_size:,}: KD needs a shared tokenizer")
    if seq_len is not None and seq_len > t_config.max_seq_len:
        raise TeacherError(f"training windows of {seq_len:,} tokens are longer than the teacher's context "
                           f"({teacher_dir}: {t_config.max_seq_len:,} tokens): distill from a long-context teacher "
                           "or shorten the windows")
    if student_tokenizer is None:
        return
    student_tokenizer = Path(student_tokenizer)
    if not ((teacher_dir / TOKENIZER_FILE).exists() and (student_tokenizer / TOKENIZER_FILE).exists()):
        return
    t_id = tokenizer_identity(Tokenizer.load(teacher_dir))
    s_id = tokenizer_identity(Tokenizer.load(student_tokenizer))
    if t_id != s_id:
        raise TeacherError(f"teacher {teacher_dir} uses another tokenizer than {student_tokenizer} "
                           f"(sha256 {t_id['sha256'][:12]} vs {s_id['sha256'][:12]}, eos {t_id['eos_id']} vs "
                           f"{s_id['eos_id']}): KD needs a shared tokenizer")


def load_teacher(folder: str | Path, student: ModelConfig, student_tokenizer: str | Path | None = None,
                 dtype: torch.dtype = torch.float32, device="cpu", seq_len: int | None = None) -> nn.Module:
    """Load, check against the student (and the training window, when given), and freeze a teacher: a checkpoint
    folder, a run folder (its latest checkpoint) or a fetchable name (smollm2-135m)."""
    folder = resolve_checkpoint(folder)
    check_compatible(folder, student, student_tokenizer, seq_len)
    return freeze(load_pretrained(folder, dtype=dtype, device=device))
