"""Needle in a haystack: prompt construction, scoring, the grid and its heatmap."""

import re

import pytest

from mobilellm.cli import main
from mobilellm.eval.lm import EvalLM
from mobilellm.eval.needle import QUESTION, found, haystack_prompt, needle_grid, save_heatmap
from mobilellm.tokenizer import Tokenizer
from tests.eval_helpers import CORPUS, FIXTURES, tiny_checkpoint

FILLER = " ".join(CORPUS) * 40


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


def test_prompt_length_and_needle_depth(checkpoint):
    tok = Tokenizer.load(checkpoint)
    filler = tok.encode(FILLER)
    needle = "The pass key is 48213. Remember it. 48213 is the pass key."
    n_filler = 200 - len(tok.encode(" " + needle + " ")) - len(tok.encode(QUESTION))
    for depth in (0.0, 0.5, 1.0):
        prompt = haystack_prompt(tok, filler, 200, depth, "48213")
        assert abs(len(tok.encode(prompt)) - 200) <= 4 and prompt.endswith(QUESTION)
        before = prompt[:prompt.index(needle)]
        assert abs(len(tok.encode(before)) - depth * n_filler) <= 2
    assert prompt.endswith(needle + " " + QUESTION)
    with pytest.raises(ValueError, match="fewer than"):
        haystack_prompt(tok, filler[:50], 200, 0.5, "48213")


def test_found_takes_the_first_number():
    assert found(" 48213.", "48213") and not found(" 4821 3", "48213") and not found(" none", "48213")


class ReadsTheKey:
    """Answers with the key when the needle is in the first half of the prompt: a known grid."""
    progress = False
    max_len = 4096

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def generate_until(self, prompt, until, max_new_tokens):
        m = re.search(r"pass key is (\d+)\.", prompt)
        return " " + m.group(1) if m.start() < len(prompt) / 2 else " 0"


def test_grid_and_heatmap(checkpoint, tmp_path):
    grid = needle_grid(ReadsTheKey(Tokenizer.load(checkpoint)), FILLER, [300, 600], [0.0, 0.25, 1.0], trials=2)
    assert grid.accuracy == ((1.0, 1.0), (1.0, 1.0), (0.0, 0.0))
    assert grid.to_dict()["mean"] == pytest.approx(4 / 6)
    save_heatmap(grid, tmp_path / "needle.png")
    assert (tmp_path / "needle.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp*"))


def test_needle_command_on_the_tiny_model(checkpoint, tmp_path, capsys):
    assert main(["needle", str(checkpoint), "--lengths", "50", "--depths", "0,1", "--trials", "1",
                 "--corpus", str(FIXTURES / "perplexity.txt"), "--png", str(tmp_path / "n.png")]) == 2
    assert "no room" in capsys.readouterr().err  # the needle and question alone take ~70 tiny-model tokens
    (tmp_path / "corpus.txt").write_text(FILLER)
    assert main(["needle", str(checkpoint), "--lengths", "100,200", "--depths", "0,1", "--trials", "1",
                 "--corpus", str(tmp_path / "corpus.txt"), "--png", str(tmp_path / "n.png"), "--out", str(tmp_path / "n.json")]) == 0
    assert (tmp_path / "n.png").exists() and "mean" in capsys.readouterr().out
    with pytest.raises(ValueError, match="do not fit"):
        needle_grid(EvalLM.load(checkpoint, progress=False), FILLER, [1000], [0.5])
