"""int4 decode speed of the full 30-layer pro-1b against the memory-bandwidth roofline of this machine.

Decoding one token reads every weight once (the tied int4 table once, through the LM head) plus the KV
cache, so tokens/s can be at most bandwidth / bytes-per-token. The model is the cpu scheme's converted
skeleton (packed int4 group-32 weights and embeddings with fp16 scales, int8 dynamic activations) filled
with random packed values: a real 30-layer pro-1b int4 runtime (~0.6 GB) without ever building the 4.3 GB
fp32 model. Bandwidth is measured in the same run (a sum over a 1 GiB fp32 tensor, best of several).

    python benchmarks/int4_roofline.py [--prompt 128] [--decode-tokens 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.int4_decode import random_int4_model  # noqa: E402
from benchmarks.machine import machine_info, peak_rss_mib, read_bandwidth, write_json  # noqa: E402
from mobilellm.config import ModelConfig  # noqa: E402
from mobilellm.infer.engine import compiled_decode_step, decode_one_token, new_cache, prefill  # noqa: E402
from mobilellm.quant import QuantConfig  # noqa: E402
from mobilellm.quant.kernels import default_backend  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "int4_roofline.json"


def weight_bytes_per_token(model) -> int:
    """Bytes a decode step reads: every tensor once (tied buffers are one storage, counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=16, help="tokens per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; the best counts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd decode step")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = ModelConfig.from_name("pro-1b")
    scheme = QuantConfig.from_scheme("cpu")
    model = random_int4_model(config, scheme).fuse_projections()  # as generate runs it
    weights = weight_bytes_per_token(model)
    tokens = torch.randint(0, config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))

    bandwidths = []

    def decode_speed(step) -> tuple[float, int]:
        """Best of `rounds` rounds of decode_tokens tokens; the bandwidth is measured before each round (this
        machine's speed drifts by 10% between minutes: best against best)."""
        cache = new_cache(model, max_len=args.prompt + (args.rounds + 1) * args.decode_tokens + 4, int8=scheme.kv_int8)
        logits = prefill(model, tokens, cache)
        for _ in range(3):  # warm-up (and, compiled, the compilations)
            logits = step(model, logits.argmax(-1, keepdim=True), cache)
        best = 0.0
        for _ in range(args.rounds):
            bandwidths.append(read_bandwidth() / 1e9)
            start = time.perf_counter()
            for _ in range(args.decode_tokens):
                logits = step(model, logits.argmax(-1, keepdim=True), cache)
            best = max(best, args.decode_tokens / (time.perf_counter() - start))
        return best, cache.nbytes()

    tok_s, kv_bytes = decode_speed(decode_one_token)
    compiled_tok_s = decode_speed(compiled_decode_step(model))[0] if args.compile else None
    bandwidth = max(bandwidths)
    roofline_tok_s = bandwidth * 1e9 / (weights + kv_bytes)  # kv_bytes: an upper bound on what attention reads
    result = {
        "benchmark": "int4_roofline",
        "model": "pro-1b (30 layers), cpu scheme: int4 group-32 weights + embeddings, fp16 scales, int8 dynamic "
                 "activations, int8 KV; random packed values; q/k/v and gate/up fused (as generate runs it)",
        "int4_backend": default_backend(),
        "prompt_tokens": args.prompt, "decode_tokens": args.decode_tokens, "rounds": args.rounds,
        "weight_bytes_per_token": weights, "kv_cache_bytes": kv_bytes,
        "read_bandwidth_gb_s": bandwidth, "roofline_tok_s": roofline_tok_s,
        "decode_tok_s": tok_s, "fraction_of_roofline": tok_s / roofline_tok_s,
        "compiled_decode_tok_s": compiled_tok_s,
        "compiled_fraction_of_roofline": compiled_tok_s / roofline_tok_s if compiled_tok_s else None,
        "peak_rss_mib": peak_rss_mib(), "machine": machine_info(),
    }
    write_json(args.out, result)
    if compiled_tok_s:
        print(f"compiled: {compiled_tok_s:.2f} tok/s, {100 * compiled_tok_s / roofline_tok_s:.0f}% of the roofline")
    print(f"int4 pro-1b decode {tok_s:.2f} tok/s; weights {weights / 1e6:.0f} MB/token; bandwidth "
          f"{bandwidth:.1f} GB/s -> roofline {roofline_tok_s:.2f} tok/s; {100 * tok_s / roofline_tok_s:.0f}% of it")


if __name__ == "__main__":
    main()
