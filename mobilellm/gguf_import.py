"""Import a Llama-layout GGUF file (llama.cpp) into our model: config, dequantized weights, tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, ModelConfig
from .hf import CheckpointError, model_from_tensors
from .model import Transformer

# GGUF tensor names (llama.cpp) -> ours, per block.
BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows in interleaved-pair order; undo it for rotate-half RoPE."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_gguf(path: str | Path, name: str | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    import gguf  # optional dependency: the `hf` extra

    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # gguf raises ValueError/struct errors on bad files
        raise CheckpointError(f"cannot read GGUF file {path}: {err}") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ConfigError(f"GGUF architecture {arch!r} is not supported (only llama)")
    heads, kv_heads = _field(reader, "llama.attention.head_count"), _field(reader, "llama.attention.head_count_kv")
    dim, n_layers = _field(reader, "llama.embedding_length"), _field(reader, "llama.block_count")
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        parts = t.name.split(".")
        if parts[0] == "blk":
            kind = parts[2]
            if kind == "attn_q":
                w = _unpermute(w, heads)
            elif kind == "attn_k":
                w = _unpermute(w, kv_heads)
            key = f"layers.{parts[1]}.{BLOCK_NAMES[kind]}.weight"
        else:
            key = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
                   "output.weight": "lm_head.weight"}.get(t.name)
            if key is None:
                raise CheckpointError(f"unexpected GGUF tensor {t.name!r}")
        tensors[key] = torch.from_numpy(np.ascontiguousarray(w))
    vocab = _field(reader, "llama.vocab_size") or tensors["embed_tokens.weight"].shape[0]
    config = ModelConfig(
        name=name or path.stem, vocab_size=int(vocab), dim=int(dim), n_layers=int(n_layers), n_heads=int(heads),
        n_kv_heads=int(kv_heads), ffn_dim=int(_field(reader, "llama.feed_forward_length")),
        head_dim=int(_field(reader, "llama.rope.dimension_count", dim // heads)),
        layer_types=("full_attention",) * int(n_layers),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10_000.0)),
        norm_eps=round(float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)), 10),  # stored as f32
        tie_embeddings="lm_head.weight" not in tensors,
        max_seq_len=int(_field(reader, "llama.context_length", 2048)),
        bos_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_ids=tuple(dict.fromkeys(x for x in (_field(reader, "tokenizer.ggml.eos_token_id"),
                                                 _field(reader, "tokenizer.ggml.eot_token_id")) if x is not None)),
        pad_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )
    return config, tensors


def load_gguf(path: str | Path, dtype: torch.dtype | None = None, name: str | None = None) -> Transformer:
    """The model of a GGUF file, its weights dequantized (float32, or `dtype`)."""
    config, tensors = read_gguf(path, name)
    return model_from_tensors(config, tensors, dtype)


def gguf_tokenizer_files(path: str | Path) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and chat template converted by transformers' GGUF reader.

    Its byte-level builder appends GPT-2's `<|endoftext|>` as the unknown token when the file's vocabulary
    lacks it; an id past the file's token list is dropped, so the tokenizer keeps the file's size."""
    import json
    import tempfile

    import gguf
    from transformers import AutoTokenizer

    path = Path(path)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    n_tokens = len(gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"].data)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        files = {f.name: f.read_text() for f in Path(tmp).iterdir() if f.is_file()}
    spec = json.loads(files["tokenizer.json"])
    extra = [t for t in spec.get("added_tokens", []) if t["id"] >= n_tokens]
    if extra:
        spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < n_tokens]
        files["tokenizer.json"] = json.dumps(spec, ensure_ascii=False)
    return files
