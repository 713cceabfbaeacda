"""Quantization configs: one dataclass describes a scheme; PTQ, QAT prepare/convert and checkpoints all read it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import write_text_atomic
from ..dtypes import DTYPES
from ..errors import UserError
from ..schema import read_json_object

QUANT_CONFIG_FILE = "quantization_config.json"
# Bumped when the stored tensors change meaning. 2: the cpu scheme's int4 tensors are in 8-row panels (layout.py).
FORMAT_VERSION = 2
ACTIVATIONS = ("int8_dynamic", "none")


@dataclass(frozen=True)
class QuantConfig:
    """How a model is quantized (MobileLLM-Pro technical report, phase 4).

    group_size: input columns sharing one weight scale; None = one scale per output channel.
    activations: "int8_dynamic" (asymmetric, per token, computed at run time) or "none" (float).
    kv_int8: keys/values quantized to int8 per token and head (fake during QAT, by the cache at inference).
    learnable_scales: weight scales are parameters trained by gradient (LSQ) during QAT.
    share_embeddings: the tied embedding / LM head is quantized once and shared; False unties them.
    scale_dtype: storage precision of the weight scales (fake quant rounds to it too).
    quantize_embeddings: the token embedding and the LM head are int4; False keeps both in float (the other
        Linear layers are quantized either way).
    scale_search: per group, the scale (clipping ratio and sign) minimising the group's squared reconstruction
        error (math.int4_search_scales) instead of max|w| / 7.5; same storage format. Fixed ranges keep the
        searched ratio to max|w| during QAT; learnable ranges start from the searched scales.
    """

    scheme: str
    group_size: int | None = 32
    activations: str = "int8_dynamic"
    kv_int8: bool = True
    learnable_scales: bool = False
    share_embeddings: bool = True
    scale_dtype: str = "float16"
    quantize_embeddings: bool = True
    scale_search: bool = False

    def __post_init__(self):
        if self.group_size is not None and (self.group_size <= 0 or self.group_size % 32):
            raise ValueError(f"group_size must be a positive multiple of 32 or None, got {self.group_size}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, got {self.activations!r}")
        if self.scale_dtype not in DTYPES:
            raise ValueError(f"scale_dtype must be one of {sorted(DTYPES)}, got {self.scale_dtype!r}")

    @classmethod
    def from_scheme(cls, scheme: str) -> "QuantConfig":
        if scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {scheme!r}; expected one of {sorted(SCHEMES)}")
        return SCHEMES[scheme]

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return DTYPES[self.scale_dtype]

    def group_for(self, in_features: int) -> int:
        return self.group_size or in_features

    def to_dict(self) -> dict:
        return {"quant_method": "mobilellm_int4", "format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields - {"quant_method", "format_version"})
        if unknown or "scheme" not in d:
            raise ValueError(f"malformed quantization config: unknown fields {unknown}" if unknown
                             else "malformed quantization config: no 'scheme'")
        return cls(**{k: v for k, v in d.items() if k in fields})

    def save(self, folder: str | Path) -> None:
        write_text_atomic(Path(folder) / QUANT_CONFIG_FILE, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "QuantConfig":
        path = Path(folder) / QUANT_CONFIG_FILE
        if not path.exists():
            raise ValueError(f"{folder} holds no {QUANT_CONFIG_FILE}: not a quantized checkpoint")
        data = read_json_object(path, fix="quantize the model again (mobilellm quantize)")
        try:
            config = cls.from_dict(data)
        except (TypeError, AttributeError, KeyError) as err:
            raise UserError(f"{path}: malformed ({err}); quantize the model again (mobilellm quantize)") from None
        version = data.get("format_version", 1)
        if version != FORMAT_VERSION:
            raise ValueError(f"{folder} holds int4 tensors in format {version}; this mobilellm reads format "
                             f"{FORMAT_VERSION}: quantize the model again (mobilellm quantize)")
        return config


SCHEMES = {
    # int4 group-32 weights and embeddings (tied, shared), int8 dynamic activations, int8 KV: 590 MB for pro-1b.
    "cpu": QuantConfig("cpu", group_size=32, activations="int8_dynamic", kv_int8=True,
                       learnable_scales=False, share_embeddings=True, scale_dtype="float16"),
    # int4 per-channel weights with learnable ranges, bf16 activations and KV, untied embeddings: 720 MB.
    "accelerator": QuantConfig("accelerator", group_size=None, activations="none", kv_int8=False,
                               learnable_scales=True, share_embeddings=False, scale_dtype="float32"),
}
