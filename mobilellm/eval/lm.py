"""The model under evaluation: a checkpoint and its tokenizer behind the three queries tasks make.

`loglikelihood` (multiple choice), `generate_until` (exact-match and code tasks, greedy, through the
infer engine's KV cache) and `rolling_loglikelihood` (perplexity). Text is split into tokens the way lm-eval's causal models do it,
so scores are comparable with lm-eval's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from ..dtypes import parse_dtype  # noqa: F401  (the eval commands import it from here)
from ..infer.engine import generate, new_cache
from ..loading import load
from ..tokenizer import Tokenizer
from .loglik import TokenRequest, loglikelihood_tokens, token_logprobs

class EvalLM:
    def __init__(self, model, tokenizer: Tokenizer, *, batch_tokens: int = 2048, progress: bool = True):
        tokenizer.check_fits(model.config.vocab_size)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_tokens = batch_tokens
        self.progress = progress
        self.max_len = model.config.max_seq_len
        self.checkpoint: str | None = None
        self.source: Path | None = None  # the resolved folder or .gguf file, when loaded from one
        self.quant = None  # the QuantConfig of a quantized checkpoint

    @classmethod
    def load(cls, checkpoint: str | Path, dtype: torch.dtype = torch.float32, tokenizer: str | Path | None = None,
             **kwargs) -> "EvalLM":
        """A checkpoint folder, full precision or quantized; its tokenizer.json, or the one in `tokenizer`."""
        loaded = load(checkpoint, dtype, tokenizer=tokenizer, require_tokenizer=True)
        lm = cls(loaded.model, loaded.tokenizer, **kwargs)
        lm.checkpoint, lm.source, lm.quant = str(checkpoint), loaded.source, loaded.quant
        return lm

    # ---- tokenization, as lm-eval's causal models do it -------------------------------------------
    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on (lm-eval: the BOS token, else end-of-text)."""
        if self.tokenizer.bos_id is not None:
            return self.tokenizer.bos_id
        return self.tokenizer.eos_ids[0]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's `_encode_pair`: trailing spaces of the context move to the continuation, the pair is
        encoded whole and split at the context's token count (merges across the boundary go to the
        continuation). An empty context becomes [prefix token]."""
        if not context:
            return [self.prefix_token_id], self.tokenizer.encode(continuation)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        n_context = len(self.tokenizer.encode(context))
        return whole[:n_context], whole[n_context:]

    # ---- queries ------------------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[tuple[str, str]], desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        """(log p(continuation | context), is greedy) for each (context, continuation)."""
        tokenized = [TokenRequest(*map(tuple, self.encode_pair(c, x))) for c, x in requests]
        for (context, continuation), r in zip(requests, tokenized):
            if not r.continuation:
                raise ValueError(f"continuation {continuation!r} after {context[-40:]!r} encodes to no tokens")
        with tqdm(total=len(tokenized), desc=desc, disable=not self.progress, leave=False) as bar:
            return loglikelihood_tokens(self.model, tokenized, max_len=self.max_len,
                                        batch_tokens=self.batch_tokens, on_batch=bar.update)

    def loglikelihood_tokens(self, requests: Sequence[TokenRequest]) -> list[tuple[float, bool]]:
        return loglikelihood_tokens(self.model, requests, max_len=self.max_len, batch_tokens=self.batch_tokens)

    def generate(self, prompt: str, max_new_tokens: int, done: Callable[[str], bool]) -> str:
        """Greedy continuation of prompt until end-of-sequence, max_new_tokens, or done(text so far)."""
        if not 0 < max_new_tokens < self.max_len:
            raise ValueError(f"max_new_tokens must be in 1..{self.max_len - 1}, got {max_new_tokens}")
        ids = self.tokenizer.encode(prompt) or [self.prefix_token_id]
        ids = ids[-(self.max_len - max_new_tokens):]  # left-truncate, as lm-eval does
        cache = new_cache(self.model, max_len=len(ids) + max_new_tokens)
        out: list[int] = []
        for token in generate(self.model, ids, cache, max_new_tokens=max_new_tokens, stop_ids=self.tokenizer.eos_ids):
            if token in self.tokenizer.eos_ids:
                break
            out.append(token)
            if done(self.tokenizer.decode(out)):
                break
        return self.tokenizer.decode(out)

    def generate_until(self, prompt: str, until: Sequence[str], max_new_tokens: int = 256) -> str:
        """Greedy continuation of prompt, cut before the first stop string (or at end-of-sequence)."""
        text = self.generate(prompt, max_new_tokens, lambda t: any(s and s in t for s in until))
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text

    @torch.no_grad()
    def rolling_loglikelihood(self, text: str, window: int, stride: int) -> tuple[float, int]:
        """(sum of log p over every token of text, token count), scored with a sliding window.

        As lm-eval's rolling log-likelihood, the first token is conditioned on the prefix token. Each
        step scores the next `stride` tokens from at most `window` tokens of input, so every token after
        the first window sees at least window - stride tokens of context.
        """
        if not 0 < stride <= window <= self.max_len:
            raise ValueError(f"need 0 < stride <= window <= {self.max_len}, got stride {stride}, window {window}")
        seq = torch.tensor([self.prefix_token_id, *self.tokenizer.encode(text)], dtype=torch.long)
        total, pos = 0.0, 1
        while pos < len(seq):
            end = min(pos + stride, len(seq))  # score targets seq[pos:end]
            start = max(0, end - 1 - window)
            hidden = self.model.hidden_states(seq[None, start:end - 1])[0, pos - 1 - start:]  # (end - pos, dim)
            logprobs, _ = token_logprobs(self.model, hidden, seq[pos:end])
            total += float(logprobs.sum())
            pos = end
        return total, len(seq) - 1
