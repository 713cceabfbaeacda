"""Our GGUF export, run by llama.cpp: its greedy continuation of SmolLM2-135M against our engine's.

Two files are exported from the fetched SmolLM2-135M-Instruct: Q8_0 from the fp32 weights (compared with our
fp32 model) and Q4_0 from its int4 cpu-scheme model (`quantize_`; compared with that int4 model, whose exact
weights the Q4_0 file holds). For each prompt both peers continue greedily for `--new-tokens` tokens without
stopping at EOS; llama.cpp's text (llama-simple, greedy by construction) is compared with our decoded tokens:
the report gives the characters and words both share from the start, and whether the whole text is equal.
Equal is expected for Q8_0; for Q4_0 llama.cpp quantizes activations per 32-block (we: per token), so a late
divergence is possible and reported, not hidden.

llama.cpp is not built here: benchmarks/llama_cpp.py (python benchmarks/llama_cpp.py) builds it once into
~/.cache/mobilellm/llama.cpp/build/bin (15-40 min on 2 cores). This script looks there, then on PATH.

    python benchmarks/gguf_llama_cpp.py [--new-tokens 32] [--out-dir ~/.cache/mobilellm/gguf]
    python benchmarks/gguf_llama_cpp.py --smoke    # tiny prompt set, 8 tokens: checks the plumbing
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import machine_info, write_json  # noqa: E402
from mobilellm.artifacts import cache_root  # noqa: E402
from mobilellm.gguf_export import write_gguf  # noqa: E402
from mobilellm.infer.engine import generate, new_cache  # noqa: E402
from mobilellm.loading import load  # noqa: E402
from mobilellm.quant import QuantConfig, quantize_  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "gguf_llama_cpp.json"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are"]
TOOLS = ("llama-simple", "llama-completion")


def find_tool() -> Path | None:
    for name in TOOLS:
        for candidate in (cache_root() / "llama.cpp" / "build" / "bin" / name, shutil.which(name)):
            if candidate and Path(candidate).is_file():
                return Path(candidate)
    return None


def ours(model, tokenizer, prompt: str, new_tokens: int) -> str:
    ids = tokenizer.encode(prompt, bos=True)
    with torch.no_grad():
        out = list(generate(model, ids, new_cache(model, len(ids) + new_tokens), max_new_tokens=new_tokens))
    return tokenizer.decode(out)


def llama_cpp(tool: Path, gguf: Path, prompt: str, new_tokens: int) -> str:
    """llama.cpp's greedy continuation (the printed prompt stripped)."""
    if tool.name == "llama-simple":
        cmd = [str(tool), "-m", str(gguf), "-n", str(new_tokens), prompt]
    else:
        cmd = [str(tool), "-m", str(gguf), "-n", str(new_tokens), "-p", prompt, "--temp", "0", "--top-k", "1",
               "-no-cnv", "--no-display-prompt", "--ignore-eos", "-t", "1", "--no-warmup"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    text = result.stdout  # llama-simple echoes the prompt (after a printed BOS) before the continuation
    at = text.find(prompt)
    text = text[at + len(prompt):] if at >= 0 else text
    return text.removesuffix("\n")  # the newline llama-simple prints after the last token


def shared_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out-dir", type=Path, default=cache_root() / "gguf")
    parser.add_argument("--smoke", action="store_true", help="one prompt, 8 tokens; results not written")
    args = parser.parse_args()
    prompts, new_tokens = (PROMPTS[:1], 8) if args.smoke else (PROMPTS, args.new_tokens)
    tool = find_tool()
    if tool is None:
        sys.exit("no llama.cpp binary (llama-simple / llama-completion) in ~/.cache/mobilellm/llama.cpp/build/bin or "
                 "on PATH: build it with python benchmarks/llama_cpp.py")
    torch.set_num_threads(1)
    loaded = load("smollm2-135m")
    fp32 = loaded.model.eval()
    peers = {"q8_0": fp32}
    start = time.perf_counter()
    files = {"q8_0": write_gguf(fp32, loaded.tokenizer, args.out_dir / "smollm2-135m.Q8_0.gguf", "q8_0")}
    expected = {"q8_0": [ours(fp32, loaded.tokenizer, p, new_tokens) for p in prompts]}  # before quantize_ swaps
    int4 = quantize_(fp32, QuantConfig.from_scheme("cpu")).eval()  # in place: the fp32 model is gone after this
    peers["q4_0"] = int4
    files["q4_0"] = write_gguf(int4, loaded.tokenizer, args.out_dir / "smollm2-135m-int4.Q4_0.gguf", "q4_0")
    expected["q4_0"] = [ours(int4, loaded.tokenizer, p, new_tokens) for p in prompts]
    export_s = time.perf_counter() - start
    rows = []
    for type, path in files.items():
        for prompt, want in zip(prompts, expected[type]):
            got = llama_cpp(tool, path, prompt, new_tokens)
            n = shared_prefix(want, got)
            rows.append({"type": type, "prompt": prompt, "ours": want, "llama_cpp": got, "equal": want == got,
                         "shared_chars": n, "shared_words": len(want[:n].split())})
            print(f"{type} {'EQUAL' if want == got else f'shared {n}/{len(want)} chars'} | {prompt!r}\n"
                  f"  ours:      {want!r}\n  llama.cpp: {got!r}", flush=True)
    result = {"benchmark": "gguf_llama_cpp", "tool": str(tool), "new_tokens": new_tokens,
              "files": {t: {"path": str(p), "mb": round(p.stat().st_size / 1e6, 1)} for t, p in files.items()},
              "export_and_ours_s": round(export_s, 1), "rows": rows,
              "equal": {t: sum(r["equal"] for r in rows if r["type"] == t) for t in files},
              "prompts": len(prompts), "machine": machine_info()}
    if not args.smoke:
        write_json(RESULTS, result)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
