"""A table of broken inputs walked through every command that reads them: each ends in one line naming the
file, field or flag, a non-zero exit, and no traceback."""

import json
import shutil

import pytest

from eval_helpers import tiny_checkpoint
from mobilellm.cli import main
from mobilellm.config import CONFIG_FILE, ModelConfig
from mobilellm.hf import save_pretrained
from mobilellm.model import build_model
from mobilellm.tokenizer import Tokenizer
from mobilellm.train.checkpoint import CHECKPOINTS, nothing_to_resume


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("bad") / "ckpt")


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def hf_only(folder):  # the converter's path: config.json alone
    (folder / CONFIG_FILE).unlink()


def no_ffn_field(folder):
    hf_only(folder)
    edit_json(folder / "config.json", lambda d: d.pop("intermediate_size_mlp", None) or d.pop("intermediate_size"))


def config_not_object(folder):
    hf_only(folder)
    (folder / "config.json").write_text("[1, 2, 3]")


def broken_config_beside_ours(folder):
    (folder / "config.json").write_text('{"model_type": "llama", ')


def wrong_type_in_ours(folder):
    edit_json(folder / CONFIG_FILE, lambda d: d.update(dim="64"))


def ours_not_json(folder):
    (folder / CONFIG_FILE).write_text("not json at all")


def tokenizer_config_not_json(folder):
    (folder / "tokenizer_config.json").write_text("{bos_token: <s>")


def tokenizer_config_bad_field(folder):
    edit_json(folder / "tokenizer_config.json", lambda d: d.update(bos_token=7))


def refused_template(folder):  # the sandboxed renderer refuses attribute access to internals
    (folder / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")


def template_syntax_error(folder):
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }")


def much_larger_model(folder):
    """The model's table has 1,024 rows, its tokenizer 300 ids: another model's tokenizer."""
    config = ModelConfig.load(folder)
    tokenizer = Tokenizer.load(folder)
    save_pretrained(build_model(config.replace(vocab_size=1024), seed=0), folder)
    tokenizer.save(folder)


def special_id_not_covered(folder):
    """A model whose eos id (290, not a token the tokenizer has when it has fewer) lies past the tokenizer."""
    config = ModelConfig.load(folder)
    tokenizer = Tokenizer.load(folder)
    save_pretrained(build_model(config.replace(vocab_size=config.vocab_size + 8,
                                               eos_ids=(config.vocab_size + 3,)), seed=0), folder)
    tokenizer.save(folder)


GEN = ["generate", "{ckpt}", "--prompt", "hello", "--max-new-tokens", "2"]
CASES = [  # (breaks the folder, command line, what the message must name)
    (no_ffn_field, GEN, ["config.json", "intermediate_size"]),
    (no_ffn_field, ["convert", "{ckpt}", "{out}"], ["config.json", "intermediate_size"]),
    (no_ffn_field, ["quantize", "{ckpt}", "--scheme", "cpu", "--out", "{out}"], ["config.json", "intermediate_size"]),
    (no_ffn_field, ["info", "{ckpt}"], ["config.json", "intermediate_size"]),
    (config_not_object, GEN, ["config.json", "JSON object"]),
    (config_not_object, ["convert", "{ckpt}", "{out}"], ["config.json", "JSON object"]),
    (broken_config_beside_ours, GEN, ["config.json", "not valid JSON"]),
    (broken_config_beside_ours, ["convert", "{ckpt}", "{out}"], ["config.json", "not valid JSON"]),
    (wrong_type_in_ours, GEN, [CONFIG_FILE, "'dim'", "integer"]),
    (wrong_type_in_ours, ["info", "{ckpt}"], [CONFIG_FILE, "'dim'"]),
    (ours_not_json, ["quantize", "{ckpt}", "--scheme", "cpu", "--out", "{out}"], [CONFIG_FILE, "not valid JSON"]),
    (tokenizer_config_not_json, GEN, ["tokenizer_config.json", "not valid JSON"]),
    (tokenizer_config_not_json, ["convert", "{ckpt}", "{out}"], ["tokenizer_config.json"]),
    (tokenizer_config_not_json, ["eval", "{ckpt}", "--tasks", "perplexity"], ["tokenizer_config.json"]),
    (tokenizer_config_bad_field, GEN, ["tokenizer_config.json", "'bos_token'"]),
    (None, ["generate", "{ckpt}", "--prompt", "hi", "--max-new-tokens", "-5"], ["--max-new-tokens", ">= 0"]),
    (None, ["generate", "{ckpt}", "--prompt", "hi", "--max-new-tokens", "many"], ["--max-new-tokens", "integer"]),
    (refused_template, GEN + ["--chat"], ["chat template", "SecurityError", "chat_template.jinja"]),
    (template_syntax_error, GEN + ["--chat"], ["chat template", "TemplateSyntaxError"]),
    (much_larger_model, GEN, ["wrong tokenizer", "more than padding"]),
    (special_id_not_covered, GEN, ["wrong tokenizer", "special token ids"]),
    (no_ffn_field, ["merge", "{ckpt}", "{ckpt}", "--out", "{out}"], ["config.json", "intermediate_size"]),
    (wrong_type_in_ours, ["merge", "{ckpt}", "{ckpt}", "--out", "{out}"], [CONFIG_FILE, "'dim'"]),
    (wrong_type_in_ours, ["serve", "{ckpt}", "--port", "0"], [CONFIG_FILE, "'dim'"]),
    (tokenizer_config_not_json, ["serve", "{ckpt}", "--port", "0"], ["tokenizer_config.json"]),
]


@pytest.mark.parametrize("breaks, argv, names", CASES,
                         ids=[f"{c[0].__name__ if c[0] else 'flag'}-{c[1][0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_ends_in_one_named_line(breaks, argv, names, pristine, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    shutil.copytree(pristine, folder)
    if breaks is not None:
        breaks(folder)
    code = main([a.format(ckpt=folder, out=tmp_path / "out") for a in argv])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("mobilellm"), err
    for name in names:
        assert name in err, (name, err)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_results_and_manifest_files_are_named(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text('{"tasks": {}}')
    b.write_text('["not", "results"]')
    assert main(["eval-compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "b.json" in err and "JSON object" in err
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text('{"format": 3, "dtype": "uint16", "tokenizer": {}, "val_fraction": 0.1, "domains": {}}')
    from mobilellm.data.shards import read_manifest
    from mobilellm.errors import UserError
    with pytest.raises(UserError, match="manifest.json: field .format. must be a string"):
        read_manifest(tmp_path / "shards")


def test_a_resume_that_finds_only_a_partial_checkpoint_says_so(tmp_path):
    (tmp_path / CHECKPOINTS / ".step_0000010.partial").mkdir(parents=True)
    line = nothing_to_resume(tmp_path)
    assert ".step_0000010.partial" in line and "interrupted" in line and "step 0" in line
    assert "no checkpoint" in nothing_to_resume(tmp_path / "elsewhere")
