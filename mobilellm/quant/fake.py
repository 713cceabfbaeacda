"""Fake-quantized modules for QAT: float weights, forward through quantize -> dequantize with STE.

They subclass nn.Linear / nn.Embedding and keep the original weight Parameter, so a tied embedding / LM head
stays tied, optimizers see the same tensors, and the model's forward API is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import QuantConfig
from .math import fake_quantize_int4, fake_quantize_int8_per_token, int4_scales


class WeightFakeQuantizer(nn.Module):
    """int4 symmetric fake quantization of a (N, K) weight. Fixed ranges recompute min/max scales at every
    call; learnable ranges keep `scale` (N, K/group) as a Parameter initialised from min/max (LSQ)."""

    def __init__(self, weight: torch.Tensor, config: QuantConfig):
        super().__init__()
        self.group_size = config.group_for(weight.shape[1])
        self.scale_dtype = config.torch_scale_dtype
        self.scale = nn.Parameter(int4_scales(weight, self.group_size).float()) if config.learnable_scales else None

    def scales(self, weight: torch.Tensor) -> torch.Tensor:
        """(N, K/group) scales as used in the forward (rounded to the storage dtype, STE through the cast)."""
        if self.scale is None:
            return int4_scales(weight, self.group_size, self.scale_dtype).float()
        s = self.scale.abs().clamp_min(1e-9)  # a learnt scale must stay positive
        return s + (s.to(self.scale_dtype).float() - s).detach()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize_int4(weight, self.scales(weight))


class FakeQuantLinear(nn.Linear):
    """nn.Linear whose weight (and, for int8_dynamic, input activations) are fake-quantized."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig,
                    quantizer: WeightFakeQuantizer | None = None) -> "FakeQuantLinear":
        if linear.bias is not None:
            raise ValueError("linear layers with a bias are not supported by the int4 schemes")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.register_parameter("bias", None)
        new.quantize_activations = config.activations == "int8_dynamic"
        new.weight_fake_quantizer = quantizer or WeightFakeQuantizer(linear.weight, config)
        return new

    def forward(self, x):
        if self.quantize_activations:
            x = fake_quantize_int8_per_token(x)
        return F.linear(x, self.weight_fake_quantizer(self.weight))


class FakeQuantEmbedding(nn.Embedding):
    """nn.Embedding whose table is fake-quantized (one scale group along each token's vector)."""

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, config: QuantConfig) -> "FakeQuantEmbedding":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_embeddings, new.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        new.padding_idx, new.max_norm, new.norm_type = None, None, 2.0
        new.scale_grad_by_freq, new.sparse = False, False
        new.weight = embedding.weight
        new.weight_fake_quantizer = WeightFakeQuantizer(embedding.weight, config)
        return new

    def forward(self, tokens):
        # Only the looked-up rows are quantized: the same numbers as quantizing the whole table.
        rows = self.weight[tokens.reshape(-1)]  # (B*T, dim)
        fq = self.weight_fake_quantizer
        scales = fq.scales(self.weight)[tokens.reshape(-1)] if fq.scale is not None else fq.scales(rows)
        return fake_quantize_int4(rows, scales).reshape(*tokens.shape, -1)
