"""A model whose Linear/Embedding modules were swapped for packed int4 ones runs through the engine unchanged."""

import pytest
import torch

from mobilellm.config import ModelConfig
from mobilellm.infer.engine import generate, new_cache, prefill_chunks
from mobilellm.model import build_model
from mobilellm.quant import QuantConfig, quantize_
from mobilellm.quant.modules import QuantizedEmbedding, QuantizedLinear


def test_int4_model_cached_decode_equals_its_full_forward():
    model = quantize_(build_model(ModelConfig.from_name("tiny"), seed=0).eval(), QuantConfig.from_scheme("cpu"))
    assert isinstance(model.lm_head, QuantizedLinear) and isinstance(model.embed_tokens, QuantizedEmbedding)
    tokens = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        cached = torch.cat([model.lm_head(h) for h in prefill_chunks(model, tokens, new_cache(model, 64, int8=True),
                                                                    chunk_size=7)], dim=1)
    # the cpu scheme fake-quantizes K/V exactly as the int8 cache stores them: only rounding noise remains
    torch.testing.assert_close(cached, full, atol=1e-3, rtol=1e-3)
    prompt = tokens[0, :12].tolist()
    with torch.no_grad():
        want = model(tokens[:, :12])[0, -1].argmax().item()
    got = list(generate(model, prompt, new_cache(model, 64, int8=True), max_new_tokens=4))
    assert got[0] == want and len(got) == 4


def test_generate_command_runs_a_quantized_checkpoint(tmp_path, capsys):
    from mobilellm.cli import main
    from mobilellm.quant.checkpoint import save_quantized
    from mobilellm.tokenizer import Tokenizer

    scheme = QuantConfig.from_scheme("cpu")
    model = quantize_(build_model(ModelConfig.from_name("tiny").replace(vocab_size=320), seed=0), scheme)
    folder = tmp_path / "int4"
    save_quantized(model, scheme, folder)
    Tokenizer.train_bpe(["hello world, the cat sat on the mat"] * 10, vocab_size=300, show_progress=False).save(folder)
    assert main(["generate", str(folder), "--prompt", "hello", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.slow  # compiling takes ~30 s on a CPU
def test_compiled_int4_decode_gives_the_eager_tokens(tmp_path, capsys):
    from mobilellm.cli import main
    from mobilellm.quant.checkpoint import save_quantized
    from mobilellm.tokenizer import Tokenizer

    scheme = QuantConfig.from_scheme("cpu")
    model = quantize_(build_model(ModelConfig.from_name("tiny").replace(vocab_size=320), seed=0), scheme)
    folder = tmp_path / "int4"
    save_quantized(model, scheme, folder)
    Tokenizer.train_bpe(["hello world, the cat sat on the mat"] * 10, vocab_size=300, show_progress=False).save(folder)
    outputs = []
    for flag in ("--no-compile", "--compile"):
        assert main(["generate", str(folder), "--prompt", "hello", "--max-new-tokens", "8", flag]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]


def test_compiled_int4_decode_compiles_once_across_the_ring_wrap():
    """The compiled step (C++ wrapper, static cache shapes, symbolic position) matches eager decode on the
    same tokens before, at and after the sliding layers' ring wraps (window 8), from one compilation."""
    from torch._dynamo.utils import counters

    from mobilellm.infer.engine import compiled_decode_step, decode_one_token, prefill

    model = quantize_(build_model(ModelConfig.from_name("tiny"), seed=0).eval(), QuantConfig.from_scheme("cpu"))
    step = compiled_decode_step(model)
    eager_cache, compiled_cache = (new_cache(model, max_len=40, int8=True) for _ in range(2))
    prompt = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(0))
    eager = prefill(model, prompt, eager_cache)
    prefill(model, prompt, compiled_cache)
    graphs_before = counters["stats"]["unique_graphs"]
    for _ in range(20):  # positions 4..23: the ring (8 slots) wraps twice
        token = eager.argmax(-1, keepdim=True)
        eager, compiled = decode_one_token(model, token, eager_cache), step(model, token, compiled_cache)
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] - graphs_before == 1


@pytest.mark.parametrize("quantized", [False, True])
def test_fused_projections_decode_like_separate_ones(quantized):
    """q/k/v and gate/up fused into one matrix each (what generate runs): the same logits, exactly for int4
    (every output row is computed alone from the same quantized activations)."""
    import copy

    model = build_model(ModelConfig.from_name("tiny"), seed=0).eval()
    if quantized:
        model = quantize_(model, QuantConfig.from_scheme("cpu"))
    fused = copy.deepcopy(model).fuse_projections()
    assert not hasattr(fused.layers[0].self_attn, "q_proj") and not hasattr(fused.layers[0].mlp, "up_proj")
    tokens = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    runs = []
    for m in (model, fused):
        cache = new_cache(m, max_len=32, int8=quantized)
        runs.append(list(generate(m, tokens[0, :10], cache, max_new_tokens=12)))
        runs.append(m(tokens))
    assert runs[0] == runs[2]
    if quantized:
        assert torch.equal(runs[1], runs[3])
    else:
        torch.testing.assert_close(runs[1], runs[3], rtol=1e-5, atol=1e-5)


def test_only_matching_int4_linears_concatenate():
    from mobilellm.quant.modules import QuantizedLinear

    a = QuantizedLinear(torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4, 1), 32, True)
    b = QuantizedLinear(torch.zeros(4, 32, dtype=torch.uint8), torch.ones(4, 2), 32, True)
    with pytest.raises(ValueError, match="same input size"):
        QuantizedLinear.concatenate([a, b])
