"""OpenAI's request and response shapes: a request body checked field by field into what the engine runs, and
the engine's events back into chat.completion / text_completion bodies and their streamed chunks.

Every rejected field raises APIError with the status and message an OpenAI client shows (`{"error": {...}}`).
Logprobs are the model's own (log-softmax of the raw logits, before temperature, top-k/top-p or penalty), as
vLLM reports them by default.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from ..infer.sampling import SamplingConfig
from ..tokenizer import Tokenizer
from .scheduler import Done, TokenLogprob

ROLES = {"system", "developer", "user", "assistant"}  # developer: OpenAI's newer name for system
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "suffix", "best_of")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Parsed:
    """A checked request: what the engine needs plus how to answer."""
    chat: bool
    prompt: list[int]
    max_tokens: int
    sampling: SamplingConfig
    stop: tuple[str, ...]
    logprobs: int | None
    stream: bool
    include_usage: bool
    ignore_eos: bool = False  # extra field (as llama.cpp and vLLM take it): generate past EOS
    timeout: float | None = None  # extra field: seconds from arrival to the last token (None: the server's)


def _number(body: dict, key: str, lo: float | None = None, hi: float | None = None, integer: bool = False,
            lo_open: bool = False):
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise APIError(400, f"{key} must be {'an integer' if integer else 'a number'}, got {value!r}", key)
    if (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
        bounds = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise APIError(400, f"{key} must be in {bounds}, got {value}", key)
    return value


def _bool(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"{key} must be true or false, got {value!r}", key)
    return value


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text ones
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{i}].content: only text parts are supported, got {part!r:.80}",
                               f"messages[{i}].content")
            texts.append(part["text"])
        return "".join(texts)
    if content is None and message.get("role") == "assistant":
        return ""
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(400, f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise APIError(400, f"messages[{i}].role {role!r} is not one of {sorted(ROLES)}", f"messages[{i}].role")
        out.append({"role": "system" if role == "developer" else role, "content": _content(message, i)})
    return out


def parse(body, *, chat: bool, tokenizer: Tokenizer, model_name: str, context: int,
          defaults: SamplingConfig, max_timeout: float = float("inf")) -> Parsed:
    """Check an OpenAI request body (already decoded JSON) against the served model, its context and the
    server's request timeout (a request's own "timeout" may only be shorter)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise APIError(400, "model is required (a string): GET /v1/models lists it", "model")
    if model != model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {model_name!r}", "model",
                       "model_not_found")
    for key in UNSUPPORTED:
        if body.get(key) is not None:
            raise APIError(400, f"{key} is not supported by this server", key)
    if _number(body, "n", 1, 1, integer=True) not in (None, 1):
        raise APIError(400, "n must be 1", "n")
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key, -2, 2):
            raise APIError(400, f"{key} is not supported (use the extra field repetition_penalty)", key)
    if chat:
        rendered = tokenizer.apply_chat_template(chat_messages(body))
        prompt = tokenizer.encode(rendered)
    else:
        prompt = completion_prompt(body, tokenizer)
    if not prompt:
        raise APIError(400, "the prompt is empty", "messages" if chat else "prompt")
    if len(prompt) >= context:
        raise APIError(400, f"This model's maximum context length is {context} tokens, but the prompt is "
                            f"{len(prompt)} tokens, leaving no room to generate: shorten it by at least "
                            f"{len(prompt) - context + 1} tokens", "messages" if chat else "prompt",
                       "context_length_exceeded")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, 1, None, integer=True)
    if max_tokens is not None and max_tokens > context:
        raise APIError(400, f"{key} is {max_tokens}, past this model's context of {context} tokens", key)
    if max_tokens is not None and len(prompt) + max_tokens > context:
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, {max_tokens} in the "
                            f"completion). Please reduce the prompt or {key}.", key, "context_length_exceeded")
    sampling = SamplingConfig(temperature=_number(body, "temperature", 0, 2),
                              top_p=_number(body, "top_p", 0, 1, lo_open=True),
                              top_k=_number(body, "top_k", 0, None, integer=True),
                              repetition_penalty=_number(body, "repetition_penalty", 0, None, lo_open=True),
                              seed=_number(body, "seed", None, None, integer=True)).over(defaults)
    stop = body.get("stop")
    stop = (stop,) if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > 16
                             or not all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, "stop must be a non-empty string or a list of at most 16 of them", "stop")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise APIError(400, "stream_options is only allowed with stream: true, as an object", "stream_options")
    include_usage = _bool(options or {}, "include_usage")
    if chat:
        logprobs = _number(body, "top_logprobs", 0, 20, integer=True) or 0
        if not _bool(body, "logprobs"):
            if body.get("top_logprobs") is not None:
                raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
            logprobs = None
    else:
        logprobs = _number(body, "logprobs", 0, 5, integer=True)
        if _bool(body, "echo"):
            raise APIError(400, "echo is not supported by this server", "echo")
    timeout = _number(body, "timeout", 0, max_timeout, lo_open=True)
    return Parsed(chat, prompt, max_tokens or context - len(prompt), sampling, tuple(stop or ()), logprobs, stream,
                  include_usage, _bool(body, "ignore_eos"), timeout)


def completion_prompt(body: dict, tokenizer: Tokenizer) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, bos=True)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"prompt token ids must be in [0, {tokenizer.vocab_size}), got {bad[0]}", "prompt")
        return list(prompt)
    raise APIError(400, "prompt must be a string or a list of token ids (one prompt per request)", "prompt")


# ---- responses ------------------------------------------------------------------------------------

class Responder:
    """Builds the bodies and chunks of one request, all sharing its id and creation time."""

    def __init__(self, parsed: Parsed, model_name: str, tokenizer: Tokenizer):
        self.parsed, self.model, self.tokenizer = parsed, model_name, tokenizer
        self.id = ("chatcmpl-" if parsed.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if parsed.chat else "text_completion"
        self.text_offset = 0

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def chat_logprobs(self, entries: list[TokenLogprob]) -> dict:
        def item(token_id, logprob):
            text = self._token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
        return {"content": [dict(item(e.token_id, e.logprob), top_logprobs=[item(t, lp) for t, lp in e.top])
                            for e in entries], "refusal": None}

    def completion_logprobs(self, entries: list[TokenLogprob]) -> dict:
        tokens = [self._token_text(e.token_id) for e in entries]
        offsets = []
        for text in tokens:
            offsets.append(self.text_offset)
            self.text_offset += len(text)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self._token_text(t): lp for t, lp in e.top} for e in entries],
                "text_offset": offsets}

    def logprobs(self, entries: list[TokenLogprob]) -> dict | None:
        if self.parsed.logprobs is None:
            return None
        return self.chat_logprobs(entries) if self.parsed.chat else self.completion_logprobs(entries)

    @staticmethod
    def usage(done: Done) -> dict:
        return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                "total_tokens": done.prompt_tokens + done.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def body(self, text: str, entries: list[TokenLogprob], done: Done) -> dict:
        if self.parsed.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": self.logprobs(entries), "finish_reason": done.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": self.logprobs(entries),
                      "finish_reason": done.finish_reason}
        return dict(self._head(self.object), choices=[choice], usage=self.usage(done))

    def chunk(self, text: str | None, entries: list[TokenLogprob], finish_reason: str | None = None,
              role: bool = False) -> dict:
        """One streamed chunk with a choice: text (None: no content field), its tokens' logprobs, the finish."""
        logprobs = self.logprobs(entries) if entries else None
        if self.parsed.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            head = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
            head = self._head("text_completion")
        chunk = dict(head, choices=[choice])
        if self.parsed.include_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self, done: Done) -> dict:
        head = self._head("chat.completion.chunk" if self.parsed.chat else "text_completion")
        return dict(head, choices=[], usage=self.usage(done))
