"""Every int4 kernel against the dequantized math (math.py) it must compute."""

import pytest
import torch

from mobilellm.config import ModelConfig
from mobilellm.model import build_model
from mobilellm.quant import QuantConfig, quantize_
from mobilellm.quant import math as qm
from mobilellm.quant.kernels import int4_linear, load_extension
from mobilellm.quant.layout import from_panels, panel_rows, to_panels


def packed_weight(n, k, group, scale_dtype, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    scales = qm.int4_scales(w, group, scale_dtype)
    return qm.pack_int4(qm.quantize_int4(w, scales)), scales


@pytest.fixture(scope="module")
def ext():
    ext = load_extension()
    if ext is None:
        pytest.skip("the C++ int4 kernels do not build here (no AVX2 or no C++ compiler)")
    return ext


def dequantized_math(x, packed, scales, int8_activations):
    w = qm.dequantize_int4(qm.unpack_int4(packed), scales).double()
    if int8_activations:
        x = qm.dequantize_int8_per_token(*qm.quantize_int8_per_token(x))
    return x.double() @ w.T


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("n,k,group,scale_dtype", [(96, 256, 32, torch.float16), (40, 320, 64, torch.float32),
                                                   (33, 128, 128, torch.float32), (13, 96, 32, torch.float16)])
@pytest.mark.parametrize("int8_activations", [True, False])
def test_kernel_matches_dequantized_math(backend, n, k, group, scale_dtype, int8_activations, request):
    if backend == "cpp":
        request.getfixturevalue("ext")
    packed, scales = packed_weight(n, k, group, scale_dtype)
    x = torch.randn(2, 3, k, generator=torch.Generator().manual_seed(1)) * 3 + 0.5
    stored = to_panels(packed, scales) if int8_activations else (packed, scales)  # what that kernel reads
    y = int4_linear(x, *stored, group, int8_activations, backend=backend, out_features=n)
    ref = dequantized_math(x.reshape(-1, k), packed, scales, int8_activations).reshape(2, 3, n)
    assert y.shape == (2, 3, n) and y.dtype == torch.float32
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())


def test_cpp_activation_quantization_is_bit_identical(ext):
    x = torch.randn(7, 192, generator=torch.Generator().manual_seed(3)) * 5
    x[2] = x[2].abs()  # all-positive row: zero point at -128
    x[4] = 0.0  # all-zero row: epsilon scale
    q, scale, zp = ext.quantize_rows_int8(x)
    q_ref, scale_ref, zp_ref = qm.quantize_int8_per_token(x)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref[:, 0]) and torch.equal(zp.float(), zp_ref[:, 0])


def test_cpp_model_close_to_reference_model(ext, monkeypatch):
    cfg = ModelConfig.from_name("tiny")
    model = quantize_(build_model(cfg, seed=0), QuantConfig.from_scheme("cpu"))
    t = torch.randint(0, cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv("MOBILELLM_INT4_BACKEND", "reference")
    ref = model(t).softmax(-1)
    monkeypatch.setenv("MOBILELLM_INT4_BACKEND", "cpp")
    assert (model(t).softmax(-1) - ref).abs().max() < 1e-3


def test_kernel_rejects_bad_shapes(ext):
    packed, scales = to_panels(*packed_weight(8, 64, 32, torch.float16))
    with pytest.raises(RuntimeError, match="do not match"):
        ext.int4_linear_a8(torch.randn(1, 96), packed, scales, torch.zeros(8), 32, 8)
    with pytest.raises(RuntimeError, match="row correction"):
        ext.int4_linear_a8(torch.randn(1, 64), packed, scales, torch.zeros(7), 32, 8)
    with pytest.raises(RuntimeError, match="out_features"):
        ext.int4_linear_a8(torch.randn(1, 64), packed, scales, torch.zeros(8), 32, 9)
    with pytest.raises(RuntimeError, match="8-row panels"):
        ext.int4_linear_a8(torch.randn(1, 64), packed[:6], scales[:6], torch.zeros(6), 32, 6)


def test_panel_layout_round_trips_and_gathers_rows():
    packed, scales = packed_weight(13, 96, 32, torch.float16)  # 13 rows: the last panel is padded
    panels, panel_scales = to_panels(packed, scales)
    assert panels.shape == (16, 48) and panel_scales.shape == (16, 3)
    assert torch.equal(panels.reshape(-1)[:8], torch.cat([packed[0, :4], packed[1, :4]]))  # word 0 of rows 0, 1
    rows, row_scales = from_panels(panels, panel_scales, 13)
    assert torch.equal(rows, packed) and torch.equal(row_scales, scales)
    index = torch.tensor([12, 0, 7, 8, 7])
    rows, row_scales = panel_rows(panels, panel_scales, index)
    assert torch.equal(rows, packed[index]) and torch.equal(row_scales, scales[index])


def test_a_torch_build_lock_left_by_a_killed_build_is_removed_under_ours(tmp_path):
    """torch waits forever on the `lock` file a killed build leaves; ours is an OS lock, so holding it proves no
    build runs and the file is stale."""
    import subprocess
    import sys

    from mobilellm.quant.kernels import build_lock

    stale = tmp_path / "py311_cpu" / "kernels_abc" / "lock"
    stale.parent.mkdir(parents=True)
    stale.touch()
    with build_lock(tmp_path, "kernels_abc"):
        assert not stale.exists()
        # another process cannot take it meanwhile (a second build waits for the first)
        probe = ("import fcntl, sys; h = open(sys.argv[1], 'w')\n"
                 "try:\n    fcntl.flock(h, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(3)")
        held = subprocess.run([sys.executable, "-c", probe, str(tmp_path / ".kernels_abc.flock")])
        assert held.returncode == 3
