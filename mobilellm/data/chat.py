"""Chat data: JSONL conversations, rendered with the tokenizer's own chat template, and the tokens a model learns.

One JSON object a line, in one of the formats TRL and the OpenAI API use:
- `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}`: every assistant turn is learned;
- `{"prompt": ..., "completion": ...}`: a string is one user (prompt) or assistant (completion) turn, a list is
  messages; only the completion is learned;
- `{"prompt": ..., "chosen": ..., "rejected": ...}`: a preference pair (DPO), each side the prompt's continuation.

Which tokens are the assistant's needs no generation markers in the template (`{% generation %}`): for each
learned assistant turn the conversation is rendered up to it with the generation prompt, and through it without;
the text between the two is the turn as the model must write it, cut after the tokenizer's first end-of-turn token
(the chat engine stops there, so the template's newline after it is never generated). A token is the assistant's
when its first character lies in such a span. This holds for any template that renders a conversation prefix by
prefix (ChatML, SmolLM2's, Llama 3's); one that rewrites earlier turns is refused, naming the line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


class ChatDataError(DataError):
    """A chat or preference file that cannot be used as written; the message names the file and line."""


@dataclass(frozen=True)
class Conversation:
    messages: tuple[dict, ...]  # {"role", "content"}, in the order the template renders them
    learn_from: int  # assistant turns at this index or later are learned (a completion's first message)
    where: str  # "FILE:LINE", for errors and reports


@dataclass(frozen=True)
class PreferencePair:
    prompt: tuple[dict, ...]
    chosen: tuple[dict, ...]  # the preferred continuation of the prompt (assistant turns)
    rejected: tuple[dict, ...]
    where: str

    def conversations(self) -> tuple[Conversation, Conversation]:
        n = len(self.prompt)
        return (Conversation(self.prompt + self.chosen, n, self.where),
                Conversation(self.prompt + self.rejected, n, self.where))


@dataclass(frozen=True)
class Rendered:
    tokens: np.ndarray  # (n,) int32, the whole conversation as the template renders it
    learned: np.ndarray  # (n,) bool, True for the tokens the model learns to produce


# ---- reading ---------------------------------------------------------------------------------------

def _messages(value, where: str, field: str, single_role: str) -> tuple[dict, ...]:
    """A field as messages: a string is one message of `single_role`, a list is checked message by message."""
    if isinstance(value, str):
        return ({"role": single_role, "content": value},)
    if not isinstance(value, list) or not value:
        raise ChatDataError(f"{where}: {field!r} must be a string or a non-empty list of messages, "
                            f"got {type(value).__name__}")
    messages = []
    for i, message in enumerate(value, 1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ChatDataError(f"{where}: {field} message {i} must be an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ChatDataError(f"{where}: {field} message {i} has unknown role {role!r} "
                                f"(expected {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ChatDataError(f"{where}: {field} message {i} ({role}) has {type(content).__name__} content, "
                                "not a string")
        messages.append({"role": role, "content": content})
    return tuple(messages)


def _has_assistant(messages: tuple[dict, ...], where: str, what: str) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatDataError(f"{where}: no assistant turn in {what}: there is nothing to learn")


def _records(path: Path):
    """(where, object) per non-blank line; an empty file or a line that is not a JSON object is an error."""
    path = Path(path)
    if not path.is_file():
        raise ChatDataError(f"no chat data file {path}")
    found = False
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ChatDataError(f"{where}: not JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ChatDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            found = True
            yield where, record
    if not found:
        raise ChatDataError(f"{path}: empty file, no examples")


def parse_conversation(record: dict, where: str) -> Conversation:
    if "messages" in record:
        messages = _messages(record["messages"], where, "messages", "user")
        _has_assistant(messages, where, "messages")
        return Conversation(messages, 0, where)
    if "prompt" in record and "completion" in record:
        prompt = _messages(record["prompt"], where, "prompt", "user")
        completion = _messages(record["completion"], where, "completion", "assistant")
        _has_assistant(completion, where, "the completion")
        return Conversation(prompt + completion, len(prompt), where)
    raise ChatDataError(f"{where}: expected a 'messages' list, or 'prompt' and 'completion' (got keys "
                        f"{', '.join(sorted(record)) or 'none'})")


def parse_pair(record: dict, where: str) -> PreferencePair:
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise ChatDataError(f"{where}: a preference pair needs 'prompt', 'chosen' and 'rejected' "
                            f"(missing {', '.join(missing)})")
    prompt = _messages(record["prompt"], where, "prompt", "user")
    chosen = _messages(record["chosen"], where, "chosen", "assistant")
    rejected = _messages(record["rejected"], where, "rejected", "assistant")
    for side, messages in (("chosen", chosen), ("rejected", rejected)):
        _has_assistant(messages, where, side)
    return PreferencePair(prompt, chosen, rejected, where)


def read_conversations(path: str | Path) -> list[Conversation]:
    """Every conversation of a `messages` or prompt/completion JSONL file (the formats may be mixed)."""
    return [parse_conversation(record, where) for where, record in _records(Path(path))]


def read_pairs(path: str | Path) -> list[PreferencePair]:
    """Every preference pair of a prompt/chosen/rejected JSONL file."""
    return [parse_pair(record, where) for where, record in _records(Path(path))]


# ---- rendering and the assistant mask ---------------------------------------------------------------

def assistant_spans(tokenizer: Tokenizer, conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each learned assistant turn in it."""
    messages = [dict(m) for m in conversation.messages]
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < conversation.learn_from:
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ChatDataError(f"{conversation.where}: the chat template does not render this conversation prefix "
                                f"by prefix (message {i + 1} changes the text before it), so its assistant tokens "
                                "cannot be told apart")
        spans.append((len(before), _turn_end(through, len(before), tokenizer.eos_tokens)))
    return full, spans


def _turn_end(text: str, start: int, eos_tokens: tuple[str, ...]) -> int:
    """Where the turn starting at `start` ends: just after its first end-of-turn token, else the text's end."""
    ends = [at + len(token) for token in eos_tokens if (at := text.find(token, start)) >= 0]
    return min(ends, default=len(text))


def render(tokenizer: Tokenizer, conversations: list[Conversation]) -> list[Rendered]:
    """Each conversation as tokens, with the tokens of its learned assistant turns marked."""
    texts, all_spans = zip(*(assistant_spans(tokenizer, c) for c in conversations)) if conversations else ((), ())
    rendered = []
    for (ids, offsets), spans in zip(tokenizer.encode_with_offsets(list(texts)), all_spans):
        starts = np.array([start for start, _ in offsets], dtype=np.int64)
        learned = np.zeros(len(ids), dtype=bool)
        for start, end in spans:
            learned |= (starts >= start) & (starts < end)
        rendered.append(Rendered(np.asarray(ids, dtype=np.int32), learned))  # int32: half the memory of a corpus
    return rendered
