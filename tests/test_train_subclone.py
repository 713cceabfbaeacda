"""Subcloning a student out of a teacher: checked against the teacher itself with the cut parts removed by hand."""

import pytest
import torch

from mobilellm.config import ModelConfig
from mobilellm.model import build_model
from mobilellm.train.recipe import Recipe, start_model
from mobilellm.train.loop import TrainConfig
from mobilellm.train.optim import Schedule
from mobilellm.train.subclone import evenly_spaced, subclone_into

TEACHER = ModelConfig.from_name("tiny-llama").replace(n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16,
                                                     layer_types=("full_attention",) * 3, rope_layout="half")
TOKENS = torch.randint(0, TEACHER.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))


def test_a_same_size_student_in_the_other_rope_layout_equals_the_teacher():
    teacher = build_model(TEACHER, seed=1).eval()
    student = subclone_into(build_model(TEACHER.replace(rope_layout="interleaved")), teacher).eval()
    torch.testing.assert_close(student(TOKENS), teacher(TOKENS), rtol=1e-5, atol=1e-5)


def test_dropped_layers_heads_and_neurons_are_exactly_the_teacher_without_them():
    """The teacher's middle layer, one query head per KV group and half its FFN neurons are made inert by hand
    (zero output weights), so they rank last and the teacher computes the same function without them: the
    student that drops them must equal it."""
    teacher = build_model(TEACHER, seed=2).eval()
    hd, q_per_kv = TEACHER.head_dim, TEACHER.n_heads // TEACHER.n_kv_heads
    with torch.no_grad():
        for block in teacher.layers:
            o = block.self_attn.o_proj.weight.view(TEACHER.dim, TEACHER.n_heads, hd)
            o[:, 1::q_per_kv] = 0  # the second query head of every group
            block.mlp.down_proj.weight[:, 1::2] = 0  # every other FFN neuron
        middle = teacher.layers[1]
        middle.self_attn.o_proj.weight.zero_()
        middle.mlp.down_proj.weight.zero_()  # the middle layer adds nothing to the residual stream
    student_config = TEACHER.replace(n_layers=2, layer_types=("full_attention",) * 2, n_heads=2,
                                     ffn_dim=TEACHER.ffn_dim // 2)
    student = subclone_into(build_model(student_config), teacher).eval()
    torch.testing.assert_close(student(TOKENS), teacher(TOKENS), rtol=1e-5, atol=1e-5)


def test_a_narrower_residual_keeps_the_dimensions_written_to_most():
    teacher = build_model(TEACHER, seed=3)
    loud = torch.tensor([5, 17, 40])
    with torch.no_grad():
        teacher.embed_tokens.weight[:, loud] *= 50
    student = subclone_into(build_model(TEACHER.replace(dim=16)), teacher)
    norms = student.embed_tokens.weight.norm(dim=0).sort(descending=True).values
    assert norms[2] > 20 * norms[3]  # the three loud dimensions are kept; without them all columns are alike


def test_layers_are_evenly_spaced_with_the_first_and_last():
    assert evenly_spaced(30, 8) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert evenly_spaced(3, 2) == [0, 2]


@pytest.mark.parametrize("change, message", [
    (dict(vocab_size=128), "vocabularies differ"),
    (dict(head_dim=8), "head_dim differs"),
    (dict(dim=128), "dim 128 is larger"),
    (dict(n_heads=8, n_kv_heads=2), "query heads per KV head"),
])
def test_an_incompatible_student_is_refused_with_the_reason(change, message):
    with pytest.raises(ValueError, match=message):
        subclone_into(build_model(TEACHER.replace(**change)), build_model(TEACHER))


def test_a_recipe_inherits_its_fresh_student_from_a_checkpoint(tmp_path):
    from mobilellm.hf import save_pretrained

    teacher = build_model(TEACHER, seed=4).eval()
    save_pretrained(teacher, tmp_path / "teacher")
    recipe = Recipe(name="inherit", train=TrainConfig(steps=1, schedule=Schedule(1e-3, 1)), seq_len=16, global_batch_rows=1,
                    student=TEACHER.replace(rope_layout="interleaved"), inherit=str(tmp_path / "teacher"))
    torch.testing.assert_close(start_model(recipe).eval()(TOKENS), teacher(TOKENS), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="inherit subclones a fresh student"):
        recipe.replace(student=None, init=str(tmp_path / "teacher")).validate(1)
