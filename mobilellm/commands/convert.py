"""`mobilellm convert`: bring a checkpoint (HF folder or GGUF file) into our format."""

from __future__ import annotations

from pathlib import Path

from ..dtypes import DTYPES
from ..hf import save_pretrained
from ..loading import load


def convert(source: Path, out: Path, *, dtype: str = "float32", name: str | None = None) -> None:
    """Convert a GGUF file or an HF-format folder (Llama, Llama-4-text, MobileLLM-Pro) into a mobilellm checkpoint.

    The output is an HF-format folder (config.json + safetensors + tokenizer) that transformers also reads,
    with mobilellm_config.json as the model's source of truth.

    Args:
        source: a .gguf file or a folder with config.json and safetensors
        out: the folder to write (replaced atomically)
        dtype: float32, bfloat16 or float16
        name: the config name to record (default: the source's name)
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    loaded = load(source, DTYPES[dtype])
    if loaded.quant is not None:
        raise ValueError(f"{source} is quantized ({loaded.quant.scheme} scheme); convert reads full-precision "
                         "checkpoints")
    model = loaded.model
    if name:
        model.config = model.config.replace(name=name)
    save_pretrained(model, out, extra_files=loaded.tokenizer_files)
    print(f"wrote {out} ({model.config.name}, {model.num_parameters():,} parameters, {dtype})")
