"""`mobilellm quantize`: PTQ of a checkpoint folder from the command line."""

import torch

from mobilellm.cli import main
from mobilellm.config import ModelConfig
from mobilellm.hf import save_pretrained
from mobilellm.model import build_model
from mobilellm.quant import QuantConfig, quantize_
from mobilellm.quant.checkpoint import load_quantized


def test_quantize_command_writes_a_loadable_checkpoint(tmp_path, capsys):
    model = build_model(ModelConfig.from_name("tiny"), seed=0)
    save_pretrained(model, tmp_path / "fp")
    assert main(["quantize", str(tmp_path / "fp"), "--scheme", "cpu", "--out", str(tmp_path / "q")]) == 0
    assert "cpu scheme" in capsys.readouterr().out
    loaded, config = load_quantized(tmp_path / "q")
    assert config == QuantConfig.from_scheme("cpu")
    t = torch.randint(0, 256, (1, 16))
    assert torch.equal(loaded(t), quantize_(model, config)(t))


def test_quantize_command_names_a_bad_scheme(tmp_path, capsys):
    save_pretrained(build_model(ModelConfig.from_name("tiny"), seed=0), tmp_path / "fp")
    assert main(["quantize", str(tmp_path / "fp"), "--scheme", "int3", "--out", str(tmp_path / "q")]) == 2
    assert "unknown quantization scheme 'int3'" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
