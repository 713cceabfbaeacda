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


@pytest.mark.parametrize("name", [None, *COMMANDS])
def test_help_of_every_command_renders(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"] if name is None else [name, "--help"])
    assert exit_.value.code == 0
    assert "usage: mobilellm" in capsys.readouterr().out


def percent_command(rate: str = "5%", *, share: float = 0.1, label: str = "100% %(prog)s %w") -> None:
    """Runs at 100% of a core, %w and %(prog)s kept as written.

    Every 10% of the steps, %(prog)s and %d print as they are.

    Args:
        rate: a rate like 5%
        share: 10% is 0.1
        label: a %s label
    """


def test_percent_signs_anywhere_in_a_docstring_or_default_reach_the_help_as_written(monkeypatch, capsys):
    monkeypatch.setitem(COMMANDS, "percent", "tests.test_cli:percent_command")
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "Runs at 100% of a core, %w and %(prog)s kept as written." in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        main(["percent", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("Every 10% of the steps, %(prog)s and %d print as they are.", "a rate like 5%",
                 "10% is 0.1 (default: 0.1)", "a %s label (default: 100% %(prog)s %w)"):
        assert text in out, text
