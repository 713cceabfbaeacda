"""Text in, streamed text out: detokenizing as tokens come, and multi-turn chat kept in the KV cache.

A chat session renders the tokenizer's chat template for the whole conversation each turn, but only the
text past what the cache already holds is tokenized and prefilled: earlier turns are never recomputed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TextIO

import torch

from ..tokenizer import Tokenizer
from .cache import KVCache
from .engine import ContextError, check_fits, decode_one_token, generate, new_cache
from .sampling import SamplingConfig, find_stop, safe_prefix


class TextStream:
    """Token ids in, text pieces out, one token at a time, stopping at the first stop string.

    The whole reply is re-decoded each step (byte-level BPE merges across token boundaries), and a tail
    that is half a character or could grow into a stop string is held back until it resolves.
    """

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str] = ()):
        self.tokenizer, self.stop_strings = tokenizer, tuple(stop_strings)
        self.ids: list[int] = []
        self.shown = 0
        self.stopped = False  # a stop string was reached: nothing more comes out

    def push(self, token_id: int) -> str:
        """The text that token_id makes safe to show ('' while held back); sets `stopped` at a stop string."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special=True)
        cut = find_stop(text, self.stop_strings)
        if cut is not None:
            self.stopped = True
            piece = text[self.shown:cut] if cut > self.shown else ""
            self.shown = max(self.shown, cut)
            return piece
        end = safe_prefix(text, self.stop_strings)
        if end <= self.shown:
            return ""
        piece, self.shown = text[self.shown:end], end
        return piece

    def finish(self) -> str:
        """What was held back, once no token follows (nothing after a stop string)."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special=True)
        piece, self.shown = text[self.shown:], len(text)
        return piece


def stream_text(tokenizer: Tokenizer, token_ids: Iterable[int], stop_strings: Sequence[str] = ()) -> Iterator[str]:
    """Turn a stream of token ids into a stream of text pieces, stopping at the first stop string (TextStream)."""
    stream = TextStream(tokenizer, stop_strings)
    for token_id in token_ids:
        piece = stream.push(token_id)
        if piece:
            yield piece
        if stream.stopped:
            return
    piece = stream.finish()
    if piece:
        yield piece


class ChatSession:
    """A conversation whose tokens live in one KV cache; `reply(user_text)` streams the assistant's answer."""

    def __init__(self, model, tokenizer: Tokenizer, *, max_context: int, sampling: SamplingConfig = SamplingConfig(),
                 max_new_tokens: int = 256, int8_kv: bool = False, system: str | None = None,
                 stop_strings: Sequence[str] = (), decode_step=decode_one_token):
        """`decode_step` may be engine.compiled_decode_step(model): one compilation serves every turn."""
        tokenizer.check_fits(model.config.vocab_size)
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.max_new_tokens, self.stop_strings, self.decode_step = max_new_tokens, tuple(stop_strings), decode_step
        self.cache: KVCache = new_cache(model, max_len=min(max_context, model.config.max_seq_len), int8=int8_kv)
        self.stop_ids = tuple(tokenizer.eos_ids) or tuple(model.config.eos_ids)
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.ids: list[int] = []  # the conversation's tokens; all but `pending` are in the cache
        self.text = ""  # the exact text self.ids spell
        self.pending: list[int] = []

    def reset(self) -> None:
        self.cache.reset()
        self.messages = self.messages[:1] if self.messages and self.messages[0]["role"] == "system" else []
        self.ids, self.text, self.pending = [], "", []

    def turn_tokens(self, user_text: str) -> list[int]:
        """Tokens to feed for the new turn: the rendered conversation past what is already cached."""
        rendered = self.tokenizer.apply_chat_template(self.messages + [{"role": "user", "content": user_text}])
        if not rendered.startswith(self.text):
            # The template rewrote an earlier turn: start the cache over from the whole conversation.
            self.cache.reset()
            self.ids, self.text, self.pending = [], "", []
        new_ids = self.tokenizer.encode(rendered[len(self.text):])
        self.text = rendered
        self.ids += new_ids
        return self.pending + new_ids

    def reply(self, user_text: str) -> Iterator[str]:
        feed = self.turn_tokens(user_text)
        self.messages.append({"role": "user", "content": user_text})
        try:
            check_fits(self.cache, len(feed))
        except ContextError as err:
            self.messages.pop()
            raise ContextError(f"{err}; start a new conversation (/reset)") from None
        max_new = min(self.max_new_tokens, self.cache.max_len - self.cache.next_position - len(feed))
        generated: list[int] = []

        def tokens():
            for token_id in generate(self.model, feed, self.cache, max_new_tokens=max_new, sampling=self.sampling,
                                     stop_ids=self.stop_ids, history=self.ids, decode_step=self.decode_step):
                generated.append(token_id)
                yield token_id

        pieces = []
        for piece in stream_text(self.tokenizer, tokens(), self.stop_strings):
            pieces.append(piece)
            yield piece
        self.pending = generated[-1:]  # sampled but not yet fed through the model
        self.ids += generated
        self.text += self.tokenizer.decode(generated)
        self.messages.append({"role": "assistant", "content": "".join(pieces)})


def run_chat(session: ChatSession, stdin: TextIO, stdout: TextIO, prompt: str = "> ") -> None:
    """The interactive loop: read a line, stream the reply. /reset starts over, /quit or end of input stops."""
    while True:
        stdout.write(prompt)
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            stdout.write("\n")
            return
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            session.reset()
            stdout.write("(new conversation)\n")
            continue
        try:
            for piece in session.reply(line):
                stdout.write(piece)
                stdout.flush()
        except ContextError as err:
            stdout.write(f"[{err}]")
        stdout.write("\n")


def encode_prompt(tokenizer: Tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of a one-shot prompt, through the chat template when asked."""
    if chat:
        return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": prompt}]))
    return tokenizer.encode(prompt, bos=True)


def generate_text(model, tokenizer: Tokenizer, prompt: str, *, chat: bool = False, max_new_tokens: int = 256,
                  sampling: SamplingConfig = SamplingConfig(), int8_kv: bool = False,
                  stop_strings: Sequence[str] = (), decode_step=decode_one_token) -> Iterator[str]:
    """Stream the continuation of `prompt` as text. A prompt that leaves no room to generate is an error.
    `decode_step` may be engine.compiled_decode_step(model)."""
    ids = encode_prompt(tokenizer, prompt, chat)
    context = model.config.max_seq_len
    if len(ids) >= context:
        raise ContextError(f"the prompt is {len(ids)} tokens but the model's context is {context}: "
                           f"shorten it by at least {len(ids) - context + 1} tokens")
    cache = new_cache(model, max_len=min(context, len(ids) + max_new_tokens), int8=int8_kv)
    stop_ids = tuple(tokenizer.eos_ids) or tuple(model.config.eos_ids)
    with torch.no_grad():
        yield from stream_text(tokenizer, generate(model, ids, cache, max_new_tokens=max_new_tokens,
                                                   sampling=sampling, stop_ids=stop_ids, decode_step=decode_step),
                               stop_strings)
