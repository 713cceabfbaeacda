"""Chunked losses equal the naive full-logits computation, in value and in gradient."""

import pytest
import torch
import torch.nn.functional as F

from mobilellm.config import ModelConfig
from mobilellm.model import build_model
from mobilellm.train.losses import CrossEntropy, Distillation, chunked_linear_loss

CFG = ModelConfig.from_name("tiny")


def make_batch(B=2, T=24, seed=0, ignore_tail=5):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CFG.vocab_size, (B, T + 1), generator=g)
    targets = tokens[:, 1:].clone()
    targets[0, -ignore_tail:] = -100  # padding the loss must skip
    return {"tokens": tokens[:, :-1], "targets": targets,
            "positions": torch.arange(T).expand(B, T), "doc_ids": torch.zeros(B, T, dtype=torch.long)}


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(loss_fn, reference_fn, model, batch):
    model.zero_grad()
    got = loss_fn(model, batch)
    got.backward()
    got_grads = grads(model)
    model.zero_grad()
    logits = model(batch["tokens"], batch["positions"], batch["doc_ids"])  # (B, T, V): the naive way
    keep = batch["targets"] != -100
    expected = reference_fn(logits[keep].float(), batch["targets"][keep])
    expected.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    ref_grads = grads(model)
    assert got_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("chunk", [7, 1024])
def test_cross_entropy_matches_full_logits(chunk):
    model = build_model(CFG, seed=0)
    compare(CrossEntropy(chunk_size=chunk), lambda lg, t: F.cross_entropy(lg, t, reduction="sum"), model, make_batch())


def teacher_logits_of(teacher, batch):
    with torch.no_grad():
        logits = teacher(batch["tokens"], batch["positions"], batch["doc_ids"])
    return logits[batch["targets"] != -100]


@pytest.mark.parametrize("temperature,ce_weight", [(1.0, 0.0), (2.0, 0.3)])
def test_full_kd_matches_naive_kl(temperature, ce_weight):
    student, teacher = build_model(CFG, seed=0), build_model(CFG, seed=1).eval().requires_grad_(False)
    batch = make_batch()
    t_logits = teacher_logits_of(teacher, batch)

    def reference(logits, targets):
        p_t = F.softmax(t_logits / temperature, -1)
        kl = F.kl_div(F.log_softmax(logits / temperature, -1), p_t, reduction="sum") * temperature**2
        return ce_weight * F.cross_entropy(logits, targets, reduction="sum") + (1 - ce_weight) * kl

    loss = Distillation(teacher, temperature=temperature, ce_weight=ce_weight, chunk_size=5)
    compare(loss, reference, student, batch)


@pytest.mark.parametrize("tail_bucket", [False, True])
def test_top_k_kd_matches_naive(tail_bucket):
    student, teacher = build_model(CFG, seed=0), build_model(CFG, seed=1).eval().requires_grad_(False)
    batch, k = make_batch(), 8
    t_logits = teacher_logits_of(teacher, batch)

    def reference(logits, targets):
        p_t = F.softmax(t_logits, -1)
        p_s = F.softmax(logits, -1)
        top_p, ids = p_t.topk(k, -1)
        s_top = p_s.gather(-1, ids)
        if not tail_bucket:
            q = top_p / top_p.sum(-1, keepdim=True)
            return (q * (q.log() - s_top.log())).sum()
        q_tail, s_tail = 1 - top_p.sum(-1), 1 - s_top.sum(-1)
        return (top_p * (top_p.log() - s_top.log())).sum() + (q_tail * (q_tail.log() - s_tail.log())).sum()

    compare(Distillation(teacher, top_k=k, tail_bucket=tail_bucket, chunk_size=6), reference, student, batch)


def test_kd_of_a_model_with_itself_is_zero():
    model = build_model(CFG, seed=0)
    teacher = build_model(CFG, seed=0).eval().requires_grad_(False)
    assert Distillation(teacher)(model, make_batch()).item() == pytest.approx(0.0, abs=1e-4)


def test_kd_refuses_a_teacher_with_another_vocab():
    teacher = build_model(CFG.replace(vocab_size=300), seed=1)
    with pytest.raises(ValueError, match="vocab 300"):
        Distillation(teacher)(build_model(CFG), make_batch())


def test_chunked_loss_keeps_only_one_chunk_of_logits():
    # A chunk loss that records the largest logits tensor it is handed.
    hidden = torch.randn(50, 8, requires_grad=True)
    weight = torch.randn(1000, 8, requires_grad=True)
    seen = []

    def chunk_loss(logits, rows):
        seen.append(logits.shape)
        return logits.logsumexp(-1).sum()

    chunked_linear_loss(hidden, weight, chunk_loss, chunk_size=16).backward()
    assert max(s[0] for s in seen) == 16 and len(seen) == 4
    ref_h, ref_w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    (ref_h @ ref_w.T).logsumexp(-1).sum().backward()
    torch.testing.assert_close(hidden.grad, ref_h.grad)
    torch.testing.assert_close(weight.grad, ref_w.grad)


def test_no_grad_evaluation_skips_gradient_work():
    model = build_model(CFG, seed=0)
    with torch.no_grad():
        value = CrossEntropy()(model, make_batch())
    assert value.requires_grad is False and value.item() > 0
