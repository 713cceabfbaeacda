"""Export a Llama-layout model to GGUF (llama.cpp): weights, tokenizer and chat template in one file.

    write_gguf(model, tokenizer, "model.Q8_0.gguf", "q8_0")

Weights of a full-precision model are written as F32, F16, Q8_0, Q4_0 or Q4_1 (gguf's reference
quantizers, which round as llama.cpp's do). A converted int4 model is written as Q4_0 without re-quantizing:
our packed bytes are Q4_0's nibbles (value + 8; byte i of each 32-column block holds columns i and i + 16)
and our fp16 scale is its `d`, so llama.cpp computes with exactly our int4 weights (its activations are
quantized per 32-block to 8 bits, ours per token: close, not bit-equal). Any other type would round
weights that are already rounded, and is refused.

llama.cpp's `llama` architecture is one RoPE, full causal attention in every layer: a model with sliding or
chunked layers, NoPE layers, q/k norms or attention temperature tuning is refused, naming what it lacks
(`llama_cpp_gaps`). Its architectures with per-layer sliding windows (gemma2/3, cohere2, gpt-oss, ...)
compute other blocks (scaled embeddings, GeGLU, extra norms, sinks), and its `llama4` architecture
hard-codes Llama 4's mixture-of-experts layers, an 8192-token chunk and every fourth layer global.

Tensors are converted and written one at a time (the header first, from their shapes), so the peak
memory is the model plus one converted tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .atomic import atomic_file
from .config import ModelConfig
from .errors import UserError
from .gguf_import import BLOCK_NAMES
from .model import RMSNorm, Transformer
from .quant.math import INT4_MIN, PACK_BLOCK, dequantize_int4, unpack_int4
from .quant.modules import QuantizedEmbedding, QuantizedLinear
from .tokenizer import Tokenizer

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")
BLOCK = 32  # the block of every GGUF type exported here
BLOCK_TENSORS = {ours: theirs for theirs, ours in BLOCK_NAMES.items()}  # ours -> llama.cpp, per block


class ExportError(UserError):
    """A model, scheme or tokenizer the export format cannot carry."""


def llama_cpp_gaps(config: ModelConfig) -> list[str]:
    """What llama.cpp's `llama` architecture lacks to run this model (empty: it runs it)."""
    gaps = []
    kinds = sorted(set(config.layer_types) - {"full_attention"})
    if "sliding_attention" in kinds:
        gaps.append(f"sliding-window layers (window {config.sliding_window}; its llama architecture attends "
                    "over the whole context in every layer)")
    if "chunked_attention" in kinds:
        gaps.append(f"chunked-attention layers (chunk {config.attention_chunk_size}; only its llama4 architecture "
                    "has them, fixed at 8192 tokens and tied to mixture-of-experts layers)")
    gaps += [f"{kind} layers" for kind in kinds if kind not in ("sliding_attention", "chunked_attention")]
    if config.rope_layers is not None and not all(config.rope_layers):
        gaps.append("NoPE layers (it applies RoPE in every layer)")
    if config.qk_norm:
        gaps.append("the L2 norm of queries and keys")
    if config.attn_temperature_tuning:
        gaps.append("attention temperature tuning")
    return gaps


def _gguf_type(name: str):
    import gguf  # optional dependency: the `hf` extra

    if name not in GGUF_TYPES:
        raise ExportError(f"unknown GGUF type {name!r}; expected one of {', '.join(GGUF_TYPES)}")
    return gguf.GGMLQuantizationType[name.upper()]


# ---- tensors ---------------------------------------------------------------------------------------

def _permute(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows from rotate-half order into llama.cpp's interleaved pairs (what convert_hf_to_gguf does)."""
    return rows.reshape(n_heads, 2, rows.shape[0] // n_heads // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def _weights(model: Transformer) -> Iterator[tuple[str, nn.Module | torch.Tensor, int | None]]:
    """(GGUF name, module or norm weight, heads to permute its rows over or None) in llama.cpp's order."""
    cfg = model.config
    permute = cfg.rope_layout == "half"  # llama.cpp's rope pairs neighbours: HF Llama's halves get permuted
    yield "token_embd.weight", model.embed_tokens, None
    for i, layer in enumerate(model.layers):
        for ours, theirs in BLOCK_TENSORS.items():
            module = layer.get_submodule(ours)
            heads = {"attn_q": cfg.n_heads, "attn_k": cfg.n_kv_heads}.get(theirs) if permute else None
            yield f"blk.{i}.{theirs}.weight", module.weight if isinstance(module, RMSNorm) else module, heads
    yield "output_norm.weight", model.norm.weight, None
    if not cfg.tie_embeddings:
        yield "output.weight", model.lm_head, None


def _int4_rows(source) -> tuple[torch.Tensor, torch.Tensor] | None:
    return source.int4_rows() if isinstance(source, (QuantizedLinear, QuantizedEmbedding)) else None


def _float_rows(source) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        return source.detach().float()
    packed = _int4_rows(source)
    if packed is not None:
        return dequantize_int4(unpack_int4(packed[0]), packed[1])
    return source.weight.detach().float()


def _q4_0_blocks(packed: torch.Tensor, scales: torch.Tensor, name: str) -> np.ndarray:
    """Q4_0 bytes (N, K/32 * 18) of int4 rows: each block its fp16 scale, then our 16 packed bytes as they are."""
    n, k = packed.shape[0], packed.shape[1] * 2
    group = k // scales.shape[1]
    if group % BLOCK:
        raise ExportError(f"{name}: int4 groups of {group} columns do not split into Q4_0's blocks of {BLOCK}")
    if not torch.equal(scales.half().float(), scales.float()):
        raise ExportError(f"{name}: its {scales.dtype} scales are not float16 values, and Q4_0 stores float16 "
                          "scales: export the full-precision checkpoint instead")
    d = scales.half().repeat_interleave(group // BLOCK, dim=1).reshape(n, k // BLOCK, 1)  # (N, K/32, 1)
    qs = packed.reshape(n, k // BLOCK, PACK_BLOCK // 2)  # (N, K/32, 16): value - INT4_MIN = Q4_0's nibble
    assert INT4_MIN == -8 and PACK_BLOCK == BLOCK  # the layout facts the byte copy relies on
    return torch.cat([d.view(torch.uint8), qs], dim=-1).reshape(n, -1).numpy()


def _encode(source, name: str, qtype, heads: int | None) -> np.ndarray:
    """The tensor's GGUF data: `qtype` blocks as bytes, or float32 / float16 values (norms: float32)."""
    import gguf

    int4 = _int4_rows(source)
    if int4 is not None and qtype == gguf.GGMLQuantizationType.Q4_0:
        packed, scales = int4
        if heads is not None:
            packed, scales = _permute(packed, heads), _permute(scales, heads)
        return _q4_0_blocks(packed, scales, name)
    w = _float_rows(source)
    if w.ndim == 1:  # norms stay float32, as in every llama.cpp file
        return w.numpy()
    if heads is not None:
        w = _permute(w, heads)
    if qtype == gguf.GGMLQuantizationType.F32:
        return w.numpy()
    if qtype == gguf.GGMLQuantizationType.F16:
        return w.half().numpy()
    if w.shape[1] % BLOCK:
        raise ExportError(f"{name}: {w.shape[1]} columns are not a multiple of {qtype.name}'s block of {BLOCK}")
    return gguf.quants.quantize(w.numpy(), qtype)


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    return int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, qtype))) if qtype.name.startswith("Q") \
        else int(np.prod(shape)) * (2 if qtype.name == "F16" else 4)


# ---- metadata --------------------------------------------------------------------------------------

def _pre_tokenizer(spec: dict | None, origin: str) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer (the regex it splits text with)."""
    def byte_level(p):
        return p.get("type") == "ByteLevel" and p.get("use_regex", True)
    if spec and byte_level(spec):
        return "gpt-2"  # llama.cpp spells it with a hyphen
    steps = spec.get("pretokenizers", []) if spec and spec.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") \
            and byte_level(steps[1]):
        return "smollm"  # single digits, then GPT-2's regex
    raise ExportError(f"{origin}: llama.cpp has no pre-tokenizer known to equal {json.dumps(spec)}; "
                      "GGUF export covers GPT-2-style byte-level BPE (optionally splitting digits)")


def _add_tokenizer(writer, tokenizer: Tokenizer, vocab_size: int) -> None:
    import gguf

    spec = json.loads(tokenizer.backend.to_str())
    if spec["model"].get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError(f"{tokenizer.origin}: GGUF export covers byte-level BPE tokenizers (GPT-2 style); this one "
                          f"is {spec['model'].get('type')} with a {(spec.get('decoder') or {}).get('type')} decoder")
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # rows past the tokenizer: padding, as convert_hf_to_gguf
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec.get("pre_tokenizer"), tokenizer.origin))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_add_bos_token(tokenizer.bos_id is not None)  # our engine prepends it to a plain prompt
    if tokenizer.eos_ids:
        writer.add_eos_token_id(tokenizer.eos_ids[0])
    if len(tokenizer.eos_ids) > 1:
        writer.add_eot_token_id(tokenizer.eos_ids[1])
    if tokenizer.pad_id is not None:
        writer.add_pad_token_id(tokenizer.pad_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _add_hparams(writer, cfg: ModelConfig, context: int, file_type: int) -> None:
    import gguf

    writer.add_name(cfg.name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(context)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)


FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7}  # gguf.LlamaFileType


def write_gguf(model: Transformer, tokenizer: Tokenizer, path: str | Path, type: str = "q8_0",
               context: int | None = None, progress: bool = True) -> Path:
    """Write `model` (float or int4) with `tokenizer` as one GGUF file (atomically) that llama.cpp runs.

    `type`: f32, f16, q8_0, q4_0 or q4_1 for the matrices (norms stay f32); an int4 model takes q4_0 (exact)
    or f32. `context`: the context length recorded (default and at most the model's max_seq_len)."""
    import gguf
    from gguf.gguf_writer import WriterState

    cfg = model.config
    qtype = _gguf_type(type)
    gaps = llama_cpp_gaps(cfg)
    if gaps:
        raise ExportError(f"llama.cpp cannot run {cfg.name!r} as a GGUF llama model: it lacks " + "; ".join(gaps))
    context = cfg.max_seq_len if context is None else context
    if not 0 < context <= cfg.max_seq_len:
        raise ExportError(f"context {context} is past the model's {cfg.max_seq_len} tokens (its RoPE is unscaled); "
                          f"give --context up to {cfg.max_seq_len}")
    int4 = any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in model.modules())
    if int4 and type not in ("q4_0", "f32"):
        raise ExportError(f"the model is int4: {type} would round its weights a second time; export it as q4_0 "
                          "(exact) or f32, or export its full-precision checkpoint")
    writer = gguf.GGUFWriter(None, "llama")
    _add_hparams(writer, cfg, context, FILE_TYPES[type])
    _add_tokenizer(writer, tokenizer, cfg.vocab_size)
    plan = list(_weights(model))
    for name, source, _ in plan:  # the header lists every tensor's type and size before any data
        shape = _shape(source)
        tensor_type = gguf.GGMLQuantizationType.F32 if len(shape) == 1 else qtype
        writer.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, tensor_type), tensor_type)
    with torch.no_grad(), atomic_file(path, "wb") as fh:
        writer.fout, writer.state = [fh], WriterState.EMPTY  # GGUFWriter writes into our atomic file
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, source, heads in tqdm(plan, desc=f"GGUF {type}", unit="tensor", disable=not progress):
            writer.write_tensor_data(_encode(source, name, qtype, heads))
        writer.fout = None  # atomic_file syncs and closes it
    return Path(path)


def _shape(source) -> tuple[int, ...]:
    if isinstance(source, torch.Tensor):
        return tuple(source.shape)
    if isinstance(source, QuantizedLinear):
        return source.out_features, source.in_features
    if isinstance(source, QuantizedEmbedding):
        return source.num_embeddings, source.embedding_dim
    return tuple(source.weight.shape)
