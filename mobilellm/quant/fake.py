"""Fake-quantized modules for QAT: float weights, forward through quantize -> dequantize with STE.

They subclass nn.Linear / nn.Embedding and keep the original weight Parameter, so a tied embedding / LM head
stays tied, optimizers see the same tensors, and the model's forward API is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import QuantConfig
from .math import fake_quantize_int4, fake_quantize_int8_per_token, int4_scales, int4_search_scales


class WeightFakeQuantizer(nn.Module):
    """int4 symmetric fake quantization of a (N, K) weight. Fixed ranges recompute min/max scales at every
    call (times `clip`, the searched scale's ratio to min/max, with scale_search); learnable ranges keep
    `scale` (N, K/group) as a Parameter initialised from min/max or the search (LSQ)."""

    def __init__(self, weight: torch.Tensor, config: QuantConfig):
        super().__init__()
        self.group_size = config.group_for(weight.shape[1])
        self.scale_dtype = config.torch_scale_dtype
        initial = (int4_search_scales(weight, self.group_size, self.scale_dtype) if config.scale_search
                   else int4_scales(weight, self.group_size)).float()  # (N, K/group)
        self.scale = nn.Parameter(initial) if config.learnable_scales else None
        if config.scale_search and not config.learnable_scales:
            # fixed ranges follow the weight as it trains; the searched clipping ratio (and sign) stays.
            # Not persistent: it derives from the weight prepare() is given, and the training loop prepares
            # the initial model before loading a checkpoint, so a resume recomputes the same ratios.
            self.register_buffer("clip", initial / int4_scales(weight, self.group_size), persistent=False)
        else:
            self.clip = None

    def scales(self, weight: torch.Tensor) -> torch.Tensor:
        """(N, K/group) scales as used in the forward (rounded to the storage dtype, STE through the cast)."""
        if self.scale is None:
            return self._fixed(int4_scales(weight, self.group_size), self.clip)
        # a learnt scale keeps its sign (the search may start it negative) and stays away from zero
        s = torch.where(self.scale < 0, -1.0, 1.0) * self.scale.abs().clamp_min(1e-9)
        return s + (s.to(self.scale_dtype).float() - s).detach()

    def row_scales(self, weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """scales(weight)[rows], computing fixed ranges for those rows only (an embedding looks up few)."""
        if self.scale is not None:
            return self.scales(weight)[rows]
        return self._fixed(int4_scales(weight[rows], self.group_size), None if self.clip is None else self.clip[rows])

    def _fixed(self, minmax: torch.Tensor, clip: torch.Tensor | None) -> torch.Tensor:
        # with clip, the product is within an fp32 ulp of the searched scale, so storage rounding gives it back
        return (minmax if clip is None else minmax * clip).to(self.scale_dtype).float()

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
        flat = tokens.reshape(-1)
        scales = self.weight_fake_quantizer.row_scales(self.weight, flat)  # (B*T, dim/group)
        return fake_quantize_int4(self.weight[flat], scales).reshape(*tokens.shape, -1)
