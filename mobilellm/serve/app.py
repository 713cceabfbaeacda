"""The HTTP layer: OpenAI's routes on Starlette, answering from the engine thread's events.

Starlette (with uvicorn as the server) because it is the small, typed ASGI toolkit under FastAPI, maintained
by the same people as uvicorn and httpx: routing, JSON and streaming responses and client-disconnect
detection, without a validation layer we would bypass anyway (OpenAI's error shapes are built by hand in
protocol.py). Every request runs on the event loop; only the engine thread touches the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..infer.sampling import SamplingConfig
from ..tokenizer import Tokenizer, TokenizerError
from .protocol import APIError, Parsed, Responder, parse
from .scheduler import Done, Engine, EngineStopped, Failed, QueueFull, Request, Token


def error_response(err: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status in (429, 503) else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


class Server:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, *, model_name: str, defaults: SamplingConfig,
                 api_key: str | None = None, request_timeout: float = 600.0):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.defaults, self.api_key, self.request_timeout = defaults, api_key, request_timeout
        self.metrics = engine.metrics
        self.started = int(time.time())

    def app(self) -> Starlette:
        routes = [Route("/health", self.health), Route("/metrics", self.metrics_text),
                  Route("/v1/models", self.models), Route("/v1/models/{name:path}", self.model),
                  Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"])]
        return Starlette(routes=routes, exception_handlers={APIError: self.api_error, HTTPException: self.http_error,
                                                             Exception: self.crash},
                         lifespan=self.lifespan)

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.engine.start()
        try:
            yield
        finally:
            self.engine.stop()

    # ---- plain routes ---------------------------------------------------------------------------
    async def health(self, request: HTTPRequest) -> Response:
        if not self.engine.running:
            return JSONResponse({"status": "stopped"}, status_code=503)
        return JSONResponse({"status": "ok", "slots_busy": self.metrics.slots_busy,
                             "slots_total": self.metrics.slots_total, "queue_depth": self.metrics.queue_depth})

    async def metrics_text(self, request: HTTPRequest) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    def _card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.started, "owned_by": "mobilellm",
                "max_model_len": self.engine.max_len}

    async def models(self, request: HTTPRequest) -> Response:
        self._check_key(request)
        return JSONResponse({"object": "list", "data": [self._card()]})

    async def model(self, request: HTTPRequest) -> Response:
        self._check_key(request)
        if request.path_params["name"] != self.model_name:
            raise APIError(404, f"the model {request.path_params['name']!r} does not exist", "model", "model_not_found")
        return JSONResponse(self._card())

    async def http_error(self, request: HTTPRequest, exc: HTTPException) -> Response:
        return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))

    async def api_error(self, request: HTTPRequest, exc: APIError) -> Response:
        self.metrics.count_request(request.url.path, exc.status)
        return error_response(exc)

    async def crash(self, request: HTTPRequest, exc: Exception) -> Response:
        self.metrics.count_request(request.url.path, 500)
        return error_response(APIError(500, f"internal error: {exc}", kind="server_error"))

    def _check_key(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header Authorization: Bearer <key>",
                           code="invalid_api_key")

    # ---- completions ----------------------------------------------------------------------------
    async def chat(self, request: HTTPRequest) -> Response:
        return await self._complete(request, chat=True)

    async def completions(self, request: HTTPRequest) -> Response:
        return await self._complete(request, chat=False)

    async def _complete(self, http: HTTPRequest, chat: bool) -> Response:
        endpoint = http.url.path
        self._check_key(http)
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON: {err}") from None
        try:
            parsed = parse(body, chat=chat, tokenizer=self.tokenizer, model_name=self.model_name,
                           context=self.engine.max_len, defaults=self.defaults, max_timeout=self.request_timeout)
        except (TokenizerError, ValueError) as err:  # a template's raise_exception, a sampling value out of range
            raise APIError(400, str(err)) from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Request(parsed.prompt, parsed.max_tokens, parsed.sampling,
                      emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                      stop_strings=parsed.stop, logprobs=parsed.logprobs,
                      timeout=parsed.timeout or self.request_timeout, ignore_eos=parsed.ignore_eos)
        try:
            self.engine.submit(job)
        except QueueFull as err:
            raise APIError(429, str(err), code="queue_full", kind="rate_limit_error") from None
        except EngineStopped as err:
            raise APIError(503, str(err), kind="server_error") from None
        responder = Responder(parsed, self.model_name, self.tokenizer)
        deadline = time.monotonic() + job.timeout + 30  # the engine times out first; this bounds the wait
        if parsed.stream:
            self.metrics.count_request(endpoint, 200)
            return StreamingResponse(self._stream(job, events, responder, deadline), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            text, entries = [], []
            while True:
                event = await self._next(http, events, deadline)
                if event is None:  # the client left
                    job.cancel()
                    return Response(status_code=499)
                if isinstance(event, Token):
                    text.append(event.text)
                    entries += [event.logprob] if event.logprob else []
                elif isinstance(event, Done):
                    text.append(event.text)
                    self.metrics.count_request(endpoint, 200)
                    return JSONResponse(responder.body("".join(text), entries, event))
                else:
                    raise APIError(event.status, event.message, kind="server_error")
        finally:
            job.cancel()  # a no-op once finished; frees the slot otherwise

    @staticmethod
    async def _next(http: HTTPRequest, events: asyncio.Queue, deadline: float):
        """The next engine event; None if the client disconnected. Waits at most until `deadline`."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    return None
                if time.monotonic() > deadline:
                    return Failed(504, "no answer from the engine in time")

    async def _stream(self, job: Request, events: asyncio.Queue, responder: Responder, deadline: float):
        def sse(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        try:
            if responder.parsed.chat:
                yield sse(responder.chunk(None, [], role=True))
            while True:
                remaining = deadline - time.monotonic()
                try:
                    event = await asyncio.wait_for(events.get(), timeout=max(remaining, 0.01))
                except asyncio.TimeoutError:
                    event = Failed(504, "no answer from the engine in time")
                if isinstance(event, Token):
                    entries = [event.logprob] if event.logprob else []
                    if event.text or entries:
                        yield sse(responder.chunk(event.text, entries))
                elif isinstance(event, Done):
                    if event.text:
                        yield sse(responder.chunk(event.text, []))
                    yield sse(responder.chunk(None if responder.parsed.chat else "", [], event.finish_reason))
                    if responder.parsed.include_usage:
                        yield sse(responder.usage_chunk(event))
                    break
                else:
                    yield sse(APIError(event.status, event.message, kind="server_error").body())
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # the client went away mid-stream (or we are done): the engine frees the slot
