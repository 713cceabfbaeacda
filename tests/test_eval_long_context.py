"""Long-context evaluation: loss by position against a full-logits reference, the RULER single-needle prompt
(lm-eval's niah_single_1 text, the needle at its depth, the length), greedy scoring equal to greedy decoding,
a grid past the model's context, and the loss-by-position command."""

import ast
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from mobilellm.config import ModelConfig
from mobilellm.eval.long_context import (RULER_HAYSTACK, RULER_INSTRUCTION, RULER_NEEDLE, RULER_QUESTION,
                                         bucket_edges, greedy_hit, loss_by_position, retrieval_grid, ruler_prompt)
from mobilellm.infer.engine import generate, new_cache
from mobilellm.infer.sampling import SamplingConfig
from mobilellm.model import build_model
from mobilellm.tokenizer import Tokenizer
from tests.train_common import one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def smollm2_model(smollm2_dir):
    """A tiny random model over SmolLM2's real tokenizer (vocab 49,152), with a 128-token context."""
    config = ModelConfig.from_name("tiny-llama").replace(vocab_size=49_152, max_seq_len=128)
    return build_model(config, seed=0).eval(), Tokenizer.load(smollm2_dir)


def test_bucket_edges():
    assert bucket_edges(1024, 4) == (0, 256, 512, 768, 1024)
    assert bucket_edges(1024, 4, "log") == (0, 128, 256, 512, 1024)
    with pytest.raises(ValueError, match="buckets must be in"):
        bucket_edges(8, 9)


def test_loss_by_position_equals_the_full_logits_reference():
    model = build_model(ModelConfig.from_name("tiny-llama"), seed=0).eval()
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, size=n) for n in (41, 60)]
    curve = loss_by_position(model, docs, length=40, buckets=4)
    with torch.no_grad():
        nll = torch.stack([torch.nn.functional.cross_entropy(model(torch.tensor(d[None, :40]))[0],
                                                             torch.tensor(d[1:41]), reduction="none") for d in docs])
    expected = [nll[:, a:b].mean().item() for a, b in ((0, 10), (10, 20), (20, 30), (30, 40))]
    assert curve.edges == (0, 10, 20, 30, 40) and curve.documents == 2
    np.testing.assert_allclose(curve.loss, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="1 of 2 documents have fewer than 60 tokens"):
        loss_by_position(model, docs, length=59)


def test_ruler_prompt_follows_lm_eval_and_places_the_needle(smollm2_model):
    _, tok = smollm2_model
    for length, depth in ((300, 0.0), (300, 0.5), (700, 1.0)):
        prompt, answer = ruler_prompt(tok, length, depth, "quiet-river", "1234567")
        text = tok.decode(prompt)
        assert length - 30 < len(prompt) + len(answer) <= length
        assert text.startswith("A special magic number is hidden within the following text.")
        assert text.endswith("The special magic number for quiet-river mentioned in the provided text is")
        needle = "One of the special magic numbers for quiet-river is: 1234567."
        before, after = text.split(needle)
        share = before.count("The grass is green.") / text.count("The grass is green.")
        assert abs(share - depth) < 0.06
        assert tok.decode(answer) == " 1234567"
    # lm-eval's niah_single_1, read from its source (importing it needs wonderwords and nltk): the template with
    # the single-needle replacements, the needle and the "repeat" haystack.
    constants = lm_eval_ruler_strings()
    single = constants["TEMPLATE"].replace("Some", "A").replace("are all", "is").replace("are", "is").format(
        type_needle_v="number", context="{context}", query="{key}")
    assert single == RULER_INSTRUCTION + "{context}" + RULER_QUESTION.split(" The special")[0]
    assert constants["NEEDLE"].format(type_needle_v="numbers", key="{key}", value="{value}") == RULER_NEEDLE
    assert RULER_HAYSTACK in constants["haystack"]


def lm_eval_ruler_strings() -> dict:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None:
        pytest.skip("lm-eval is not installed")
    folder = Path(spec.origin).parent / "tasks" / "ruler"
    strings = {}
    for name in ("niah_utils.py", "prepare_niah.py"):
        for node in ast.walk(ast.parse((folder / name).read_text())):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        strings.setdefault(target.id, node.value.value)
    return strings


def test_greedy_scoring_equals_greedy_decoding(smollm2_model):
    model, tok = smollm2_model
    prompt, _ = ruler_prompt(tok, 100, 0.5, "quiet-river", "1234567")
    decoded = list(generate(model, prompt, new_cache(model), max_new_tokens=3, sampling=SamplingConfig(temperature=0)))
    assert greedy_hit(model, prompt, decoded)
    assert not greedy_hit(model, prompt, decoded[:2] + [(decoded[2] + 1) % 49_152])


def test_the_retrieval_grid_reaches_past_the_context(smollm2_model):
    model, tok = smollm2_model
    grid = retrieval_grid(model, tok, lengths=[100, 200], depths=[0.0, 1.0], trials=2)  # 200 > the 128 context
    assert len(grid.accuracy) == 2 and all(len(row) == 2 for row in grid.accuracy)
    assert all(0 <= v <= 1 for row in grid.accuracy for v in row)  # a random model: whatever it scores, in range
    with pytest.raises(ValueError, match="no room for the haystack"):
        ruler_prompt(tok, 40, 0.5, "quiet-river", "1234567")
