"""`mobilellm convert`: bring a checkpoint (HF folder or GGUF file) into our format."""

from __future__ import annotations

from pathlib import Path

import torch

from ..gguf_import import gguf_tokenizer_files, read_gguf
from ..hf import load_pretrained, save_pretrained
from ..model import Transformer
from ..tokenizer import TOKENIZER_FILE, Tokenizer, tokenizer_files

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_any(source: Path, dtype: torch.dtype) -> tuple[Transformer, dict[str, str]]:
    """A model and its tokenizer files from a GGUF file or an HF-format folder."""
    if source.suffix == ".gguf":
        config, tensors = read_gguf(source, name=source.stem)
        with torch.device("meta"):
            model = Transformer(config)
        model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=not config.tie_embeddings, assign=True)
        if config.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        return model, gguf_tokenizer_files(source)
    model = load_pretrained(source, dtype=dtype)
    return model, tokenizer_files(source)


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
    model, tokenizer_files = load_any(source, DTYPES[dtype])
    if name:
        model.config = model.config.replace(name=name)
    if TOKENIZER_FILE in tokenizer_files:
        Tokenizer.from_files(tokenizer_files, origin=str(source)).check_fits(model.config.vocab_size)
    save_pretrained(model, out, extra_files=tokenizer_files)
    print(f"wrote {out} ({model.config.name}, {model.num_parameters():,} parameters, {dtype})")
