"""CPU training-step throughput: our model + chunked CE + AdamW vs transformers' LlamaForCausalLM, same shape.

Both train the same config (starter-student in the Llama layout: all-global attention, so that HF's
Llama runs exactly the same computation) on the same batch: forward, loss, backward, AdamW step. The two
steps alternate in one process so both see the same machine load; the median per-step time is compared.

    python benchmarks/train_throughput.py [--batch 4] [--seq 256] [--rounds 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import machine_info, write_json  # noqa: E402
from mobilellm.config import ModelConfig, all_global  # noqa: E402
from mobilellm.hf import config_to_hf  # noqa: E402
from mobilellm.model import build_model  # noqa: E402
from mobilellm.train.losses import CrossEntropy  # noqa: E402


def our_step(model, optimizer, batch):
    loss = CrossEntropy()(model, batch) / batch["targets"].numel()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def hf_step(model, optimizer, batch):
    model(input_ids=batch["tokens"], labels=batch["labels"]).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main():
    import transformers

    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="1 is steadier on a shared machine")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_throughput.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = ModelConfig.from_name("starter-student").replace(
        family="llama", rope_layout="half", layer_types=all_global(8), sliding_window=None)
    ours = build_model(cfg, seed=0)
    hf_config = transformers.LlamaConfig.from_dict(config_to_hf(cfg))
    hf = transformers.LlamaForCausalLM(hf_config).train()
    hf.config._attn_implementation = "sdpa"
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "labels": tokens[:, :-1]}  # HF shifts labels itself
    runs = {"ours": (our_step, ours, torch.optim.AdamW(ours.parameters(), lr=1e-4)),
            "transformers": (hf_step, hf, torch.optim.AdamW(hf.parameters(), lr=1e-4))}
    times = {name: [] for name in runs}
    for round_ in range(args.rounds + 1):
        for name, (step, model, optimizer) in runs.items():
            start = time.perf_counter()
            step(model, optimizer, batch)
            if round_ > 0:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
    tokens_per_step = args.batch * args.seq
    result = {"config": cfg.name + " (Llama layout, all-global)", "parameters": ours.num_parameters(),
              "batch": args.batch, "seq": args.seq, "rounds": args.rounds}
    for name, values in times.items():
        result[name] = {"median_step_s": statistics.median(values), "tokens_per_s": tokens_per_step / statistics.median(values),
                        "step_s": values}
    result["speedup_ours_vs_transformers"] = result["transformers"]["median_step_s"] / result["ours"]["median_step_s"]
    result["machine"] = machine_info()
    write_json(Path(args.out), result)
    print(f"ours {result['ours']['tokens_per_s']:.0f} tok/s, transformers {result['transformers']['tokens_per_s']:.0f} "
          f"tok/s: ours x{result['speedup_ours_vs_transformers']:.2f}")


if __name__ == "__main__":
    main()
