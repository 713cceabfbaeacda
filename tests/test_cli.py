import subprocess
import sys

import pytest

from mobilellm.cli import COMMANDS, build_parser, main
from mobilellm.hf import load_pretrained, save_pretrained
from mobilellm.config import ModelConfig
from mobilellm.model import build_model


def test_help_lists_exactly_the_registered_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_every_command_has_help_for_every_argument():
    parser, functions = build_parser()
    for name, func in functions.items():
        assert func.__doc__, name
        sub = parser._subparsers._group_actions[0].choices[name]
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"{name}: argument {action.dest} has no help"


def test_info_reports_pro_1b(capsys):
    assert main(["info", "pro-1b"]) == 0
    out = capsys.readouterr().out
    assert "1,084,453,120" in out and "9 global, 21 sliding (window 512)" in out


def test_bad_input_is_a_clean_error_not_a_traceback():
    result = subprocess.run([sys.executable, "-m", "mobilellm.cli", "info", "pro-7b"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "error: unknown model config 'pro-7b'" in result.stderr and "Traceback" not in result.stderr


def test_convert_folder_to_bfloat16(tmp_path, capsys):
    model = build_model(ModelConfig.from_name("tiny"), seed=0)
    save_pretrained(model, tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--dtype", "bfloat16", "--name", "mine"]) == 0
    loaded = load_pretrained(tmp_path / "dst", dtype=None)
    assert loaded.config.name == "mine" and loaded.embed_tokens.weight.dtype.is_floating_point
    assert str(loaded.embed_tokens.weight.dtype) == "torch.bfloat16"
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "x"), "--dtype", "int3"]) == 2
