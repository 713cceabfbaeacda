"""Decode attention over an int8 KV cache: our C++ kernel (reads the int8 rows) vs dequantize + PyTorch SDPA.

pro-1b's attention shape (20 query heads over 4 KV heads, head dim 64), one query token, n cached slots of
int8 keys and values with per-token, per-head scales. The peer is what a decode step did before the kernel:
dequantize slots [0, n) to float, then F.scaled_dot_product_attention with GQA. Both run in the same process,
interleaved, best of several rounds.

    python benchmarks/int8_kv_attention.py [--threads 1] [--lengths 512 2048 8192]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import machine_info, write_json  # noqa: E402
from mobilellm.quant.kernels import int8_kv_attention, load_extension  # noqa: E402
from mobilellm.quant.math import quantize_kv_int8  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "int8_kv_attention.json"


def best_time(fn, repeats: int, rounds: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if load_extension() is None:
        raise SystemExit("the C++ kernels do not build here: nothing to compare")
    results = {}
    for n in args.lengths:
        gen = torch.Generator().manual_seed(n)
        k, k_scale = quantize_kv_int8(torch.randn(1, 4, n, 64, generator=gen))
        v, v_scale = quantize_kv_int8(torch.randn(1, 4, n, 64, generator=gen))
        q = torch.randn(1, 20, 1, 64, generator=gen)
        repeats = max(5, 20_000 // n)
        kernel = best_time(lambda: int8_kv_attention(q, k, k_scale, v, v_scale, n, backend="cpp"), repeats)
        peer = best_time(lambda: int8_kv_attention(q, k, k_scale, v, v_scale, n, backend="reference"), repeats)
        results[n] = {"int8_kernel_s": kernel, "dequantize_sdpa_s": peer, "speedup": peer / kernel}
        print(f"{n:>6} slots: kernel {kernel * 1e6:7.0f} us, dequantize + SDPA {peer * 1e6:7.0f} us, "
              f"{peer / kernel:.2f}x", flush=True)
    write_json(args.out, {"benchmark": "int8_kv_attention",
                          "shape": "1 query token, 20 query heads over 4 KV heads, head dim 64 (pro-1b)",
                          "results": results, "machine": machine_info()})


if __name__ == "__main__":
    main()
