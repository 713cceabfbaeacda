"""`mobilellm serve`: an OpenAI-compatible HTTP server for a checkpoint, with continuous batching."""

from __future__ import annotations

import signal
import sys
import threading

from ..infer.sampling import SamplingConfig
from .generate import load, pick_decode_step, set_threads


def serve(checkpoint: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 8, context: int = 4096, prefill_chunk: int = 256, max_queue: int = 64,
          request_timeout: float = 600.0, prefix_reuse: bool = True, model_name: str | None = None, sampling: SamplingConfig = SamplingConfig(),
          int8_kv: bool = False, threads: int | None = None, compile: bool = False) -> None:
    """Serve a checkpoint over OpenAI's API: POST /v1/chat/completions and /v1/completions (streaming or not),
    GET /v1/models, /health and /metrics (Prometheus).

    Concurrent requests share one batched decode step, each in its own KV slot at its own position; a request
    joins and leaves between steps, and long prompts are prefilled in chunks between decode steps. A request
    whose prompt extends what a free slot holds (the next turn of a chat) reuses that slot's cached tokens.

    Args:
        checkpoint: a checkpoint folder (HF layout with tokenizer.json; int4 ones too), or smollm2-135m
        host: address to listen on (127.0.0.1: this machine only)
        port: TCP port
        api_key: when set, /v1 requests must send "Authorization: Bearer KEY" (else 401)
        max_batch: KV slots, the most requests generating at once; more wait in the queue
        context: tokens per slot, prompt and completion together (capped at the model's context)
        prefill_chunk: prompt tokens fed per step: other requests wait at most one chunk between their tokens
        max_queue: requests that may wait for a slot; beyond, 429
        request_timeout: seconds a request may take from arrival to its last token (then 504 / an error event); a
            request may ask for less with the extra body field "timeout" (seconds), never for more
        prefix_reuse: reuse a free slot's cached tokens for a prompt that starts with them (off: every prompt is
            prefilled from scratch, so a request's numbers never depend on what ran before it)
        model_name: the name clients send as "model" (default: the checkpoint folder's name)
        sampling: the server's sampling defaults: a request's values override them, and unset ones come from
            the checkpoint's generation_config.json
        int8_kv: keep the KV cache in int8 (always on for int8-KV quantization schemes)
        threads: CPU threads for torch
        compile: torch.compile the batched decode step (as generate --compile: one graph for a batch of one, one
            for any larger batch, both compiled before the server answers /health: minutes the first time, cached
            on disk after)
    """
    import uvicorn

    from ..artifacts import resolve_checkpoint
    from ..serve.app import Server
    from ..serve.scheduler import Engine

    if max_batch < 1 or context < 2:
        raise ValueError(f"--max-batch must be >= 1 and --context >= 2, got {max_batch}, {context}")
    if request_timeout <= 0:
        raise ValueError(f"--request-timeout must be positive, got {request_timeout}")
    set_threads(threads)
    model, tokenizer, scheme_int8_kv, defaults = load(checkpoint)
    context = min(context, model.config.max_seq_len)
    engine = Engine(model, tokenizer, n_slots=max_batch, max_len=context, int8_kv=int8_kv or scheme_int8_kv,
                    prefill_chunk=prefill_chunk, max_queue=max_queue, prefix_reuse=prefix_reuse,
                    decode_step=pick_decode_step(model, compile))
    engine.warm_up()
    name = model_name or resolve_checkpoint(checkpoint).name
    server = Server(engine, tokenizer, model_name=name, defaults=sampling.over(defaults), api_key=api_key,
                    request_timeout=request_timeout)
    print(f"serving {name} on http://{host}:{port}/v1 ({max_batch} slots of {context} tokens)", file=sys.stderr,
          flush=True)
    # The engine loop runs on the main thread (the int4 kernels' OpenMP teams are several times slower per call
    # from another thread); HTTP on a thread of its own. SIGINT / SIGTERM stop HTTP, whose shutdown stops the engine.
    http = uvicorn.Server(uvicorn.Config(server.app(), host=host, port=port, log_level="warning",
                                         timeout_graceful_shutdown=5))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: setattr(http, "should_exit", True))
    engine.start(on_thread=False)
    web = threading.Thread(target=http.run, name="mobilellm-http")
    web.start()
    watcher = threading.Thread(target=lambda: (web.join(), engine.stop(timeout=0)), daemon=True)
    watcher.start()  # HTTP ending for any reason (a port in use, a shutdown) ends the engine loop
    engine.run()
    web.join()
    if not http.started:
        raise SystemExit(f"mobilellm serve: could not start the HTTP server on {host}:{port} (see the error above)")
