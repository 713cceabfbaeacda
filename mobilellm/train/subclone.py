"""Subcloning: a small student's first weights cut out of a bigger teacher that shares its tokenizer.

After Samragh et al. 2023 ("Weight subcloning: direct initialization of transformers using larger
pretrained ones"): keep evenly spaced layers (the first and last among them), the residual dimensions,
attention heads and FFN neurons that carry the most weight, and rescale so the residual stream keeps its
scale. A student started this way begins near the teacher's loss instead of at ln(vocab), which is what lets a
few minutes of distillation on a CPU produce a model that writes words. Every choice is made from the
weights alone (no data), so the same teacher and student configs always give the same start.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..model import Transformer


def check_compatible(student: ModelConfig, teacher: ModelConfig) -> None:
    problems = []
    if student.vocab_size != teacher.vocab_size:
        problems.append(f"vocabularies differ ({student.vocab_size:,} vs {teacher.vocab_size:,})")
    if student.head_dim != teacher.head_dim:
        problems.append(f"head_dim differs ({student.head_dim} vs {teacher.head_dim})")
    for name in ("dim", "n_layers", "n_kv_heads", "ffn_dim"):
        if getattr(student, name) > getattr(teacher, name):
            problems.append(f"{name} {getattr(student, name)} is larger than the teacher's {getattr(teacher, name)}")
    if student.n_heads // student.n_kv_heads > teacher.n_heads // teacher.n_kv_heads:
        problems.append(f"{student.n_heads // student.n_kv_heads} query heads per KV head is more than the teacher's "
                        f"{teacher.n_heads // teacher.n_kv_heads}")
    if student.qk_norm != teacher.qk_norm:
        problems.append("one has qk_norm and the other not")
    if problems:
        raise ValueError(f"cannot subclone {student.name!r} from {teacher.name!r}: " + "; ".join(problems))


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in their original order (order carries no meaning but keeps ties stable)."""
    return scores.topk(k).indices.sort().values


def evenly_spaced(n: int, k: int) -> list[int]:
    """k of range(n), the first and last included (k >= 2)."""
    return [round(i * (n - 1) / (k - 1)) for i in range(k)] if k > 1 else [0]


def rope_rows(layout_from: str, layout_to: str, head_dim: int) -> torch.Tensor:
    """Row order within a head that moves RoPE's rotation pairs from one layout to the other:
    'half' pairs (i, i + hd/2), 'interleaved' pairs (2i, 2i + 1)."""
    half = torch.arange(head_dim // 2)
    if layout_from == layout_to:
        return torch.arange(head_dim)
    if layout_to == "interleaved":  # row 2i <- i, row 2i+1 <- i + hd/2
        return torch.stack([half, half + head_dim // 2], dim=1).flatten()
    return torch.cat([2 * half, 2 * half + 1])  # to 'half': row i <- 2i, row i + hd/2 <- 2i + 1


def residual_dims(teacher: dict[str, torch.Tensor], config: ModelConfig, k: int) -> torch.Tensor:
    """The k residual dimensions written to most: squared norms of the embedding's columns and of every
    o_proj and down_proj output row (the few 'massive' dimensions of a trained model rank first)."""
    score = teacher["embed_tokens.weight"].float().pow(2).sum(0)
    for layer in range(config.n_layers):
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            score += teacher[f"layers.{layer}.{name}.weight"].float().pow(2).sum(1)
    return top(score, k)


def subclone_state(student: ModelConfig, teacher_config: ModelConfig,
                   teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full state dict for `student` cut out of the `teacher` state dict (same names as `Transformer`'s)."""
    check_compatible(student, teacher_config)
    hd = student.head_dim
    dims = residual_dims(teacher, teacher_config, student.dim)
    # RMSNorm divides by the RMS over the kept dims, which are the large ones: scale the residual stream down
    # so the normalised activations the kept weights see keep the teacher's magnitude.
    emb = teacher["embed_tokens.weight"].float()
    scale = (emb.pow(2).mean() / emb[:, dims].pow(2).mean()).sqrt()
    out = {"embed_tokens.weight": emb[:, dims] * scale, "norm.weight": teacher["norm.weight"][dims].clone()}
    head = teacher.get("lm_head.weight", teacher["embed_tokens.weight"]).float()
    out["lm_head.weight"] = out["embed_tokens.weight"] if student.tie_embeddings else head[:, dims].clone()
    q_per_kv_t, q_per_kv_s = teacher_config.n_heads // teacher_config.n_kv_heads, student.n_heads // student.n_kv_heads
    rows = rope_rows(teacher_config.rope_layout, student.rope_layout, hd)
    for new, old in enumerate(evenly_spaced(teacher_config.n_layers, student.n_layers)):
        t = lambda name: teacher[f"layers.{old}.{name}"].float()  # noqa: E731
        o = t("self_attn.o_proj.weight").unflatten(1, (teacher_config.n_heads, hd))  # (dim, heads, hd)
        head_score = o.pow(2).sum((0, 2)).unflatten(0, (teacher_config.n_kv_heads, q_per_kv_t))  # (kv, q per kv)
        groups = top(head_score.sum(1), student.n_kv_heads)
        heads = torch.cat([g * q_per_kv_t + top(head_score[g], q_per_kv_s) for g in groups])

        def cut_heads(weight, keep):  # (heads * hd, dim) -> (len(keep) * hd, kept dims)
            return weight.unflatten(0, (-1, hd))[keep][:, :, dims].flatten(0, 1)

        q = cut_heads(t("self_attn.q_proj.weight"), heads).unflatten(0, (-1, hd))[:, rows].flatten(0, 1)
        k = cut_heads(t("self_attn.k_proj.weight"), groups).unflatten(0, (-1, hd))[:, rows].flatten(0, 1)
        down, up, gate = t("mlp.down_proj.weight"), t("mlp.up_proj.weight"), t("mlp.gate_proj.weight")
        neurons = top(down.pow(2).sum(0).sqrt() * (up.pow(2).sum(1) + gate.pow(2).sum(1)).sqrt(), student.ffn_dim)
        prefix = f"layers.{new}."
        out |= {
            prefix + "input_layernorm.weight": t("input_layernorm.weight")[dims],
            prefix + "post_attention_layernorm.weight": t("post_attention_layernorm.weight")[dims],
            prefix + "self_attn.q_proj.weight": q,
            prefix + "self_attn.k_proj.weight": k,
            prefix + "self_attn.v_proj.weight": cut_heads(t("self_attn.v_proj.weight"), groups),
            prefix + "self_attn.o_proj.weight": o[dims][:, heads].flatten(1) * scale,
            prefix + "mlp.gate_proj.weight": gate[neurons][:, dims],
            prefix + "mlp.up_proj.weight": up[neurons][:, dims],
            prefix + "mlp.down_proj.weight": down[dims][:, neurons] * scale,
        }
    return {name: tensor.contiguous() for name, tensor in out.items()}


@torch.no_grad()
def subclone_into(student: Transformer, teacher: Transformer) -> Transformer:
    """Overwrite `student`'s weights with those cut out of `teacher`; returns `student`."""
    state = subclone_state(student.config, teacher.config, teacher.state_dict())
    student.load_state_dict(state, strict=True)
    return student
