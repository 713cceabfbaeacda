"""Quantization math against hand-computed values and round-trip error bounds."""

import pytest
import torch

from mobilellm.quant import math as qm


def test_int4_group_scales_and_values_by_hand():
    # One row, two groups of 32: group 0 has max |w| = 7.5 -> scale 1; group 1 has max |w| = 15 -> scale 2.
    w = torch.zeros(1, 64)
    w[0, :4] = torch.tensor([7.5, -7.5, 1.4, 2.5])
    w[0, 32:35] = torch.tensor([15.0, -3.0, 5.0])
    scales = qm.int4_scales(w, 32)
    assert scales.tolist() == [[1.0, 2.0]]
    q = qm.quantize_int4(w, scales)
    # round half to even: 7.5 -> 8 clamps to 7; -7.5 -> -8; 2.5 -> 2; 15/2 = 7.5 -> 7; -1.5 -> -2; 2.5 -> 2
    assert q[0, :4].tolist() == [7, -8, 1, 2]
    assert q[0, 32:35].tolist() == [7, -2, 2]
    assert qm.dequantize_int4(q, scales)[0, 32:35].tolist() == [14.0, -4.0, 4.0]


@pytest.mark.parametrize("group", [32, 128, None])
def test_int4_round_trip_error_is_at_most_half_a_step(group):
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    g = group or 256
    scales = qm.int4_scales(w, g)
    err = (qm.dequantize_int4(qm.quantize_int4(w, scales), scales) - w).abs()
    step = scales.repeat_interleave(g, dim=1)
    # inside the range the error is <= step/2; the clamp at +max costs at most one step (7.5 -> 7)
    assert (err <= step * 0.5 + 1e-6).float().mean() > 0.99
    assert (err <= step + 1e-6).all()


def test_fp16_scales_are_exactly_what_dequantization_uses():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    s16 = qm.int4_scales(w, 32, torch.float16)
    assert s16.dtype == torch.float16
    fq = qm.fake_quantize_int4(w, s16.float())
    assert torch.equal(fq, qm.dequantize_int4(qm.quantize_int4(w, s16), s16))


def test_pack_unpack_round_trip_and_layout():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(2, 4)  # (2, 64)
    packed = qm.pack_int4(q)
    assert packed.shape == (2, 32) and packed.dtype == torch.uint8
    assert torch.equal(qm.unpack_int4(packed), q)
    # byte 0 of a block: column 0 (-8 -> 0) low nibble, column 16 (-8 -> 0) high nibble; byte 1: 1 | 1 << 4
    assert packed[0, :2].tolist() == [0x00, 0x11]
    with pytest.raises(ValueError, match="multiple of 32"):
        qm.pack_int4(torch.zeros(2, 48, dtype=torch.int8))


def test_int8_per_token_asymmetric_by_hand():
    x = torch.tensor([[0.0, 2.55, 1.0], [-1.0, -0.5, 0.0]])
    q, scale, zp = qm.quantize_int8_per_token(x)
    # row 0: range [0, 2.55] -> scale 0.01, zero point -128; row 1: range [-1, 0] -> scale 1/255, zp 127
    assert torch.allclose(scale[:, 0], torch.tensor([0.01, 1 / 255]))
    assert zp[:, 0].tolist() == [-128.0, 127.0]
    assert q[0].tolist() == [-128, 127, -28]
    assert q[1].tolist() == [-128, 0, 127]
    x_hat = qm.dequantize_int8_per_token(q, scale, zp)
    assert torch.allclose(x_hat, x, atol=0.5 * scale.max().item() + 1e-6)


def test_int8_round_trip_bound_and_zero_exact():
    torch.manual_seed(0)
    x = torch.randn(5, 7, 100) * 3 + 1
    x[..., 3] = 0.0
    q, scale, zp = qm.quantize_int8_per_token(x)
    x_hat = qm.dequantize_int8_per_token(q, scale, zp)
    assert ((x_hat - x).abs() <= scale * 0.5 + 1e-6).all()
    assert (x_hat[..., 3] == 0).all()  # 0 is representable exactly (the range always contains it)


def test_kv_fake_quant_is_per_token_per_head_and_idempotent_in_the_int8_cache():
    torch.manual_seed(0)
    k = torch.randn(2, 3, 5, 16)
    k[1, 2, 4] *= 100  # one outlier token of one head must not coarsen any other (head, token)
    fq = qm.fake_quantize_kv_int8(k)
    err = (fq - k).abs()
    assert err[0].max() < 0.02 and err[1, :2].max() < 0.02 and err[1, 2, 4].max() > 0.1
    assert torch.equal(qm.dequantize_kv_int8(*qm.quantize_kv_int8(fq), torch.float32), fq)  # the cache stores it exactly
    k.requires_grad_(True)
    qm.fake_quantize_kv_int8(k).sum().backward()
    assert torch.equal(k.grad, torch.ones_like(k))


def test_ste_gradients():
    w = torch.tensor([[0.3, -2.0, 9.0] + [0.0] * 29], requires_grad=True)
    s = torch.tensor([[1.0]], requires_grad=True)
    qm.fake_quantize_int4(w, s).sum().backward()
    # identity inside the range, zero where clamped (9 -> 7)
    assert w.grad[0, :3].tolist() == [1.0, 1.0, 0.0]
    # LSQ: d/ds = round(w/s) - w/s inside, the clamp bound outside: (0 - 0.3) + (-2 + 2) + 7 = 6.7
    assert s.grad.item() == pytest.approx(6.7)
    x = torch.randn(3, 10, requires_grad=True)
    qm.fake_quantize_int8_per_token(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
