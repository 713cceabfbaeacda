"""GGUF export (mobilellm export --format gguf): written, read back through our GGUF loader, compared.

References: the exported model's own logits (F32 exact, F16 / Q8_0 close), our dequantized int4 weights
(an int4 model's Q4_0 must dequantize to exactly them), the tokenizer's own ids and chat template.
"""

import pytest
import torch

from mobilellm.config import ModelConfig
from mobilellm.gguf_export import ExportError, llama_cpp_gaps, write_gguf
from mobilellm.gguf_import import load_gguf, read_gguf
from mobilellm.infer.engine import generate, new_cache
from mobilellm.model import build_model
from mobilellm.quant import QuantConfig, quantize_
from mobilellm.quant.modules import QuantizedEmbedding, QuantizedLinear
from mobilellm.tokenizer import Tokenizer

pytest.importorskip("gguf", reason="GGUF export needs the gguf package (the hf extra)")

TEXT = ["hello world, the cat sat on the mat; 12 dogs ran past 345 trees"] * 20
CONFIG = ModelConfig.from_name("tiny-llama").replace(vocab_size=320)  # rows past the tokenizer: padding


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_bpe(TEXT, vocab_size=300, show_progress=False)


@pytest.fixture(scope="module")
def model():
    return build_model(CONFIG, seed=0).eval()


TOKENS = torch.randint(0, 280, (1, 24), generator=torch.Generator().manual_seed(0))


def greedy(model, prompt, n=12):
    with torch.no_grad():
        return list(generate(model, prompt, new_cache(model, 64), max_new_tokens=n))


def roundtrip(model, tokenizer, tmp_path, type, **kw):
    path = write_gguf(model, tokenizer, tmp_path / f"m.{type}.gguf", type, progress=False, **kw)
    return path, load_gguf(path).eval()


def test_f32_roundtrip_is_exact(model, tokenizer, tmp_path):
    _, back = roundtrip(model, tokenizer, tmp_path, "f32")
    assert back.config.vocab_size == 320 and back.config.head_dim == CONFIG.head_dim
    with torch.no_grad():
        assert torch.equal(back(TOKENS), model(TOKENS))  # the q/k permutation is undone exactly


@pytest.mark.parametrize("type, tolerance", [("f16", 1e-3), ("q8_0", 0.01)])
def test_float_types_roundtrip_close(model, tokenizer, tmp_path, type, tolerance):
    _, back = roundtrip(model, tokenizer, tmp_path, type)
    with torch.no_grad():
        ours, theirs = model(TOKENS), back(TOKENS)
    assert (theirs - ours).abs().max() < tolerance * ours.abs().max()
    assert greedy(back, TOKENS[0].tolist()) == greedy(model, TOKENS[0].tolist())


def test_q4_types_store_gguf_reference_quantization(model, tokenizer, tmp_path):
    import gguf

    for type in ("q4_0", "q4_1"):
        path, _ = roundtrip(model, tokenizer, tmp_path, type)
        _, tensors = read_gguf(path)
        w = model.layers[0].mlp.down_proj.weight.detach().float().numpy()
        qtype = gguf.GGMLQuantizationType[type.upper()]
        expected = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
        assert torch.equal(tensors["layers.0.mlp.down_proj.weight"], torch.from_numpy(expected))


def test_interleaved_rope_llama_is_written_unpermuted(tokenizer, tmp_path):
    interleaved = build_model(CONFIG.replace(rope_layout="interleaved"), seed=1).eval()
    _, back = roundtrip(interleaved, tokenizer, tmp_path, "f32")
    assert back.config.rope_layout == "half"  # the importer's layout, the same model
    with torch.no_grad():
        torch.testing.assert_close(back(TOKENS), interleaved(TOKENS), atol=1e-5, rtol=1e-5)


def test_int4_model_becomes_q4_0_with_its_own_values(tokenizer, tmp_path):
    scheme = QuantConfig.from_scheme("cpu")
    int4 = quantize_(build_model(CONFIG, seed=0), scheme).eval()
    path, back = roundtrip(int4, tokenizer, tmp_path, "q4_0")
    modules = {n: m for n, m in int4.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}
    assert len(modules) == 1 + 7 * CONFIG.n_layers + 1  # embedding, 7 per block, the shared head
    for name, module in modules.items():
        if isinstance(module, QuantizedEmbedding):
            ours = module(torch.arange(module.num_embeddings))
        else:
            ours = module.dequantized_weight()
        assert torch.equal(back.get_submodule(name).weight, ours), name
    # a float model of our dequantized weights: the GGUF's model computes exactly it
    float_twin = build_model(CONFIG, seed=0).eval()
    with torch.no_grad():
        for name, module in modules.items():
            float_twin.get_submodule(name).weight.copy_(back.get_submodule(name).weight)
        assert torch.equal(back(TOKENS), float_twin(TOKENS))
    import gguf

    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert {types[n] for n in types if n.endswith("norm.weight")} == {"F32"}
    assert {types[n] for n in types if not n.endswith("norm.weight")} == {"Q4_0"} and "output.weight" not in types


def test_tokenizer_and_chat_template_survive(model, tokenizer, tmp_path):
    from mobilellm.gguf_import import gguf_tokenizer_files

    pytest.importorskip("transformers", reason="our GGUF tokenizer import goes through transformers")
    path, _ = roundtrip(model, tokenizer, tmp_path, "q8_0")
    back = Tokenizer.from_files(gguf_tokenizer_files(path))
    for text in (TEXT[0], "the mat 6789 sat", "<|im_start|>user\nhi<|im_end|>"):
        assert back.encode(text) == tokenizer.encode(text)
    assert back.bos_token == tokenizer.bos_token and back.eos_tokens[0] == tokenizer.eos_tokens[0]
    assert back.chat_template == tokenizer.chat_template
    config, _ = read_gguf(path)
    assert config.eos_ids == tuple(tokenizer.eos_ids)  # eos and end-of-turn


def test_layouts_llama_cpp_cannot_run_are_refused(tokenizer, tmp_path):
    gaps = " ".join(llama_cpp_gaps(ModelConfig.from_name("pro-1b")))
    assert "sliding-window" in gaps and "window 512" in gaps
    r1 = " ".join(llama_cpp_gaps(ModelConfig.from_name("r1-140m")))
    assert "L2 norm" in r1
    assert llama_cpp_gaps(ModelConfig.from_name("smollm2-135m")) == []
    with pytest.raises(ExportError, match="sliding-window layers"):
        write_gguf(build_model(ModelConfig.from_name("tiny"), seed=0), tokenizer, tmp_path / "t.gguf", progress=False)
    assert not (tmp_path / "t.gguf").exists()


def test_bad_requests_are_refused(model, tokenizer, tmp_path):
    with pytest.raises(ExportError, match="context 4096 is past the model's 256"):
        write_gguf(model, tokenizer, tmp_path / "a.gguf", context=4096, progress=False)
    with pytest.raises(ExportError, match="unknown GGUF type 'q3_k'"):
        write_gguf(model, tokenizer, tmp_path / "a.gguf", "q3_k", progress=False)
    int4 = quantize_(build_model(CONFIG, seed=0), QuantConfig.from_scheme("cpu")).eval()
    with pytest.raises(ExportError, match="int4: q8_0 would round its weights a second time"):
        write_gguf(int4, tokenizer, tmp_path / "a.gguf", "q8_0", progress=False)
    accelerator = quantize_(build_model(CONFIG, seed=0), QuantConfig.from_scheme("accelerator")).eval()
    with pytest.raises(ExportError, match="float32 scales are not float16 values"):
        write_gguf(accelerator, tokenizer, tmp_path / "a.gguf", "q4_0", progress=False)
    assert not (tmp_path / "a.gguf").exists()  # nothing half-written


def test_export_command_writes_a_file_our_loader_generates_with(model, tokenizer, tmp_path, capsys):
    from mobilellm.cli import main
    from mobilellm.hf import save_pretrained
    from mobilellm.loading import load

    pytest.importorskip("transformers", reason="our GGUF tokenizer import goes through transformers")
    folder = tmp_path / "ckpt"
    save_pretrained(model, folder)
    assert main(["export", str(folder), "--format", "gguf", "--type", "q8_0"]) == 2  # no tokenizer yet
    assert "no tokenizer.json" in capsys.readouterr().err
    tokenizer.save(folder)
    out = tmp_path / "ckpt.Q8_0.gguf"
    assert main(["export", str(folder), "--type", "q8_0", "--out", str(out)]) == 0
    loaded = load(out)
    prompt = tokenizer.encode("hello world, the cat", bos=True)
    assert loaded.tokenizer.encode("hello world, the cat", bos=True) == prompt
    assert greedy(loaded.model.eval(), prompt) == greedy(model, prompt)
    assert main(["export", str(folder), "--format", "onnx"]) == 2
    assert "unknown export format 'onnx'" in capsys.readouterr().err


@pytest.mark.slow
def test_real_smollm2_roundtrips(smollm2_dir, tmp_path):
    """SmolLM2-135M: Q8_0 generates our greedy tokens; its int4 (cpu scheme) Q4_0 holds exactly our weights."""
    from mobilellm.loading import load

    pytest.importorskip("transformers", reason="our GGUF tokenizer import goes through transformers")
    ours = load(smollm2_dir)
    prompt = ours.tokenizer.encode("The capital of France is", bos=True)
    path = write_gguf(ours.model.eval(), ours.tokenizer, tmp_path / "smollm2.Q8_0.gguf", "q8_0", progress=False)
    back = load(path)
    assert back.tokenizer.encode("The capital of France is", bos=True) == prompt
    assert greedy(back.model.eval(), prompt, 16) == greedy(ours.model, prompt, 16)
    int4 = quantize_(ours.model, QuantConfig.from_scheme("cpu")).eval()
    path = write_gguf(int4, ours.tokenizer, tmp_path / "smollm2.Q4_0.gguf", "q4_0", progress=False)
    _, tensors = read_gguf(path)
    head = int4.layers[3].self_attn.k_proj
    assert torch.equal(tensors["layers.3.self_attn.k_proj.weight"], head.dequantized_weight())
