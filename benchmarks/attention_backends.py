"""Where FlexAttention pays: sliding-window attention (pro-1b heads, window 512).

The forward pass on a CPU (FlexAttention has no CPU backward in torch 2.13); forward + backward on a GPU.

Peers in the same run: SDPA with a boolean sliding mask (what the model uses without flex) and SDPA's
plain causal path (all-global attention, the cost sliding windows should undercut at long sequences).
Run: python benchmarks/attention_backends.py [--lengths 1024 2048 4096]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from machine import machine_info, write_json
from mobilellm.attention import attend, attention_mask, flex_block_mask

HEADS, KV_HEADS, HEAD_DIM, WINDOW = 20, 4, 64, 512


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (and compilation for flex)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def step(q, k, v, mask, backend):
    def run():
        if not q.requires_grad:
            with torch.no_grad():
                return attend(q, k, v, mask, backend)
        for t in (q, k, v):
            t.grad = None
        attend(q, k, v, mask, backend).sum().backward()
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backward = device == "cuda"
    for T in args.lengths:
        q = torch.randn(1, HEADS, T, HEAD_DIM, device=device, requires_grad=backward)
        k = torch.randn(1, KV_HEADS, T, HEAD_DIM, device=device, requires_grad=backward)
        v = torch.randn(1, KV_HEADS, T, HEAD_DIM, device=device, requires_grad=backward)
        pos = torch.arange(T, device=device)[None]
        dense = attention_mask("sliding_attention", pos, pos, window=WINDOW)
        block = flex_block_mask("sliding_attention", pos, pos, window=WINDOW)
        flex_s = timed(step(q, k, v, block, "flex"), args.repeats)
        sdpa_s = timed(step(q, k, v, dense, "sdpa"), args.repeats)
        causal_s = timed(step(q, k, v, None, "sdpa"), args.repeats)
        row = {"seq_len": T, "flex_sliding_s": flex_s, "sdpa_sliding_mask_s": sdpa_s, "sdpa_causal_global_s": causal_s,
               "flex_speedup_vs_sdpa_mask": sdpa_s / flex_s, "flex_speedup_vs_global": causal_s / flex_s}
        rows.append(row)
        print(f"T={T:5d}  flex {flex_s * 1e3:8.1f} ms  sdpa+mask {sdpa_s * 1e3:8.1f} ms  "
              f"sdpa causal {causal_s * 1e3:8.1f} ms  flex x{row['flex_speedup_vs_sdpa_mask']:.2f} vs mask")
    write_json(Path(__file__).parent / "results" / "attention_backends.json",
               {"benchmark": "attention_backends", "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                                                              "window": WINDOW, "batch": 1,
                                                              "pass": "forward+backward" if backward else "forward",
                                                              "device": device},
                "rows": rows, "machine": machine_info()})


if __name__ == "__main__":
    main()
