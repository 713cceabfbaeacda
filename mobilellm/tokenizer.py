"""Tokenizers: HF `tokenizer.json` with its chat template, or a byte-level BPE trained on a corpus."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .atomic import write_text_atomic
from .errors import UserError
from .schema import Schema, parse_json

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"  # sampling defaults (transformers' format)
EXTRA_EOS_KEY = "mobilellm_eos_tokens"
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>")
# The ChatML template our trained tokenizers carry (the same turn format SmolLM2 uses).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


_TOKEN = (str, dict, type(None))
_FIX = "fix the file or copy the tokenizer's files again"
TOKENIZER_CONFIG_SCHEMA = Schema({"bos_token": _TOKEN, "eos_token": (str, dict, list, type(None)),
                                  "pad_token": _TOKEN, "chat_template": (str, list, type(None)),
                                  EXTRA_EOS_KEY: (list, type(None))}, fix=_FIX)


class TokenizerError(UserError):
    """A tokenizer that is missing, malformed, or does not fit the model."""


class Tokenizer:
    def __init__(self, backend: _HFTokenizer, bos_token: str | None = None, eos_tokens: Iterable[str] = (),
                 pad_token: str | None = None, chat_template: str | None = None, origin: str = "tokenizer"):
        self.backend, self.origin = backend, origin
        self.bos_token, self.pad_token = bos_token, pad_token
        self.eos_tokens = tuple(eos_tokens)
        self.chat_template = chat_template
        for token in (bos_token, pad_token, *self.eos_tokens):
            if token is not None and backend.token_to_id(token) is None:
                raise TokenizerError(f"{origin}: special token {token!r} is not in the vocabulary of "
                                     f"{TOKENIZER_FILE}; fix {TOKENIZER_CONFIG}")

    # ---- ids --------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return tuple(self.token_id(t) for t in self.eos_tokens)

    @property
    def pad_id(self) -> int | None:
        return self.token_id(self.pad_token)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos and self.bos_id is not None else ids

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Per text: its ids and each token's (start, end) character span in the text (the bytes of one
        character split over several tokens all point at that character)."""
        return [(e.ids, e.offsets) for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast skips the character offsets we never read: about twice as fast.
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    # ---- chat -------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template")
        try:
            return _compiled_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_tokens[0] if self.eos_tokens else "")
        except TemplateError as err:  # a syntax error, or an operation the sandboxed renderer refuses
            raise TokenizerError(f"the chat template of {self.origin} cannot be rendered "
                                 f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                                 f"fix {CHAT_TEMPLATE_FILE} or chat_template in {TOKENIZER_CONFIG}") from None

    def check_fits(self, vocab_size: int, special_ids: Iterable[int | None] = ()) -> None:
        """The rule for a tokenizer driving a model with a `vocab_size`-row embedding table: refused when
        its ids reach past the table; when the table exceeds it by more than padding (the larger of 256
        rows and 1% of the table: room models keep for alignment and reserved tokens), which means the
        tokenizer of another model; and when a special id of the model's config (bos, eos, pad) is not
        one of its ids."""
        size = self.vocab_size
        wrong = f"{self.origin}: wrong tokenizer for this model? give the model's own (--tokenizer)"
        if size > vocab_size:
            raise TokenizerError(f"{wrong}: it has {size:,} tokens, the model's vocabulary {vocab_size:,}")
        if vocab_size - size > max(256, vocab_size // 100):
            raise TokenizerError(f"{wrong}: it has {size:,} tokens, {vocab_size - size:,} fewer than the model's "
                                 f"vocabulary ({vocab_size:,}), more than padding explains")
        uncovered = sorted(i for i in special_ids if i is not None and i >= size)
        if uncovered:
            raise TokenizerError(f"{wrong}: the model's special token ids {uncovered} are not among its "
                                 f"{size:,} ids")

    # ---- files ------------------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: str | Path) -> "Tokenizer":
        folder = Path(folder)
        if not (folder / TOKENIZER_FILE).exists():
            raise TokenizerError(f"no {TOKENIZER_FILE} in {folder}")
        return cls.from_files(tokenizer_files(folder), origin=str(folder))

    @classmethod
    def from_files(cls, files: dict[str, str], origin: str = "tokenizer") -> "Tokenizer":
        """Build from the text of tokenizer.json, tokenizer_config.json and chat_template.jinja."""
        try:
            backend = _HFTokenizer.from_str(files[TOKENIZER_FILE])
        except Exception as err:  # the tokenizers library raises plain Exception on bad files
            raise TokenizerError(f"cannot read {TOKENIZER_FILE} of {origin}: {err}") from None
        config = TOKENIZER_CONFIG_SCHEMA.check(
            parse_json(files.get(TOKENIZER_CONFIG, "{}"), f"{origin}/{TOKENIZER_CONFIG}", fix=_FIX),
            f"{origin}/{TOKENIZER_CONFIG}")
        template = files.get(CHAT_TEMPLATE_FILE, config.get("chat_template"))
        eos = config.get(EXTRA_EOS_KEY) or config.get("eos_token")
        eos_tokens = [_token_text(e) for e in (eos if isinstance(eos, list) else [eos]) if e]
        if isinstance(template, list):  # HF's named templates: [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if isinstance(t, dict)
                             and t.get("name") == "default"), None)
        return cls(backend, _token_text(config.get("bos_token")), eos_tokens, _token_text(config.get("pad_token")),
                   template, origin=origin)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / TOKENIZER_FILE, self.backend.to_str(pretty=True))
        # transformers takes one eos_token; every end-of-turn token is kept under our own key.
        config = {"bos_token": self.bos_token, "eos_token": self.eos_tokens[0] if self.eos_tokens else None,
                  EXTRA_EOS_KEY: list(self.eos_tokens), "pad_token": self.pad_token,
                  "tokenizer_class": "PreTrainedTokenizerFast"}
        write_text_atomic(folder / TOKENIZER_CONFIG, json.dumps(config, indent=2) + "\n")
        if self.chat_template:
            write_text_atomic(folder / CHAT_TEMPLATE_FILE, self.chat_template)

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, show_progress: bool = True) -> "Tokenizer":
        """Train a byte-level BPE (GPT-2 style) with our special tokens and a ChatML template."""
        backend = _HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=show_progress)
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend, "<|bos|>", ["<|eos|>", "<|im_end|>"], "<|pad|>", CHATML_TEMPLATE)


@functools.lru_cache(maxsize=8)
def _compiled_template(template: str):
    """A chat template compiled once (SFT data renders every conversation prefix by prefix)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise TokenizerError(f"chat template: {message}")

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def tokenizer_files(folder: str | Path | None) -> dict[str, str]:
    """A folder's tokenizer files as text, to be written beside a checkpoint's weights. The generation defaults
    (generation_config.json: sampling settings) travel with them, so converted and quantized checkpoints keep them."""
    if folder is None:
        return {}
    folder = Path(folder)
    names = (TOKENIZER_FILE, TOKENIZER_CONFIG, CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE)
    return {name: (folder / name).read_text() for name in names if (folder / name).exists()}


def _token_text(token) -> str | None:
    if isinstance(token, dict):  # older tokenizer_config.json stores AddedToken dicts
        return token.get("content")
    return token
