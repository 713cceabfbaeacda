"""`mobilellm generate` and `mobilellm chat`: run a checkpoint on the CPU, streaming text."""

from __future__ import annotations

import sys

import torch

from ..loading import load as load_checkpoint
from ..infer.chat import ChatSession, generate_text, run_chat
from ..infer.engine import compiled_decode_step, decode_one_token
from ..infer.sampling import SamplingConfig


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def load(checkpoint: str):
    """(model, tokenizer, int8 KV by default?, the checkpoint's sampling defaults) of a float or a quantized
    (int4) checkpoint."""
    loaded = load_checkpoint(checkpoint, require_tokenizer=True)
    # A scheme trained with int8 keys/values wants the cache to store them so.
    return (loaded.model.eval().fuse_projections(), loaded.tokenizer, bool(loaded.quant and loaded.quant.kv_int8),
            SamplingConfig.of_checkpoint(loaded.source if loaded.source.is_dir() else None))


def pick_decode_step(model, compile: bool):
    """The decode step the commands run: eager, or compiled (announced: the first compile takes minutes)."""
    if not compile:
        return decode_one_token
    print("compiling the decode step at its first use: minutes the first time, cached on disk after",
          file=sys.stderr, flush=True)
    return compiled_decode_step(model)


def generate(checkpoint: str, *, prompt: str, chat: bool = False, max_new_tokens: int = 256,
             sampling: SamplingConfig = SamplingConfig(), int8_kv: bool = False,
             stop: list[str] | None = None, threads: int | None = None, compile: bool = False) -> None:
    """Continue a prompt with a checkpoint, streaming the text as it is generated.

    Args:
        checkpoint: a checkpoint folder (HF layout with tokenizer.json; int4 ones too), or smollm2-135m
        prompt: the text to continue (an error if it does not fit the model's context)
        chat: wrap the prompt as one user turn in the tokenizer's chat template
        max_new_tokens: most tokens to generate (also stops at EOS and when the context is full)
        sampling: how the next token is chosen; unset values come from the checkpoint's generation_config.json
        int8_kv: keep the KV cache in int8 (per-token, per-head scales; always on for int8-KV quant schemes)
        stop: strings that end the generation
        threads: CPU threads for torch (1 decodes fastest on a busy machine: benchmarks/results/smollm2_decode*.json)
        compile: torch.compile the decode step (minutes to compile the first time, cached on disk after; then
            int4 pro-1b decodes 1.8x faster at 2 threads: benchmarks/results/int4_roofline.json)
    """
    set_threads(threads)
    model, tokenizer, scheme_int8_kv, defaults = load(checkpoint)
    for piece in generate_text(model, tokenizer, prompt, chat=chat, max_new_tokens=max_new_tokens,
                               sampling=sampling.over(defaults), int8_kv=int8_kv or scheme_int8_kv, stop_strings=stop or (),
                               decode_step=pick_decode_step(model, compile)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def chat(checkpoint: str, *, system: str | None = None, max_new_tokens: int = 512, max_context: int = 4096,
         sampling: SamplingConfig = SamplingConfig(), int8_kv: bool = False, threads: int | None = None,
         compile: bool = False) -> None:
    """Chat with a checkpoint in the terminal; the conversation stays in the KV cache between turns.

    Type a message and press enter; /reset starts a new conversation, /quit (or end of input) leaves.

    Args:
        checkpoint: a checkpoint folder (HF layout with tokenizer.json and a chat template), or smollm2-135m
        system: a system message opening the conversation
        max_new_tokens: most tokens per reply
        max_context: tokens the conversation may hold (capped at the model's context)
        sampling: how the next token is chosen; unset values come from the checkpoint's generation_config.json
        int8_kv: keep the KV cache in int8 (per-token, per-head scales)
        threads: CPU threads for torch (1 decodes fastest on a busy machine)
        compile: torch.compile the decode step once for the whole conversation (as for generate)
    """
    set_threads(threads)
    model, tokenizer, scheme_int8_kv, defaults = load(checkpoint)
    session = ChatSession(model, tokenizer, max_context=max_context, sampling=sampling.over(defaults),
                          max_new_tokens=max_new_tokens, int8_kv=int8_kv or scheme_int8_kv, system=system,
                          decode_step=pick_decode_step(model, compile))
    run_chat(session, sys.stdin, sys.stdout)
