"""Quantized checkpoints: packed int4 safetensors + mobilellm_config.json + quantization_config.json.

Loading builds the model skeleton on the meta device and assigns the packed tensors, so a converted model
never exists in full precision in memory: its RSS is about its int4 size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..hf import CheckpointError, read_config, read_tensors, save_pretrained
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


def _float_tied_head(model: Transformer) -> bool:
    """A tied LM head kept in float (quantize_embeddings=False): saved once, as the embedding's weight."""
    return model.config.tie_embeddings and not isinstance(model.lm_head, QuantizedLinear)


def _check(model: Transformer, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    expected = model.state_dict()
    if _float_tied_head(model):
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(tensors[k].shape)} {tensors[k].dtype} vs model {tuple(v.shape)} {v.dtype}"
             for k, v in expected.items()
             if k in tensors and (tensors[k].shape != v.shape or (v.dtype == torch.uint8) != (tensors[k].dtype == torch.uint8))]
    problems = ([f"missing tensors {missing[:4]}"] if missing else []) + \
               ([f"unexpected tensors {unexpected[:4]}"] if unexpected else []) + wrong[:4]
    if problems:
        raise CheckpointError(f"{folder} does not match its quantization config: " + "; ".join(problems))


def load_quantized(folder: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Transformer, QuantConfig]:
    """(converted model, its QuantConfig) from save_quantized's folder; float tensors (norms) in `dtype`."""
    folder = Path(folder)
    model_config = read_config(folder)
    config = QuantConfig.load(folder)
    model = quantized_skeleton(model_config, config, dtype)
    tensors = read_tensors(folder, model_config.family)
    _check(model, tensors, folder)
    tensors = {k: v if v.dtype == torch.uint8 or k.endswith("weight_scale") else v.to(dtype) for k, v in tensors.items()}
    if _float_tied_head(model):
        model.load_state_dict(tensors, strict=False, assign=True)  # (strict: _check above)
        model.lm_head.weight = model.embed_tokens.weight
        return model, config
    model.load_state_dict(tensors, strict=True, assign=True)
    head = model.lm_head
    if isinstance(head, QuantizedLinear) and head.packed_weight.is_meta:  # tied: it reads the embedding's table
        head.packed_weight, head.weight_scale = model.embed_tokens.packed_weight, model.embed_tokens.weight_scale
    return model, config


def export_fake_quant(model: Transformer, config: QuantConfig, folder: str | Path) -> Path:
    """HF-style export of a converted model, as the released int4 accelerator checkpoints store it: float
    weights on the int4 grid plus `<module>.weight_fake_quantizer.scale` (N, K/group) tensors."""
    if config.share_embeddings:
        raise ValueError("the fake-quant export is for untied schemes (accelerator); save the cpu scheme "
                         "with save_quantized")
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
            packed, scales = module.int4_rows()
            state[f"{name}.weight"] = dequantize_int4(unpack_int4(packed), scales)
            state[f"{name}.weight_fake_quantizer.scale"] = scales.float()
    state.update({k: v for k, v in model.state_dict().items() if not k.endswith(("packed_weight", "weight_scale"))})
    text = json.dumps(config.to_dict(), indent=2) + "\n"
    return save_pretrained(_StateOnly(model.config, state), folder, extra_files={QUANT_CONFIG_FILE: text})


class _StateOnly:
    """What save_pretrained reads of a model: its config and state dict."""

    def __init__(self, config, state):
        self.config, self._state = config, state

    def state_dict(self):
        return self._state
