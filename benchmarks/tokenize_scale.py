"""Tokenizing at corpus scale: tokens/s on 1 and 2 workers against `datasets.map(num_proc=2)`, and memory.

Every measured run is a subprocess (its process tree's memory, the sum of PSS, sampled every 0.1 s), with the same
tokenizer (SmolLM2's 49,152-token BPE), one thread per process (TOKENIZERS_PARALLELISM=false: the workers
are the parallelism), on the same generated .jsonl.gz input: documents of about 3,000 characters cut from
the starter corpus (prose, code, math), each with a distinct prefix.

1. Throughput, on an input of --input-mb MB of text:
   - `tokenize_to_shards` (read + decompress + split + encode + write) with 1 and 2 workers;
   - `datasets.load_dataset("json")` then `.map(encode, batched, num_proc=2)` with the same encode (+ EOS).
   Timed inside each process (imports left out); the ratio 2 vs 1 worker is the scaling.
2. Memory, on a generated input of --big-gb GB of text (a few hundred MB of .jsonl.gz): 2 workers stream it
   for --memory-seconds (then the run is killed: it would take hours on 2 cores); the process tree's RSS is
   sampled against the input bytes done (from the progress files), and compared with the throughput runs on
   an input 100x smaller. A naive reader (every document of the small input in one list, as a whole-corpus
   `read_documents` would) is measured for scale: its memory grows with the input.

    python benchmarks/tokenize_scale.py [--smoke] [--out benchmarks/results/tokenize_scale.json]

About 8-9 minutes on 2 quiet cores with the defaults (24 MB throughput input, 2 GB memory input written as
~0.7 GB of .jsonl.gz under --tmp, streamed for 150 s). --big-gb beyond the machine's RAM needs that much
disk at about a third of it. --smoke: tiny sizes, a check that the script runs end to end (ratios mean nothing).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import machine_info, write_json  # noqa: E402

DOC_CHARS = 3000


# ---- the process tree's memory ---------------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def _pss_bytes(pid: int) -> int:
    """Proportional set size: resident memory with each page shared by n processes counted 1/n in each (forked
    workers share the parent's pages; summing their RSS would count those pages once per worker)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # exited meanwhile
        return 0


def tree_rss_mib(pid: int) -> float:
    """Memory of `pid` and all its descendants (the sum of their proportional set sizes)."""
    tree, todo, total = _children(), [pid], 0
    while todo:
        p = todo.pop()
        total += _pss_bytes(p)
        todo += tree.get(p, [])
    return total / 2**20


def measured(args: list[str], *, limit_s: float | None = None, progress_dir: Path | None = None) -> dict:
    """Run `python args` with one tokenizer thread per process; its JSON line, peak tree RSS and samples."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, *args], env=env, stdout=out, stderr=err)
        peak, samples, killed = 0.0, [], False
        while proc.poll() is None:
            rss = tree_rss_mib(proc.pid)
            peak = max(peak, rss)
            elapsed = time.perf_counter() - start
            if progress_dir is not None and progress_dir.exists():
                from mobilellm.data.progress import read_counts
                samples.append({"s": round(elapsed, 1), "input_bytes_done": read_counts(progress_dir)["bytes"],
                                "rss_mib": round(rss, 1)})
            if limit_s is not None and elapsed > limit_s:
                proc.send_signal(signal.SIGKILL)  # the workers die with it (PR_SET_PDEATHSIG)
                killed = True
                break
            time.sleep(0.1)
        proc.wait()
        wall = time.perf_counter() - start
        out.seek(0), err.seek(0)
        text = out.read()
        if proc.returncode != 0 and not killed:
            raise RuntimeError(f"{args[:2]} failed:\n{err.read()[-3000:]}")
    result = json.loads(text.strip().splitlines()[-1]) if text.strip() else {}
    return {**result, "wall_s": wall, "peak_tree_rss_mib": peak, "killed_after_s": limit_s if killed else None,
            **({"samples": samples[::max(1, len(samples) // 60)]} if samples else {})}


# ---- the measured processes (run as `python tokenize_scale.py _ours ...`) --------------------------------
def ours(input_path: str, tokenizer_dir: str, out: str, workers: str, shard_chars: str) -> None:
    from mobilellm.data import Source, tokenize_to_shards
    from mobilellm.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    start = time.perf_counter()
    manifest = tokenize_to_shards({"web": [Source(Path(input_path))]}, tokenizer, out, workers=int(workers),
                                  shard_chars=int(shard_chars), progress=False)
    seconds = time.perf_counter() - start
    record = manifest["domains"]["web"]
    print(json.dumps({"seconds": seconds, "tokens": record["tokens"], "documents": record["documents"],
                      "characters": record["characters"]}))


def with_datasets(input_path: str, tokenizer_dir: str, cache: str, num_proc: str) -> None:
    import datasets
    import pyarrow.compute as pc

    from mobilellm.tokenizer import Tokenizer

    datasets.disable_progress_bars()
    tokenizer = Tokenizer.load(tokenizer_dir)
    eos = tokenizer.eos_ids[0]

    def encode(batch):
        return {"input_ids": [ids + [eos] for ids in tokenizer.encode_batch(batch["text"])]}

    start = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=input_path, split="train", cache_dir=cache)
    loaded = time.perf_counter()
    mapped = dataset.map(encode, batched=True, batch_size=64, num_proc=int(num_proc),
                         remove_columns=dataset.column_names)
    done = time.perf_counter()
    tokens = int(pc.sum(pc.list_value_length(mapped.data.column("input_ids"))).as_py())
    print(json.dumps({"seconds": done - start, "load_s": loaded - start, "map_s": done - loaded, "tokens": tokens,
                      "documents": len(mapped)}))


def naive(input_path: str) -> None:
    from mobilellm.data import Source, read_documents

    start = time.perf_counter()
    texts = list(read_documents(Source(Path(input_path))))
    print(json.dumps({"seconds": time.perf_counter() - start, "documents": len(texts),
                      "characters": sum(map(len, texts))}))


# ---- the inputs --------------------------------------------------------------------------------------
def document_pool(limit_chars: int) -> list[str]:
    """JSON-escaped documents of about DOC_CHARS characters from the starter corpus."""
    from mobilellm.data import read_documents
    from mobilellm.data.starter import DOMAINS, build_starter_corpus, corpus_sources, default_corpus_dir

    corpus = default_corpus_dir()
    build_starter_corpus(corpus, log=lambda line: None)
    pool, size = [], 0
    for sources in corpus_sources(corpus, DOMAINS).values():
        for text in read_documents(sources[0]):
            for start in range(0, len(text), DOC_CHARS):
                piece = text[start:start + DOC_CHARS]
                if piece.strip():
                    pool.append(json.dumps(piece)[1:-1])
                    size += len(piece)
            if size >= limit_chars:
                return pool
    return pool


def write_input(path: Path, pool: list[str], total_chars: int) -> dict:
    """A .jsonl.gz of distinct documents (the pool repeated, each with its number) of about `total_chars`."""
    start, chars, n = time.perf_counter(), 0, 0
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as fh:
        lines = []
        while chars < total_chars:
            doc = pool[n % len(pool)]
            lines.append(f'{{"text": "document {n}: {doc}"}}\n')
            chars += len(doc) + 14
            n += 1
            if len(lines) == 4096:
                fh.write("".join(lines).encode())
                lines = []
        fh.write("".join(lines).encode())
    return {"documents": n, "approx_characters": chars, "compressed_bytes": path.stat().st_size,
            "write_s": time.perf_counter() - start}


# ---- the benchmark -----------------------------------------------------------------------------------
def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("_ours", "_datasets", "_naive"):
        {"_ours": ours, "_datasets": with_datasets, "_naive": naive}[sys.argv[1]](*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input-mb", type=float, default=24.0, help="text of the throughput input")
    parser.add_argument("--big-gb", type=float, default=2.0, help="text of the memory input")
    parser.add_argument("--memory-seconds", type=float, default=150.0, help="how long the big input is streamed")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: SmolLM2-135M's)")
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()), help="where the inputs go")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that it runs")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--memory-shard-chars", type=int, default=16_000_000,
                        help="shard size of the memory run (the default of `mobilellm tokenize`)")
    args = parser.parse_args()
    if args.smoke:
        args.input_mb, args.big_gb, args.memory_seconds, args.memory_shard_chars = 1.0, 0.05, 20.0, 1_000_000
    # Throughput: 32 shards, so that both workers stay busy to the end (a real corpus has thousands).
    shard_chars = max(int(args.input_mb * 1e6 / 32), 10_000)
    out_path = args.out or (Path(tempfile.gettempdir()) / "tokenize_scale_smoke.json" if args.smoke
                            else Path(__file__).parent / "results" / "tokenize_scale.json")
    if args.tokenizer is None:
        from mobilellm.artifacts import fetch_smollm2
        args.tokenizer = fetch_smollm2()
    script = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        pool = document_pool(20_000_000)
        small, big = tmp / "small.jsonl.gz", tmp / "big.jsonl.gz"
        inputs = {"throughput": write_input(small, pool, int(args.input_mb * 1e6))}
        runs = {}
        for workers in (1, 2):
            runs[f"ours_{workers}_workers"] = measured([script, "_ours", str(small), str(args.tokenizer),
                                                        str(tmp / f"shards{workers}"), str(workers), str(shard_chars)])
            print(f"ours, {workers} worker(s):", {k: v for k, v in runs[f"ours_{workers}_workers"].items()})
        runs["datasets_map_num_proc_2"] = measured([script, "_datasets", str(small), str(args.tokenizer),
                                                    str(tmp / "hf-cache"), "2"])
        print("datasets.map(num_proc=2):", runs["datasets_map_num_proc_2"])
        runs["naive_whole_load"] = measured([script, "_naive", str(small)])
        for run in runs.values():
            if "tokens" in run:
                run["tokens_per_s"] = run["tokens"] / run["seconds"]
        assert runs["ours_1_workers"]["tokens"] == runs["ours_2_workers"]["tokens"] == \
            runs["datasets_map_num_proc_2"]["tokens"], "the same tokenizer must give the same tokens"
        inputs["memory"] = write_input(big, pool, int(args.big_gb * 1e9))
        streamed = measured([script, "_ours", str(big), str(args.tokenizer), str(tmp / "big-shards"), "2",
                             str(args.memory_shard_chars)],
                            limit_s=args.memory_seconds, progress_dir=tmp / "big-shards" / "tasks" / "progress")
    one, two, hf = runs["ours_1_workers"], runs["ours_2_workers"], runs["datasets_map_num_proc_2"]
    rss_late = [s["rss_mib"] for s in streamed.get("samples", []) if s["input_bytes_done"] > 0]
    results = {
        "machine": machine_info(), "smoke": args.smoke, "tokenizer": str(args.tokenizer), "inputs": inputs,
        "shard_chars": {"throughput": shard_chars, "memory": args.memory_shard_chars}, "throughput": runs,
        "ratios": {"ours_2_vs_1_workers": two["tokens_per_s"] / one["tokens_per_s"],
                   "ours_2_workers_vs_datasets_map": two["tokens_per_s"] / hf["tokens_per_s"],
                   "ours_2_workers_vs_datasets_map_only": two["tokens_per_s"] / (hf["tokens"] / hf["map_s"])},
        "memory": {"streamed_big_input": streamed,
                   "big_input_text_gb": inputs["memory"]["approx_characters"] / 1e9,
                   "peak_rss_mib_streamed_big": streamed["peak_tree_rss_mib"],
                   "peak_rss_mib_small_2_workers": two["peak_tree_rss_mib"],
                   "rss_mib_range_while_streaming": [min(rss_late), max(rss_late)] if rss_late else None,
                   "naive_whole_load_small_peak_rss_mib": runs["naive_whole_load"]["peak_tree_rss_mib"]},
        "goals": {"scaling_1_to_2_workers": ">= 1.8x", "vs_datasets": ">= 1x", "memory": "flat in the input size"},
    }
    write_json(out_path, results)
    print(json.dumps({k: results[k] for k in ("ratios",)}, indent=1))
    print({k: v for k, v in results["memory"].items() if k != "streamed_big_input"})
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
