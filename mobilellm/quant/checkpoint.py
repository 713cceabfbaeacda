"""Quantized checkpoints: packed int4 safetensors + mobilellm_config.json + quantization_config.json.

Loading builds the model skeleton on the meta device and assigns the packed tensors, so a converted model
never exists in full precision in memory: its RSS is about its int4 size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..hf import ShardWriter, model_from_tensors, read_config, read_tensors, save_pretrained
from ..model import Transformer
from .api import convert, prepare
from .config import QUANT_CONFIG_FILE, QuantConfig
from .math import dequantize_int4, unpack_int4
from .modules import QuantizedEmbedding, QuantizedLinear


def save_quantized(model: Transformer, config: QuantConfig, folder: str | Path,
                   extra_files: dict[str, str] | None = None) -> Path:
    """Write a converted model (atomically: a crash leaves no half-written folder), with e.g. its tokenizer."""
    if not any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in model.modules()):
        raise ValueError("save_quantized needs a converted model (quantize_ or prepare -> train -> convert)")
    text = json.dumps(config.to_dict(), indent=2) + "\n"
    return save_pretrained(model, folder, extra_files={**(extra_files or {}), QUANT_CONFIG_FILE: text})


def quantized_skeleton(model_config, config: QuantConfig, dtype: torch.dtype = torch.float32) -> Transformer:
    """The converted model's module tree on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = Transformer(model_config).to(dtype)
        return convert(prepare(model, config), config)


def load_quantized(folder: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Transformer, QuantConfig]:
    """(converted model, its QuantConfig) from save_quantized's folder; float tensors (norms) in `dtype`."""
    folder = Path(folder)
    model_config = read_config(folder)
    config = QuantConfig.load(folder)
    tensors = {k: v if v.dtype == torch.uint8 or k.endswith("weight_scale") else v.to(dtype)
               for k, v in read_tensors(folder, model_config.family).items()}
    model = model_from_tensors(quantized_skeleton(model_config, config, dtype), tensors,
                               context=f"{folder} does not match its quantization config")
    head = model.lm_head
    if isinstance(head, QuantizedLinear) and head.packed_weight.is_meta:  # shared: it reads the embedding's table
        head.packed_weight, head.weight_scale = model.embed_tokens.packed_weight, model.embed_tokens.weight_scale
    return model, config


def export_fake_quant(model: Transformer, config: QuantConfig, folder: str | Path) -> Path:
    """HF-style export of a converted model, as the released int4 accelerator checkpoints store it: float
    weights on the int4 grid plus `<module>.weight_fake_quantizer.scale` (N, K/group) tensors."""
    if config.share_embeddings:
        raise ValueError("the fake-quant export is for untied schemes (accelerator); save the cpu scheme "
                         "with save_quantized")
    text = json.dumps(config.to_dict(), indent=2) + "\n"
    with ShardWriter(folder, model.config, extra_files={QUANT_CONFIG_FILE: text}) as writer:
        for name, module in model.named_modules():  # one float weight at a time, never the whole model
            if isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
                packed, scales = module.int4_rows()
                writer.add(f"{name}.weight", dequantize_int4(unpack_int4(packed), scales))
                writer.add(f"{name}.weight_fake_quantizer.scale", scales.float())
        for name, tensor in model.state_dict().items():
            if not name.endswith(("packed_weight", "weight_scale")):
                writer.add(name, tensor)
    return Path(folder)
