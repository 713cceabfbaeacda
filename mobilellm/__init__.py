"""mobilellm: MobileLLM-Pro end to end, from data mixing and distillation to 4-bit CPU inference."""

__version__ = "0.1.0"
