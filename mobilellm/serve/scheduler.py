"""Continuous batching: one engine thread runs every request's tokens through one model, a step at a time.

Each step (1) drops requests that were cancelled or ran past their deadline, freeing their slots, (2) moves
waiting requests into free slots, reusing the longest cached prefix a free slot holds (a multi-turn chat that
extends a slot's previous prompt prefills only the new turn), (3) feeds one chunk of at most `prefill_chunk`
tokens of one joining request, so that a long prompt delays the others by one chunk per step, not by the whole
prompt, and (4) runs one batched decode step for every request past its prompt: tokens (B, 1), each row at its
own position in its own KV slot (infer.slots.SlotCache), int4 weights read once for all rows.

The HTTP side never touches the model: it submits a `Request` and receives events through the request's `emit`
callback (called on the engine thread; the server forwards them to its event loop).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..infer.chat import TextStream
from ..infer.engine import decode_one_token
from ..infer.sampling import SamplingConfig, sample
from ..infer.slots import SlotCache
from ..tokenizer import Tokenizer
from .metrics import Metrics

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More requests wait than the queue holds."""


class EngineStopped(RuntimeError):
    """The engine no longer takes requests (shutting down)."""


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the most likely tokens and their logprobs, best first


@dataclass(frozen=True)
class Token:
    """A generated token: the text it makes safe to show ('' while held back) and its logprobs when asked."""
    token_id: int
    text: str
    logprob: TokenLogprob | None


@dataclass(frozen=True)
class Done:
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens or the slot is full)
    text: str  # the text held back until the end, if any
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV was reused from the slot


@dataclass(frozen=True)
class Failed:
    status: int
    message: str


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingConfig
    emit: Callable[[object], None]
    stop_strings: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the k most likely
    timeout: float = 600.0
    ignore_eos: bool = False
    # engine state
    cancelled: bool = False
    slot: int | None = None
    fed: int = 0  # prompt tokens in the cache
    cached: int = 0
    generated: list[int] = field(default_factory=list)
    submitted: float = field(default_factory=time.monotonic)
    stream: TextStream | None = None
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Called from any thread: the engine drops the request and frees its slot at the next step."""
        self.cancelled = True

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Engine:
    """Serves requests from `n_slots` KV slots of `max_len` tokens each, on its own thread (`start`, `stop`)."""

    def __init__(self, model, tokenizer: Tokenizer, *, n_slots: int, max_len: int, int8_kv: bool,
                 prefill_chunk: int = 256, max_queue: int = 64, prefix_reuse: bool = True,
                 metrics: Metrics | None = None, decode_step=decode_one_token):
        if prefill_chunk < 1 or max_queue < 0:
            raise ValueError(f"prefill_chunk must be >= 1 and max_queue >= 0, got {prefill_chunk}, {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.device = model.norm.weight.device
        self.cache = SlotCache(model.config, n_slots, max_len, model.norm.weight.dtype, int8_kv, self.device)
        self.n_slots, self.max_len, self.prefill_chunk, self.max_queue = n_slots, max_len, prefill_chunk, max_queue
        self.prefix_reuse = prefix_reuse
        self.decode_step = decode_step  # (model, tokens (B, 1), rows view) -> logits (B, V); may be compiled
        self.stop_ids = frozenset(tokenizer.eos_ids or model.config.eos_ids)
        self.metrics = metrics or Metrics()
        self.metrics.slots_total = n_slots
        self.waiting: collections.deque[Request] = collections.deque()
        self.active: dict[int, Request] = {}  # slot -> request
        self.slot_tokens: list[list[int]] = [[] for _ in range(n_slots)]  # what each slot's cache holds
        self.slot_used = [0.0] * n_slots
        self.wake = threading.Condition()
        self.thread: threading.Thread | None = None
        self.driver: threading.Thread | None = None  # the thread running the loop
        self.finished = threading.Event()  # set while no loop runs (before start, after the loop ended)
        self.finished.set()
        self.running = False

    # ---- from the HTTP side -------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        with self.wake:
            if not self.running:
                raise EngineStopped("the server is shutting down")
            if len(self.waiting) >= self.max_queue and len(self.active) >= self.n_slots:
                raise QueueFull(f"{len(self.waiting)} requests are waiting for one of {self.n_slots} slots "
                                f"(the queue holds {self.max_queue}): retry later")
            self.waiting.append(request)
            self.metrics.queue_depth = len(self.waiting)
            self.wake.notify()

    def start(self, on_thread: bool = True) -> "Engine":
        """Start serving: on a thread of its own, or (on_thread=False) on the caller's, which then calls `run`.
        A second call while running does nothing."""
        if self.running:
            return self
        self.running = True
        self.finished.clear()
        if on_thread:
            self.thread = threading.Thread(target=self.run, name="mobilellm-engine", daemon=True)
            self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """From any thread: the loop ends after its current step; what is still queued or running gets a 503."""
        with self.wake:
            self.running = False
            self.wake.notify()
        if threading.current_thread() is not self.driver:
            self.finished.wait(timeout)
        for request in list(self.waiting) + list(self.active.values()):
            request.emit(Failed(503, "the server is shutting down"))

    def warm_up(self) -> None:
        """A prefill on the first two slots, then a decode step of one row and one of two (builds the int4 kernels,
        warms allocators, compiles a compiled decode step's two graphs before the first request), then forgotten."""
        slots = list(range(min(2, self.n_slots)))
        with torch.no_grad():
            for slot in slots:
                view = self.cache.rows([slot])
                tokens = torch.zeros(1, 2, dtype=torch.long, device=self.device)
                self.model.hidden_states(tokens, positions=view.positions(2), cache=view)
            for rows in ([slots[0]], slots) if len(slots) > 1 else ([slots[0]],):
                tokens = torch.zeros(len(rows), 1, dtype=torch.long, device=self.device)
                self.decode_step(self.model, tokens, self.cache.rows(rows))
        for slot in slots:
            self.cache.truncate(slot, 0)

    # ---- the engine thread --------------------------------------------------------------------
    def run(self) -> None:
        """The engine loop, until `stop`: on the engine's thread, or on the main thread (`serve` does that: torch's
        OpenMP teams started from a non-main thread make the int4 kernels several times slower per call)."""
        self.driver = threading.current_thread()
        torch.set_grad_enabled(False)
        try:
            while self.running:
                try:
                    self.step()
                except Exception as err:  # never let the loop die: fail what was running, keep serving
                    log.exception("engine step failed")
                    for slot, request in list(self.active.items()):
                        self._fail(request, 500, f"internal error while generating: {err}")
                        self.cache.truncate(slot, 0)
                        self.slot_tokens[slot] = []
        finally:
            self.finished.set()

    def step(self) -> None:
        """One scheduling step: drop, admit, one prefill chunk, one batched decode step."""
        self._drop_cancelled()
        self._admit()
        if not self.active:
            with self.wake:
                if not self.waiting and self.running:
                    self.wake.wait(0.05)
            return
        joining = [r for r in self.active.values() if r.prefilling]
        if joining:
            self._prefill_chunk(min(joining, key=lambda r: r.submitted))
        decoding = [r for r in self.active.values() if not r.prefilling and r.generated]
        if decoding:
            self._decode(decoding)
        self.metrics.slots_busy = len(self.active)

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        with self.wake:
            for request in [r for r in self.waiting if r.cancelled or now - r.submitted > r.timeout]:
                self.waiting.remove(request)
                self._end_dropped(request, now)
            self.metrics.queue_depth = len(self.waiting)
        for request in [r for r in self.active.values() if r.cancelled or now - r.submitted > r.timeout]:
            self._release(request)
            self._end_dropped(request, now)

    def _end_dropped(self, request: Request, now: float) -> None:
        if request.cancelled:
            self.metrics.requests_cancelled += 1
        else:
            self.metrics.requests_timed_out += 1
            request.emit(Failed(504, f"the request ran past its timeout of {request.timeout:g} s "
                                     f"({len(request.generated)} tokens generated)"))

    def _admit(self) -> None:
        while True:
            free = [s for s in range(self.n_slots) if s not in self.active]
            with self.wake:
                if not free or not self.waiting:
                    self.metrics.queue_depth = len(self.waiting)
                    return
                request = self.waiting.popleft()
            slot, reuse = self._pick_slot(free, request.prompt)
            self.cache.truncate(slot, reuse)
            self.slot_tokens[slot] = self.slot_tokens[slot][:reuse]
            request.slot, request.fed, request.cached = slot, reuse, reuse
            request.stream = TextStream(self.tokenizer, request.stop_strings)
            request.generator = request.sampling.generator()
            self.active[slot] = request
            self.metrics.prompt_tokens += len(request.prompt)
            self.metrics.cached_prompt_tokens += reuse

    def _pick_slot(self, free: list[int], prompt: list[int]) -> tuple[int, int]:
        """The free slot whose cache shares the longest prefix with `prompt` (least recently used on ties), and
        how many of its tokens are reused: at least the prompt's last token is fed again, for its logits."""
        best = None
        for slot in free:
            reuse = min(common_prefix(self.slot_tokens[slot], prompt), len(prompt) - 1)
            if not self.prefix_reuse or not self.cache.can_truncate(slot, reuse):
                reuse = 0
            key = (reuse, -self.slot_used[slot])
            if best is None or key > best[0]:
                best = (key, slot, reuse)
        return best[1], best[2]

    def _prefill_chunk(self, request: Request) -> None:
        slot = request.slot
        chunk = request.prompt[request.fed:request.fed + self.prefill_chunk]
        view = self.cache.rows([slot])
        tokens = torch.tensor([chunk], dtype=torch.long, device=self.device)
        hidden = self.model.hidden_states(tokens, positions=view.positions(len(chunk)), cache=view)
        request.fed += len(chunk)
        self.slot_tokens[slot] += chunk
        if not request.prefilling:
            self._choose([request], self.model.lm_head(hidden[:, -1]).float())

    def _decode(self, requests: list[Request]) -> None:
        view = self.cache.rows([r.slot for r in requests])
        tokens = torch.tensor([[r.generated[-1]] for r in requests], dtype=torch.long, device=self.device)
        logits = self.decode_step(self.model, tokens, view)
        for r in requests:
            self.slot_tokens[r.slot].append(r.generated[-1])
        self.metrics.decode_steps += 1
        self.metrics.decode_rows += len(requests)
        self.metrics.batch_occupancy = len(requests) / self.n_slots
        self._choose(requests, logits)

    def _choose(self, requests: list[Request], logits: torch.Tensor) -> None:
        """Sample each request's next token from its row of logits (B, V); emit it; finish what is done."""
        greedy = all(r.sampling.greedy and r.sampling.penalty == 1.0 for r in requests)
        chosen = logits.argmax(-1).tolist() if greedy else [self._sample(r, row) for r, row in zip(requests, logits)]
        logprobs = logits.log_softmax(-1) if any(r.logprobs is not None for r in requests) else None
        now = time.monotonic()
        for i, (request, token_id) in enumerate(zip(requests, chosen)):
            if not request.generated:
                self.metrics.observe_ttft(now - request.submitted)
            request.generated.append(token_id)
            self.metrics.generation_tokens += 1
            if token_id in self.stop_ids and not request.ignore_eos:
                self._finish(request, "stop")
                continue
            text = request.stream.push(token_id)
            request.emit(Token(token_id, text, self._logprob(logprobs[i], token_id, request.logprobs)
                               if request.logprobs is not None else None))
            if request.stream.stopped:
                self._finish(request, "stop")
            elif len(request.generated) >= request.max_tokens or self.cache.length(request.slot) + 1 > self.max_len:
                self._finish(request, "length")

    def _sample(self, request: Request, row: torch.Tensor) -> int:
        history = None
        if request.sampling.penalty != 1.0:
            history = torch.tensor([request.prompt + request.generated], dtype=torch.long, device=row.device)
        return int(sample(row[None], request.sampling, history, request.generator))

    @staticmethod
    def _logprob(logprobs: torch.Tensor, token_id: int, k: int) -> TokenLogprob:
        top = ()
        if k:
            values, ids = logprobs.topk(k)
            top = tuple(zip(ids.tolist(), values.tolist()))
        return TokenLogprob(token_id, float(logprobs[token_id]), top)

    def _finish(self, request: Request, reason: str) -> None:
        self._release(request)
        request.emit(Done(reason, request.stream.finish(), len(request.prompt), len(request.generated),
                          request.cached))
        self.metrics.requests_finished += 1

    def _fail(self, request: Request, status: int, message: str) -> None:
        self._release(request)
        request.emit(Failed(status, message))

    def _release(self, request: Request) -> None:
        if request.slot is not None and self.active.get(request.slot) is request:
            del self.active[request.slot]
            self.slot_used[request.slot] = time.monotonic()
        self.metrics.slots_busy = len(self.active)
