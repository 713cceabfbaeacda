"""Decode-step speed of packed int4 vs fp32/bf16 PyTorch, against the memory-bandwidth roofline.

Batch 1, one token: every weight is read once, so the floor is (bytes of weights) / (read bandwidth),
with the bandwidth measured in the same run (a large tensor sum). Per matrix: pro-1b's shapes. Whole
model: pro-1b at 30 layers in bf16 and int4 (fp32 pro-1b is 4.3 GB, past this machine's budget: fp32 is
compared on the first `--fp32-layers` layers + LM head, with int4 and bf16 on the same subset). Weights are
random (speed does not depend on values); the int4 model is built on the meta device and given packed
buffers directly, then saved and re-loaded in a subprocess to measure the resident memory of loading it.

    python benchmarks/int4_decode.py [--threads 1] [--out benchmarks/results/int4_decode.json]
"""

from __future__ import annotations

import argparse
import gc

import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mobilellm.config import ModelConfig  # noqa: E402
from mobilellm.model import build_model  # noqa: E402
from mobilellm.quant import QuantConfig  # noqa: E402
from mobilellm.quant import math as qm  # noqa: E402
from mobilellm.quant.checkpoint import quantized_skeleton, save_quantized  # noqa: E402
from mobilellm.quant.kernels import int4_linear, load_extension, row_correction  # noqa: E402
from mobilellm.quant.layout import to_panels  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info, read_bandwidth, write_json  # noqa: E402

SHAPES = {"q/o_proj": (1280, 1280), "k/v_proj": (256, 1280), "gate/up_proj": (6144, 1280),
          "down_proj": (1280, 6144), "lm_head": (202048, 1280),
          # what a decode step runs after Transformer.fuse_projections (generate, chat)
          "qkv_proj (fused)": (1792, 1280), "gate_up_proj (fused)": (12288, 1280)}  # weight (out, in)
GiB = 2**30


def timeit(fn, min_time=0.4, max_reps=200) -> float:
    """Median seconds per call after a warm-up."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def int4_weight(n, k, group, scale_dtype=torch.float16):
    """Random packed int4 (n, k/2) and scales (n, k/group), built in row chunks (the LM head is 202k rows)."""
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    scales = (torch.rand(n, k // group) * 0.02 + 0.001).to(scale_dtype)
    return packed, scales


def aten_int4pack(packed, scales, group):
    """PyTorch's own weight-only int4 CPU op (tinygemm layout), for comparison."""
    q = qm.unpack_int4(packed).to(torch.int32) + 8  # (N, K) in [0, 15]
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.stack([scales.float().t(), torch.zeros_like(scales.float().t())], -1).contiguous()  # (K/g, N, 2)
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, group, sz)


def aten_dyn_quant(packed, scales, group, k, n):
    """PyTorch's int8-dynamic-activation x int4 op (KleidiAI on Arm, a reference loop elsewhere)."""
    q = qm.unpack_int4(packed).to(torch.int32) + 8
    u8 = (q[:, 1::2] << 4 | q[:, 0::2]).to(torch.uint8)
    w = torch.ops.aten._dyn_quant_pack_4bit_weight(u8, scales.float(), None, group, k, n)
    return lambda x: torch.ops.aten._dyn_quant_matmul_4bit(x, w, group, k, n)


COLD_BYTES = 256 * 2**20  # > the L3 cache: copies of a matrix cycled so each call reads it from memory


def cold_copies(nbytes: int) -> int:
    return max(1, -(-COLD_BYTES // nbytes))


def cycling(calls):
    """One callable that runs the given ones in turn (each on its own copy of the weights)."""
    state = {"i": 0}

    def call():
        calls[state["i"] % len(calls)]()
        state["i"] += 1
    return call


def bench_matrices(bandwidth: float, with_aten: bool) -> dict:
    """Per matrix, one decode GEMV, weights read from memory (not the caches): every variant cycles through
    copies of its weights adding up to > 256 MB, as a model's layers follow one another."""
    results = {}
    for name, (n, k) in SHAPES.items():
        x = torch.randn(1, k)
        packed, scales = int4_weight(n, k, 32)
        int4_bytes = packed.numel() + scales.numel() * scales.element_size()
        row = {"shape_out_in": [n, k], "int4_bytes": int4_bytes,
               "roofline_int4_s": int4_bytes / bandwidth}
        copies = [(packed, scales)] + [int4_weight(n, k, 32) for _ in range(cold_copies(int4_bytes) - 1)]
        panels = [to_panels(p, s) for p, s in copies]  # the int8-activation kernel's layout
        corrs = [row_correction(p, s, 32) for p, s in panels]  # once per matrix, as QuantizedLinear caches it
        row["int4_a8_s"] = timeit(cycling([lambda p=p, s=s, c=c: int4_linear(x, p, s, 32, True, "cpp", c)
                                           for (p, s), c in zip(panels, corrs)]))
        row["int4_weight_only_s"] = timeit(cycling([lambda p=p, s=s: int4_linear(x, p, s, 32, False, "cpp")
                                                    for p, s in copies]))
        del copies, panels, corrs
        if with_aten and n <= 8192:
            row["aten_int4pack_mm_s"] = timeit(lambda f=aten_int4pack(packed, scales, 32): f(x))
            row["aten_dyn_quant_matmul_4bit_s"] = timeit(lambda f=aten_dyn_quant(packed, scales, 32, k, n): f(x))
        for dtype, key in ((torch.float32, "fp32_s"), (torch.bfloat16, "bf16_s")):
            xd = x.to(dtype)
            weights = [torch.randn(n, k, dtype=dtype) for _ in range(cold_copies(n * k * xd.element_size()))]
            row[key] = timeit(cycling([lambda w=w: xd @ w.T for w in weights]))
            del weights
            gc.collect()
        row["speedup_vs_fp32"] = row["fp32_s"] / row["int4_a8_s"]
        row["speedup_vs_bf16"] = row["bf16_s"] / row["int4_a8_s"]
        row["fraction_of_roofline"] = row["roofline_int4_s"] / row["int4_a8_s"]
        results[name] = row
        print(f"{name:13s} {n}x{k}: int4 {row['int4_a8_s'] * 1e3:7.3f} ms  fp32 {row['fp32_s'] * 1e3:7.3f}  "
              f"bf16 {row['bf16_s'] * 1e3:7.3f}  roofline {row['roofline_int4_s'] * 1e3:6.3f}  "
              f"({row['fraction_of_roofline']:.0%} of roofline)", flush=True)
    return results


def pro1b(n_layers: int | None = None) -> ModelConfig:
    cfg = ModelConfig.from_name("pro-1b")
    if n_layers:
        cfg = cfg.replace(n_layers=n_layers, layer_types=cfg.layer_types[:n_layers])
    return cfg


def random_int4_model(cfg: ModelConfig, config: QuantConfig):
    """The converted model's skeleton (meta device) given random packed buffers: no float weights ever."""
    model = quantized_skeleton(cfg, config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if buf.dtype == torch.uint8:
                buf.random_(0, 256)
            else:
                buf.uniform_(0.001, 0.02)
        for p in model.parameters():
            p.fill_(1.0)
    model.lm_head.packed_weight, model.lm_head.weight_scale = model.embed_tokens.packed_weight, model.embed_tokens.weight_scale
    return model


def random_float_model(cfg: ModelConfig, dtype):
    model = build_model(cfg, device="meta", dtype=dtype)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.lm_head.weight = model.embed_tokens.weight
    return model


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen and t.ndim > 1:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def decode_step_time(model) -> float:
    """One decode step, batch 1, with a 64-token int8/float KV cache already filled (infer's engine)."""
    from mobilellm.infer.engine import decode_one_token, new_cache, prefill
    cache = new_cache(model, max_len=128)
    prefill(model, torch.zeros(1, 64, dtype=torch.long), cache)
    token = torch.zeros(1, 1, dtype=torch.long)

    def step():
        decode_one_token(model, token, cache)
        cache.next_position -= 1  # decode the same position again: the cache never fills
    return timeit(step, min_time=2.0, max_reps=20)


def bench_models(bandwidth: float, fp32_layers: int) -> dict:
    results = {}
    quant = QuantConfig.from_scheme("cpu")
    for label, cfg in ((f"pro-1b first {fp32_layers} layers + lm_head", pro1b(fp32_layers)), ("pro-1b", pro1b())):
        row = {}
        kinds = ["int4", "bf16"] + (["fp32"] if cfg.n_layers == fp32_layers else [])
        for kind in kinds:
            model = random_int4_model(cfg, quant) if kind == "int4" else \
                random_float_model(cfg, torch.bfloat16 if kind == "bf16" else torch.float32)
            model.fuse_projections()  # as generate runs every kind
            nbytes = weight_bytes(model)
            # The embedding table is not read in a decode step except one row; the LM head (tied) is.
            row[f"{kind}_weight_bytes"] = nbytes
            row[f"{kind}_s"] = decode_step_time(model)
            row[f"{kind}_roofline_s"] = nbytes / bandwidth
            print(f"{label}: {kind} decode step {row[f'{kind}_s'] * 1e3:8.1f} ms  "
                  f"(roofline {row[f'{kind}_roofline_s'] * 1e3:.1f} ms, {nbytes / GiB:.2f} GiB)", flush=True)
            del model
            gc.collect()
        row["int4_fraction_of_roofline"] = row["int4_roofline_s"] / row["int4_s"]
        row["int4_speedup_vs_bf16"] = row["bf16_s"] / row["int4_s"]
        if "fp32_s" in row:
            row["int4_speedup_vs_fp32"] = row["fp32_s"] / row["int4_s"]
        results[label] = row
    return results


# VmHWM (peak RSS of this process image), not ru_maxrss: Linux carries ru_maxrss over from the parent
# through fork + exec, so a child started by a big parent would report the parent's peak.
LOAD_SCRIPT = """
import re, sys, time
sys.path.insert(0, {root!r})
import torch
from mobilellm.quant.checkpoint import load_quantized
from mobilellm.quant.kernels import load_extension
def hwm():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
load_extension()
base = hwm()
t = time.perf_counter()
model, _ = load_quantized({folder!r})
model(torch.zeros(1, 1, dtype=torch.long))
print(base, hwm(), time.perf_counter() - t)
"""


def bench_load_memory() -> dict:
    """Save an int4 pro-1b, load it in a fresh process: peak RSS above the interpreter + torch baseline."""
    config = QuantConfig.from_scheme("cpu")
    model = random_int4_model(pro1b(), config)
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        folder = Path(tmp) / "pro-1b-int4"
        save_quantized(model, config, folder)
        del model
        gc.collect()
        file_bytes = sum(f.stat().st_size for f in folder.iterdir())
        root = str(Path(__file__).resolve().parents[1])
        out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT.format(root=root, folder=str(folder))],
                             capture_output=True, text=True, check=True).stdout.split()
    base, peak, seconds = int(out[0]), int(out[1]), float(out[2])
    result = {"checkpoint_bytes": file_bytes, "peak_rss_bytes": peak, "baseline_rss_bytes": base,
              "rss_above_baseline_bytes": peak - base, "load_and_first_token_s": seconds,
              "fp32_model_bytes": 4 * 1_084_453_120, "paper_cpu_scheme_bytes": 590e6}
    print(f"int4 pro-1b checkpoint {file_bytes / 1e6:.0f} MB; loading peak RSS {peak / 1e6:.0f} MB "
          f"({(peak - base) / 1e6:.0f} MB above the bare interpreter+torch)", flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fp32-layers", type=int, default=6)
    parser.add_argument("--no-aten", action="store_true", help="skip PyTorch's own int4 ops (slow here)")
    parser.add_argument("--parts", nargs="+", default=["matrices", "models", "load"],
                        help="matrices (per-matrix GEMV), models (decode steps), load (RSS of loading int4 pro-1b)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "int4_decode.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if load_extension() is None:
        sys.exit("the C++ int4 kernels do not build on this machine: nothing to benchmark")
    bandwidth = read_bandwidth()
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s at {args.threads} thread(s)", flush=True)
    results = {"machine": machine_info(), "read_bandwidth_bytes_per_s": bandwidth,
               "matrices": bench_matrices(bandwidth, not args.no_aten) if "matrices" in args.parts else None,
               "models": bench_models(bandwidth, args.fp32_layers) if "models" in args.parts else None,
               "load_memory": bench_load_memory() if "load" in args.parts else None,
               "peak_rss_bytes_of_benchmark": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               "notes": "decode step = infer's decode_one_token with a 64-token KV cache, batch 1; int4 = the "
                        "cpu scheme (int8 dynamic activations, int4 group-32 weights, tied head shared); fp32 "
                        "only on the first layers (memory budget); roofline = weight bytes / measured read "
                        "bandwidth (single streaming sum) at the same thread count"}
    out = Path(args.out)
    write_json(out, results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
