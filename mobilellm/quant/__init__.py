"""4-bit quantization: one config per scheme, `quantize_` (PTQ), QAT `prepare` -> train -> `convert`."""

from .api import convert, prepare, quantize_
from .config import SCHEMES, QuantConfig

__all__ = ["QuantConfig", "SCHEMES", "prepare", "convert", "quantize_"]
