"""pro-1b training step at sequence 4096 in bf16 on one GPU: tokens/s and MFU, ours vs transformers' Llama.

Ours: the pro-1b model (21 sliding-window layers, 9 global), chunked CE from the hidden states, bf16
autocast over fp32 master weights, fused AdamW; optionally per-block torch.compile and activation
checkpointing, as the pro-1b recipe trains. Peer: transformers' LlamaForCausalLM of the same shape
(hidden, layers, heads, FFN, vocab 202,048), which has no sliding window: all 30 layers global, full
logits, its own loss. MFU counts each model's own FLOPs (`mobilellm.train.metrics.flops_per_token`:
6N + attention over each layer's context), against `--peak-tflops` (H100 SXM dense bf16: 989).

Needs a CUDA GPU (about 40 GB at the defaults); exits with an error otherwise. No result is committed
until it has run on one.

    python benchmarks/train_gpu_mfu.py [--batch 1] [--seq 4096] [--steps 10] [--compile] [--checkpointing]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import machine_info, write_json  # noqa: E402
from mobilellm.config import ModelConfig, all_global  # noqa: E402
from mobilellm.hf import config_to_hf  # noqa: E402
from mobilellm.model import build_model  # noqa: E402
from mobilellm.train.loop import checkpoint_blocks  # noqa: E402
from mobilellm.train.losses import CrossEntropy  # noqa: E402
from mobilellm.train.metrics import flops_per_token  # noqa: E402


def time_steps(step, steps: int, warmup: int = 3) -> float:
    """Median seconds per step on the GPU."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def ours(cfg, batch, args):
    model = build_model(cfg, device="cuda", seed=0)
    if args.compile:
        for block in model.layers:
            block.compile()
    if args.checkpointing:
        checkpoint_blocks(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    loss_fn = CrossEntropy()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model, batch) / batch["targets"].numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def transformers_llama(cfg, batch, args):
    import transformers

    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(config_to_hf(cfg)))
    model.config._attn_implementation = "sdpa"
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=batch["tokens"], labels=batch["tokens"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_gpu_mfu.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: train_gpu_mfu.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured")

    pro = ModelConfig.from_name("pro-1b")
    llama = pro.replace(family="llama", rope_layout="half", layer_types=all_global(pro.n_layers), sliding_window=None)
    tokens = torch.randint(0, pro.vocab_size, (args.batch, args.seq + 1), device="cuda")
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}
    result = {"config": "pro-1b", "batch": args.batch, "seq": args.seq, "compile": args.compile,
              "activation_checkpointing": args.checkpointing, "peak_tflops": args.peak_tflops}
    for name, cfg, build in (("ours", pro, ours), ("transformers_llama_all_global", llama, transformers_llama)):
        seconds = time_steps(build(cfg, batch, args), args.steps)
        tok_s = args.batch * args.seq / seconds
        mfu = tok_s * flops_per_token(cfg, args.seq) / (args.peak_tflops * 1e12)
        result[name] = {"step_s": seconds, "tokens_per_s": tok_s, "mfu": mfu,
                        "flops_per_token": flops_per_token(cfg, args.seq),
                        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9}
        print(f"{name}: {tok_s:,.0f} tok/s, MFU {100 * mfu:.1f}%")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    result["tokens_per_s_ratio_ours_vs_transformers"] = (result["ours"]["tokens_per_s"]
                                                        / result["transformers_llama_all_global"]["tokens_per_s"])
    result["machine"] = {**machine_info(), "gpu": torch.cuda.get_device_name()}
    write_json(Path(args.out), result)


if __name__ == "__main__":
    main()
