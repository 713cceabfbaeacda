"""Prefill in chunks, decode one token at a time, stream tokens as they come (gpt-fast style).

The engine only calls the model's forward API (`hidden_states`, `lm_head`, the cache protocol), so a model
whose Linear/Embedding modules were swapped for quantized ones runs unchanged.

Chunked prefill is what makes sliding-window layers cheap on long prompts: each chunk's queries attend to
the ring (the last `window` keys) plus the chunk itself, never to the whole prompt, while global layers
attend to everything cached so far. Memory stays bounded by the chunk size at any prompt length.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence

import torch

from ..cache_protocol import AttentionCache
from ..errors import UserError
from .cache import KVCache
from .sampling import SamplingConfig, sample

PREFILL_CHUNK = 2048  # larger GEMMs pay more than the wider sliding-layer key span costs (benchmarks/results/prefill_chunk*.json)


class ContextError(UserError):
    """A prompt that does not fit the model's context or the cache."""


def new_cache(model, max_len: int | None = None, int8: bool = False, batch: int = 1) -> KVCache:
    """A cache for `model` holding up to max_len tokens (default: the model's context)."""
    config = model.config
    dtype = model.norm.weight.dtype
    return KVCache(config, max_len or config.max_seq_len, batch=batch, dtype=dtype, int8=int8,
                   device=model.norm.weight.device)


@torch.no_grad()
def prefill_chunks(model, tokens: torch.Tensor, cache: KVCache, chunk_size: int = PREFILL_CHUNK) -> Iterator[torch.Tensor]:
    """Feed tokens (B, T) through the model chunk by chunk; yield each chunk's final hidden states (B, t, dim)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for start in range(0, tokens.shape[1], chunk_size):
        yield model.hidden_states(tokens[:, start:start + chunk_size], cache=cache)


@torch.no_grad()
def prefill(model, tokens: torch.Tensor, cache: KVCache, chunk_size: int = PREFILL_CHUNK) -> torch.Tensor:
    """Cache tokens (B, T); return the logits after the last one (B, V). Only the last position goes
    through the LM head (at a 200k vocabulary the head of every position would dominate memory)."""
    if tokens.shape[1] == 0:
        raise ContextError("empty prompt: nothing to prefill")
    check_fits(cache, tokens.shape[1])
    hidden = None
    for hidden in prefill_chunks(model, tokens, cache, chunk_size):
        pass
    return model.lm_head(hidden[:, -1]).float()


@torch.no_grad()
def decode_one_token(model, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """token (B, 1) -> next-token logits (B, V). Small and shape-stable: the step torch.compile may take."""
    return model.lm_head(model.hidden_states(token, cache=cache)[:, -1]).float()


def check_fits(cache: KVCache, new_tokens: int) -> None:
    used = cache.next_position
    if used + new_tokens > cache.max_len:
        raise ContextError(f"{new_tokens} new tokens do not fit: {used} of the {cache.max_len}-token context are "
                           f"used and {cache.max_len - used} are left")


@torch.no_grad()
def generate(model, prompt: Sequence[int] | torch.Tensor, cache: KVCache, *, max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), stop_ids: Sequence[int] = (),
             history: Sequence[int] | None = None, prefill_chunk: int = PREFILL_CHUNK,
             decode_step=decode_one_token) -> Iterator[int]:
    """Stream up to max_new_tokens token ids after `prompt` (new tokens, appended to what `cache` holds).

    Stops after yielding a token in stop_ids, or when the cache is full. Every yielded token except the
    last is in the cache afterwards; a caller continuing the conversation feeds the last one first.
    `history` (default: the prompt) is what the repetition penalty sees. `decode_step` may be a compiled
    `decode_one_token`.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    tokens = torch.as_tensor(prompt, dtype=torch.long).reshape(1, -1)
    device = model.norm.weight.device
    tokens = tokens.to(device)
    logits = prefill(model, tokens, cache, prefill_chunk)
    generator = sampling.generator()
    seen = list(history if history is not None else tokens[0].tolist())
    stop = set(stop_ids)
    for i in range(max_new_tokens):
        past = torch.tensor([seen], dtype=torch.long, device=device) if sampling.penalty != 1.0 else None
        token = sample(logits, sampling, past, generator)  # (1,)
        token_id = int(token)
        yield token_id
        seen.append(token_id)
        if token_id in stop or i == max_new_tokens - 1 or cache.next_position >= cache.max_len:
            return
        logits = decode_step(model, token[:, None], cache)


def compiled_decode_step(model):
    """decode_one_token under torch.compile, for `model` only. Three choices keep the per-token overhead small
    (int4 pro-1b, 2 threads, benchmarks/int4_roofline.py):

    - Only the cache position, which changes every step, is traced as a symbol: the model's buffers and each
      cache's tensors are marked static. Left dynamic, their shapes' relations were checked in Python at every
      step (0.7 ms), and an int4 model's buffers would all be dynamic (only Parameters are static by default).
    - Inductor drives its kernels from generated C++ (cpp_wrapper) rather than Python: about 1 ms less per
      step. The price is compiling that C++ once, minutes for 30 layers on 2 cores; inductor caches it on disk.
    - Guards on the model's modules are skipped: checking ~1,000 module attributes cost 2.5 ms of a 50 ms step.
      So the step is bound to this model, whose structure must not change (its weights may, in place).

    The cache may also be a slot cache's view of some rows (infer.slots.SlotRows, continuous batching): tokens
    (B, 1), each row at its own position. Its rows' lengths are tensors and its int8 attention one kernel call
    whose shapes do not depend on them, so the batch size is the only other symbol: one graph for B = 1, one for
    every B >= 2. A new view comes each step over the same tensors; each tensor is marked static once.
    """
    step = torch.compile(decode_one_token, dynamic=True, options={
        "cpp_wrapper": True, "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
    marked_caches = weakref.WeakSet()
    marked: dict[int, weakref.ref] = {}  # id -> the tensor marked (an id alone may be reused after a free)

    def mark_static(tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            ref = marked.get(id(tensor))
            if ref is None or ref() is not tensor:
                torch._dynamo.mark_static(tensor)
                marked[id(tensor)] = weakref.ref(tensor)

    def compiled_step(m, token: torch.Tensor, cache: AttentionCache) -> torch.Tensor:
        if m is not model:
            raise ValueError("this compiled decode step belongs to another model: compile one per model")
        if cache not in marked_caches:  # marked at each new cache: buffers derived on first use exist by now
            mark_static(list(model.parameters()) + list(model.buffers()) + cache.tensors())
            marked_caches.add(cache)
        return step(m, token, cache)

    return compiled_step
