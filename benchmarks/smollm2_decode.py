"""The real SmolLM2-135M-Instruct: our engine's decode speed vs transformers', with identical greedy output.

Both load the same fetched HF folder (fp32). The same chat prompt is prefilled, then `--new-tokens` tokens are
decoded greedily without stopping at EOS; the two token sequences must be identical (asserted). Peers run
interleaved for `--rounds` rounds (the machine is shared); the best round of each is reported. With
`--compile`, our `decode_one_token` under torch.compile is a third peer (its compile time reported apart).

    python benchmarks/smollm2_decode.py [--new-tokens 64] [--rounds 3] [--compile]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import machine_info, write_json  # noqa: E402
from mobilellm.artifacts import fetch_smollm2  # noqa: E402
from mobilellm.hf import load_pretrained  # noqa: E402
from mobilellm.infer.chat import encode_prompt  # noqa: E402
from mobilellm.infer.engine import compiled_decode_step, decode_one_token, generate, new_cache  # noqa: E402
from mobilellm.tokenizer import Tokenizer  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "smollm2_decode.json"
PROMPT = "What is the capital of France? Answer, then describe the city in a few sentences."


def run_ours(model, ids, new_tokens: int, step=decode_one_token) -> tuple[list[int], float, float]:
    """(tokens, prefill seconds, decode tokens/s)."""
    cache = new_cache(model, max_len=len(ids) + new_tokens)
    stream = generate(model, ids, cache, max_new_tokens=new_tokens, decode_step=step)
    start = time.perf_counter()
    out = [next(stream)]
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    out += list(stream)
    return out, prefill_s, (len(out) - 1) / (time.perf_counter() - start)


@torch.no_grad()
def run_hf(model, ids, new_tokens: int) -> tuple[list[int], float, float]:
    from transformers import DynamicCache

    start = time.perf_counter()
    result = model(input_ids=torch.tensor([ids]), past_key_values=DynamicCache(config=model.config), use_cache=True,
                   logits_to_keep=1)
    out = [int(result.logits[0, -1].argmax())]
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        result = model(input_ids=torch.tensor([[out[-1]]]), past_key_values=result.past_key_values, use_cache=True,
                       logits_to_keep=1)
        out.append(int(result.logits[0, -1].argmax()))
    return out, prefill_s, (len(out) - 1) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import LlamaForCausalLM

    folder = fetch_smollm2()
    tokenizer = Tokenizer.load(folder)
    ids = encode_prompt(tokenizer, PROMPT, chat=True)
    peers = {"ours": lambda: run_ours(ours, ids, args.new_tokens),
             "hf-llama": lambda: run_hf(hf, ids, args.new_tokens)}
    ours = load_pretrained(folder).eval().fuse_projections()  # as generate runs it
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    compile_s = None
    if args.compile:
        step = compiled_decode_step(ours)
        start = time.perf_counter()
        run_ours(ours, ids, 4, step)  # compiles (dynamic shapes: the key count grows every step)
        compile_s = time.perf_counter() - start
        peers["ours-compiled"] = lambda: run_ours(ours, ids, args.new_tokens, step)

    best: dict = {}
    outputs = {}
    for round_ in range(args.rounds):
        for name, run in peers.items():
            tokens, prefill_s, tok_s = run()
            outputs[name] = tokens
            print(f"round {round_} {name:>14}: prefill {prefill_s * 1000:.0f} ms, decode {tok_s:.1f} tok/s",
                  file=sys.stderr, flush=True)
            if name not in best or tok_s > best[name]["decode_tok_s"]:
                best[name] = {"prefill_s": prefill_s, "decode_tok_s": tok_s}
    for name, tokens in outputs.items():
        assert tokens == outputs["hf-llama"], f"{name} greedy output differs from transformers'"

    result = {
        "benchmark": "smollm2_decode", "model": "SmolLM2-135M-Instruct (real weights, fp32)",
        "prompt_tokens": len(ids), "new_tokens": args.new_tokens, "rounds": args.rounds,
        "identical_greedy_output": True, "text": tokenizer.decode(outputs["ours"]),
        "best_of_rounds": best, "compile_s": compile_s,
        "decode_speedup_vs_hf": best["ours"]["decode_tok_s"] / best["hf-llama"]["decode_tok_s"],
        "machine": machine_info(),
    }
    if "ours-compiled" in best:
        result["compiled_decode_speedup_vs_eager"] = best["ours-compiled"]["decode_tok_s"] / best["ours"]["decode_tok_s"]
    write_json(args.out, result)
    print({k: v for k, v in result.items() if k not in ("machine", "text")})
    print(result["text"])


if __name__ == "__main__":
    main()
