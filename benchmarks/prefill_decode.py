"""Prefill time and decode speed at long contexts: pro-1b local/global vs all-global vs transformers' Llama.

pro-1b's shapes (dim 1280, FFN 6144, 20/4 heads, head dim 64, vocab 202,048), random fp32 weights. A full
30-layer fp32 model is 4.3 GB and an 8k prefill takes minutes on this shared 2-core CPU, so the default runs
the first `--layers 10` layers of pro-1b's pattern (3 global + 7 sliding: the 30% global share of 9 of 30).

The three peers share ONE set of weight tensors (so memory stays at one model) and are run interleaved,
length by length, so that the load other users put on the machine hits them alike:
  ours-local-global  our engine: chunked prefill through the ring-buffer cache (a sliding layer's chunk sees
                     at most window + chunk keys), then decode_one_token
  ours-all-global    the same weights with every layer global (the model card's baseline)
  hf-llama           transformers' LlamaForCausalLM of the same shape (all global, rotate-half RoPE: same
                     FLOPs), one-shot prefill into its DynamicCache with logits_to_keep=1, as `generate` does
Wall time and process CPU time are both recorded. Resident memory during a generation at the longest length is sampled
in a fresh subprocess running only our engine (local/global; fp32 KV, and int8 KV with --int8-kv).

    python benchmarks/prefill_decode.py [--layers 10] [--lengths 2000 4000 8000] [--decode-tokens 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import RssSampler, machine_info, write_json  # noqa: E402
from mobilellm.config import ModelConfig, all_global  # noqa: E402
from mobilellm.hf import to_hf_name  # noqa: E402
from mobilellm.infer.engine import PREFILL_CHUNK, decode_one_token, new_cache, prefill  # noqa: E402
from mobilellm.model import build_model  # noqa: E402

PEERS = ("ours-local-global", "ours-all-global", "hf-llama")
RESULTS = Path(__file__).parent / "results" / "prefill_decode.json"


def bench_config(layers: int, global_only: bool = False) -> ModelConfig:
    pro = ModelConfig.from_name("pro-1b")
    types = all_global(layers) if global_only else pro.layer_types[:layers]
    return pro.replace(name=f"pro-1b-{layers}L" + ("-all-global" if global_only else ""), n_layers=layers,
                       layer_types=types)


def random_model(config: ModelConfig, seed: int = 0):
    """Random N(0, 0.02) weights written in place: no init temporaries inflating the peak RSS."""
    model = build_model(config, device="meta").to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=gen) if p.ndim > 1 else p.fill_(1.0)
    model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def sharing_weights(config: ModelConfig, weights: dict):
    """Our Transformer for `config` whose parameters ARE the given tensors (no copy)."""
    model = build_model(config, device="meta")
    model.load_state_dict(weights, assign=True)
    model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def hf_sharing_weights(config: ModelConfig, weights: dict):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_config = LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.ffn_dim,
                            num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
                            num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim,
                            tie_word_embeddings=True, max_position_embeddings=config.max_seq_len,
                            rope_theta=config.rope_theta, rms_norm_eps=config.norm_eps)
    hf_config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_config)
    model.load_state_dict({to_hf_name(k, "llama"): v for k, v in weights.items()}, assign=True)
    model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = LlamaRotaryEmbedding(config=hf_config)  # its buffers were on meta
    return model.eval()


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


@torch.no_grad()
def run_ours(model, tokens, decode_tokens: int, chunk: int, int8_kv: bool = False) -> dict:
    cache = new_cache(model, max_len=tokens.shape[1] + decode_tokens, int8=int8_kv)
    logits, wall, cpu = timed(lambda: prefill(model, tokens, cache, chunk))

    def decode():
        nonlocal logits
        for _ in range(decode_tokens):
            logits = decode_one_token(model, logits.argmax(-1, keepdim=True), cache)

    _, d_wall, d_cpu = timed(decode)
    return {"prefill_s": wall, "prefill_cpu_s": cpu, "decode_tok_s": decode_tokens / d_wall,
            "decode_cpu_s_per_tok": d_cpu / decode_tokens, "kv_cache_mib": cache.nbytes() / 2**20}


@torch.no_grad()
def run_hf(model, tokens, decode_tokens: int) -> dict:
    from transformers import DynamicCache

    result, wall, cpu = timed(lambda: model(input_ids=tokens, past_key_values=DynamicCache(config=model.config),
                                            use_cache=True, logits_to_keep=1))

    def decode():
        nonlocal result
        for _ in range(decode_tokens):
            result = model(input_ids=result.logits[:, -1].argmax(-1, keepdim=True),
                           past_key_values=result.past_key_values, use_cache=True, logits_to_keep=1)

    _, d_wall, d_cpu = timed(decode)
    return {"prefill_s": wall, "prefill_cpu_s": cpu, "decode_tok_s": decode_tokens / d_wall,
            "decode_cpu_s_per_tok": d_cpu / decode_tokens}


def prefill_flops(config: ModelConfig, n: int) -> dict:
    """Multiply-add FLOPs (x2) of prefilling n tokens: the projections and MLP of every token, and attention's
    two matmuls over the keys each query sees (causal, or at most `window` for a sliding layer)."""
    d, hd = config.dim, config.head_dim
    per_token = 2 * (d * hd * (2 * config.n_heads + 2 * config.n_kv_heads) + 3 * d * config.ffn_dim)
    pairs = {"full_attention": n * (n + 1) // 2}
    w = min(config.sliding_window or n, n)
    pairs["sliding_attention"] = w * (w + 1) // 2 + (n - w) * w
    attention = sum(4 * config.n_heads * hd * pairs[t] for t in config.layer_types)
    return {"linear": per_token * n * config.n_layers, "attention": attention}


def flop_bound(config: ModelConfig, n: int) -> float:
    """The most a local/global model can gain over its all-global twin in prefill if time follows FLOPs."""
    lg, ag = prefill_flops(config, n), prefill_flops(config.replace(layer_types=all_global(config.n_layers)), n)
    return sum(ag.values()) / sum(lg.values())


def compute_ratios(results: dict, peers) -> dict:
    """Ours (local/global) against each peer, per length: > 1 means ours is faster. Wall-clock and CPU-time
    ratios both, since other users' load changes the wall clock between peers."""
    ratios = {}
    for n, ours in results["ours-local-global"].items():
        row = {}
        for peer in peers[1:]:
            other = results[peer][n]
            row[f"prefill_speedup_vs_{peer}"] = other["prefill_s"] / ours["prefill_s"]
            row[f"prefill_cpu_speedup_vs_{peer}"] = other["prefill_cpu_s"] / ours["prefill_cpu_s"]
            row[f"decode_speedup_vs_{peer}"] = ours["decode_tok_s"] / other["decode_tok_s"]
            row[f"decode_cpu_speedup_vs_{peer}"] = other["decode_cpu_s_per_tok"] / ours["decode_cpu_s_per_tok"]
        ratios[n] = row
    return ratios


def flop_bounds(layers: int, lengths) -> dict:
    full = ModelConfig.from_name("pro-1b")
    return {str(n): {f"first_{layers}_layers": flop_bound(bench_config(layers), n), "pro-1b_30_layers": flop_bound(full, n)}
            for n in lengths}


def rss_worker(args) -> None:
    """Resident memory during one generation at the longest length (fresh process, our engine only)."""
    model = random_model(bench_config(args.layers))
    n = max(args.lengths)
    tokens = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
    with RssSampler() as rss:
        result = run_ours(model, tokens, args.decode_tokens, args.chunk, args.int8_kv)
    print(json.dumps({"tokens": n, "int8_kv": args.int8_kv, "rss_before_generation_mib": rss.start_mib,
                      "peak_rss_during_generation_mib": rss.peak_mib, "kv_cache_mib": result["kv_cache_mib"]}))


def measure_memory(args) -> list[dict]:
    memory = []
    for int8 in (False,) + ((True,) if args.int8_kv else ()):
        cmd = [sys.executable, __file__, "--rss-worker", "--layers", str(args.layers), "--chunk", str(args.chunk),
               "--decode-tokens", str(args.decode_tokens), "--lengths", str(max(args.lengths))]
        run = subprocess.run(cmd + (["--int8-kv"] if int8 else []), stdout=subprocess.PIPE, text=True, check=True)
        memory.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(f"RSS at {max(args.lengths)} tokens (int8 KV {int8}): peak {memory[-1]['peak_rss_during_generation_mib']:.0f}"
              f" MiB during generation, {memory[-1]['rss_before_generation_mib']:.0f} MiB before", file=sys.stderr)
    return memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2000, 4000, 8000])
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=PREFILL_CHUNK, help="our prefill chunk")
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--rss-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rss-only", action="store_true", help="re-measure peak RSS into --out's results")
    parser.add_argument("--recompute-ratios", action="store_true", help="recompute the ratios of --out's results")
    parser.add_argument("--int8-kv", action="store_true", help="also measure peak RSS with int8 KV")
    parser.add_argument("--rss", action=argparse.BooleanOptionalAction, default=True, help="measure peak RSS")
    args = parser.parse_args()
    if args.rss_worker:
        return rss_worker(args)
    if args.rss_only:  # re-measure the memory of an existing result
        data = json.loads(args.out.read_text())
        data["peak_memory"] = measure_memory(args)
        return write_json(args.out, data)
    if args.recompute_ratios:  # same measurements, ratios recomputed (e.g. after adding a ratio)
        data = json.loads(args.out.read_text())
        data["ratios"] = compute_ratios(data["results"], list(data["results"]))
        return write_json(args.out, data)

    local_global = random_model(bench_config(args.layers))
    weights = local_global.state_dict()
    models = {"ours-local-global": local_global,
              "ours-all-global": sharing_weights(bench_config(args.layers, global_only=True), weights),
              "hf-llama": hf_sharing_weights(bench_config(args.layers), weights)}
    warm = torch.randint(0, 1000, (1, 64))
    for peer in args.peers:  # first-call overheads out of the way
        run_hf(models[peer], warm, 1) if peer == "hf-llama" else run_ours(models[peer], warm, 1, args.chunk)

    results: dict = {peer: {} for peer in args.peers}
    for n in args.lengths:
        tokens = torch.randint(0, local_global.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
        for peer in args.peers:
            model = models[peer]
            r = run_hf(model, tokens, args.decode_tokens) if peer == "hf-llama" else \
                run_ours(model, tokens, args.decode_tokens, args.chunk)
            results[peer][n] = r
            print(f"{peer:>18} {n:>6} tokens: prefill {r['prefill_s']:6.1f} s (cpu {r['prefill_cpu_s']:6.1f} s), "
                  f"decode {r['decode_tok_s']:.2f} tok/s", file=sys.stderr, flush=True)
    del models, local_global, weights

    ratios = compute_ratios(results, args.peers)

    memory = measure_memory(args) if args.rss else []

    write_json(args.out, {
        "benchmark": "prefill_decode",
        "model": f"pro-1b shapes, first {args.layers} layers of its pattern "
                 f"({bench_config(args.layers).layer_types.count('full_attention')} global), fp32, random weights",
        "prefill_chunk": args.chunk, "decode_tokens": args.decode_tokens,
        "machine": machine_info(), "results": results, "ratios": ratios, "peak_memory": memory,
        "flop_bound_prefill_speedup_vs_all_global": flop_bounds(args.layers, args.lengths),
    })
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
