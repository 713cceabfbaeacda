"""Inference: KV cache (ring buffers for sliding layers), chunked prefill, decode, sampling, chat."""
