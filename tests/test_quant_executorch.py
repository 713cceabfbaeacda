"""ExecuTorch export (.pte, XNNPACK): the runtime's logits match our converted model's on a prompt.

Needs the optional `executorch` package (skipped without it); slow (export takes minutes on 2 cores).
"""

import pytest
import torch

from mobilellm.config import ModelConfig
from mobilellm.model import build_model
from mobilellm.quant import QuantConfig, quantize_

pytest.importorskip("executorch", reason="ExecuTorch not installed (pip install -c constraints.txt 'mobilellm[executorch]')")


@pytest.mark.slow
def test_pte_matches_our_int4_model(tmp_path):
    from mobilellm.quant.executorch import export_pte, run_pte

    config = QuantConfig.from_scheme("cpu")
    model = quantize_(build_model(ModelConfig.from_name("tiny"), seed=0), config)
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    path = export_pte(model, config, tmp_path / "tiny.pte", seq_len=16)
    assert b"XnnpackBackend" in path.read_bytes()  # the int4 linears were delegated to XNNPACK
    ours, theirs = model(tokens), run_pte(path, tokens)
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))
    # XNNPACK quantizes activations with its own rounding: close, not bit-equal
    assert (theirs - ours).abs().max() < 0.02 * ours.abs().max()


def test_export_refuses_the_accelerator_scheme():
    from mobilellm.quant.executorch import exportable_model

    config = QuantConfig.from_scheme("accelerator")
    with pytest.raises(ValueError, match="cpu scheme"):
        exportable_model(quantize_(build_model(ModelConfig.from_name("tiny"), seed=0), config), config)
