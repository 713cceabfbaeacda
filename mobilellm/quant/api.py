"""One verb per step, the same QuantConfig for all of them (torchao style).

    prepare(model, config)   -> QAT model: fake-quantized Linear/Embedding (+ int8 KV) modules, trainable
    convert(model, config)   -> real int4 model whose outputs equal the fake-quantized model's
    quantize_(model, config) -> PTQ: prepare + convert, round-to-nearest with min/max (or, with
                                config.scale_search, error-minimising) scales, no training

All three modify the model in place and return it; module names and the forward API are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import Attention, Transformer
from .config import QuantConfig
from .fake import FakeQuantEmbedding, FakeQuantLinear, WeightFakeQuantizer
from .layout import to_panels
from .math import pack_int4, quantize_int4
from .modules import KVQuantAttention, QuantizedEmbedding, QuantizedLinear


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _untie(model: Transformer) -> None:
    """Give the LM head its own copy of the embedding (the accelerator scheme quantizes them apart)."""
    model.lm_head.weight = nn.Parameter(model.embed_tokens.weight.detach().clone())
    model.config = model.config.replace(tie_embeddings=False)


def prepare(model: Transformer, config: QuantConfig) -> Transformer:
    """Swap in fake-quantized modules for QAT (or as the reference the converted model must equal)."""
    if model.config.tie_embeddings and not config.share_embeddings:
        _untie(model)
    kept_float = () if config.quantize_embeddings else (model.embed_tokens, model.lm_head)
    for name, module in list(model.named_modules()):
        if any(module is kept for kept in kept_float):
            continue
        if type(module) is nn.Embedding:
            _swap(model, name, FakeQuantEmbedding.from_embedding(module, config))
        elif type(module) is nn.Linear:
            # a tied head reuses the table's quantizer (built first: embed_tokens is registered first)
            tied = module is model.lm_head and model.config.tie_embeddings
            shared = getattr(model.embed_tokens, "weight_fake_quantizer", None) if tied else None
            _swap(model, name, FakeQuantLinear.from_linear(module, config, shared))
        elif type(module) is Attention and config.kv_int8:
            _swap(model, name, KVQuantAttention.from_attention(module))
    if model.config.tie_embeddings and config.quantize_embeddings:  # one weight, one quantizer: alike
        model.lm_head.weight_fake_quantizer = model.embed_tokens.weight_fake_quantizer
    return model


@torch.no_grad()
def _pack(weight: torch.Tensor, quantizer: WeightFakeQuantizer, panels: bool) -> tuple[torch.Tensor, torch.Tensor]:
    scales = quantizer.scales(weight)  # fp32 values exactly representable in the storage dtype
    packed, scales = pack_int4(quantize_int4(weight, scales)), scales.to(quantizer.scale_dtype)
    return to_panels(packed, scales) if panels else (packed, scales)


def convert(model: Transformer, config: QuantConfig) -> Transformer:
    """Replace fake-quantized modules by packed int4 ones computing the same outputs."""
    if not any(isinstance(m, (FakeQuantLinear, FakeQuantEmbedding)) for m in model.modules()):
        raise ValueError("convert() needs a model prepared for QAT (call prepare(model, config) first)")
    converted: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(weight) -> packed, scales: shared once
    panels = config.activations == "int8_dynamic"  # the layout the int8-activation kernel reads (layout.py)
    for name, module in list(model.named_modules()):
        if isinstance(module, (FakeQuantLinear, FakeQuantEmbedding)):
            key = id(module.weight)
            shared = key in converted
            if not shared:
                converted[key] = _pack(module.weight, module.weight_fake_quantizer, panels)
            packed, scales = converted[key]
            if isinstance(module, FakeQuantLinear):
                group = module.in_features // scales.shape[1]
                _swap(model, name, QuantizedLinear(packed, scales, group, module.quantize_activations, shared,
                                                   module.out_features))
            else:
                _swap(model, name, QuantizedEmbedding(packed, scales, module.weight.dtype, panels,
                                                      module.num_embeddings))
    return model


def quantize_(model: Transformer, config: QuantConfig) -> Transformer:
    """Post-training quantization: round-to-nearest int4 with the config's scales (the QAT baseline)."""
    return convert(prepare(model, config), config)
