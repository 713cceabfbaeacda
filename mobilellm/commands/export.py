"""`mobilellm export`: a checkpoint as one file an on-device runtime reads (GGUF for llama.cpp)."""

from __future__ import annotations

from pathlib import Path

from ..gguf_export import GGUF_TYPES, ExportError, write_gguf
from ..loading import load

FORMATS = ("gguf",)


def export(checkpoint: str, *, format: str = "gguf", type: str = "q8_0", out: Path | None = None,
           context: int | None = None) -> None:
    """Export a checkpoint for llama.cpp (GGUF), with its tokenizer and chat template inside.

    Llama-layout models only (full attention in every layer, RoPE everywhere): a local/global or Llama-4
    layout is refused, naming what llama.cpp lacks. An int4 checkpoint (mobilellm quantize / qat, cpu
    scheme) is written as Q4_0 with its own int4 values and scales, not re-quantized.

    Args:
        checkpoint: a checkpoint folder (full precision or int4), a .gguf file, or smollm2-135m
        format: gguf
        type: the matrices' GGUF type: f32, f16, q8_0, q4_0 or q4_1 (an int4 checkpoint: q4_0 or f32)
        out: the file to write (default: CHECKPOINT-NAME.TYPE.gguf in the current folder)
        context: the context length llama.cpp is told (default and at most the model's own)
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; expected one of {', '.join(FORMATS)}")
    if type not in GGUF_TYPES:
        raise ExportError(f"unknown GGUF type {type!r}; expected one of {', '.join(GGUF_TYPES)}")
    loaded = load(checkpoint, require_tokenizer=True)
    out = out or Path(f"{loaded.source.stem if loaded.source.is_file() else loaded.source.name}.{type.upper()}.gguf")
    path = write_gguf(loaded.model.eval(), loaded.tokenizer, out, type, context=context)
    print(f"{loaded.source} -> {path}: GGUF {type}, {path.stat().st_size / 1e6:.1f} MB")
