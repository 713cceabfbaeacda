"""Speed of the data pipeline on the starter corpus, each part against a peer measured in the same run.

1. Batch encoding: `Tokenizer.encode_batch` (tokenizers' encode_batch_fast, no character offsets)
   against tokenizers' plain encode_batch, the path it replaced. Same texts, interleaved repeats.
2. Sharding: `tokenize_to_shards` on the whole starter corpus (read, split, encode, write), as
   characters/s, against the bare batch encoding of the same texts (the pipeline's overhead).
3. Loading: `MixtureLoader` batches (seq_len 512, batch 4, three domains) against one training step
   (forward + backward) of the starter-20m model on the same batches: the share of a step spent on data.

    python benchmarks/data_pipeline.py [--corpus DIR] [--out benchmarks/results/data_pipeline.json]

Builds the starter corpus (and an 8192-token BPE) under the cache when missing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import machine_info, peak_rss_mib, write_json  # noqa: E402
from mobilellm.config import ModelConfig  # noqa: E402
from mobilellm.data import MixtureLoader, TokenDataset, read_documents, tokenize_to_shards  # noqa: E402
from mobilellm.data.starter import DOMAINS, build_starter_corpus, corpus_sources, default_corpus_dir, train_tokenizer  # noqa: E402
from mobilellm.model import build_model  # noqa: E402
from mobilellm.tokenizer import Tokenizer  # noqa: E402

VOCAB = 8192


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench_encoding(tokenizer: Tokenizer, texts: list[str], repeats: int) -> dict:
    chars = sum(map(len, texts))
    fast, offsets = [], []
    for _ in range(repeats):  # interleaved, so both see the same machine load
        fast += timed(lambda: tokenizer.encode_batch(texts), 1)
        offsets += timed(lambda: [e.ids for e in tokenizer.backend.encode_batch(texts, add_special_tokens=False)], 1)
    f, o = statistics.median(fast), statistics.median(offsets)
    return {"characters": chars, "encode_batch_fast_s": f, "encode_batch_with_offsets_s": o,
            "chars_per_s_fast": chars / f, "speedup_vs_offsets": o / f}


def bench_sharding(tokenizer: Tokenizer, corpus: Path, texts_by_domain: dict[str, list[str]]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        manifest = tokenize_to_shards(corpus_sources(corpus, DOMAINS), tokenizer, tmp, val_fraction=0.01, progress=False)
        shard_s = time.perf_counter() - start
    everything = [t for texts in texts_by_domain.values() for t in texts]
    start = time.perf_counter()
    for i in range(0, len(everything), 64):
        tokenizer.encode_batch(everything[i:i + 64])
    encode_s = time.perf_counter() - start
    chars = sum(map(len, everything))
    tokens = sum(d["train_tokens"] + d["val_tokens"] for d in manifest["domains"].values())
    return {"characters": chars, "tokens": tokens, "tokenize_to_shards_s": shard_s, "bare_encode_s": encode_s,
            "chars_per_s": chars / shard_s, "overhead_vs_bare_encode": shard_s / encode_s}


def bench_loading(dataset: TokenDataset, steps: int) -> dict:
    seq_len, batch_size = 512, 4
    weights = {"prose": 0.4, "code": 0.4, "math": 0.2}
    loader = MixtureLoader(dataset, weights, seq_len=seq_len, global_batch_size=batch_size, seed=0)
    next(loader)  # first touch of the memory maps
    load_s = timed(lambda: next(loader), steps * 5)
    config = ModelConfig.from_name("starter-20m")
    dataset.check_model_vocab(config.vocab_size)
    model = build_model(config, seed=0)
    batch = next(loader)

    def step():
        logits = model(batch["tokens"], batch["positions"], batch["doc_ids"])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    step_s = timed(step, steps)
    load, train = statistics.median(load_s), statistics.median(step_s)
    return {"seq_len": seq_len, "batch_size": batch_size, "weights": weights, "model": config.name,
            "loader_ms_per_batch": load * 1e3, "train_step_ms": train * 1e3,
            "loader_tokens_per_s": seq_len * batch_size / load, "loader_share_of_step": load / (load + train)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=default_corpus_dir())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "data_pipeline.json")
    args = parser.parse_args()

    corpus_summary = build_starter_corpus(args.corpus, log=lambda line: None)
    if not (args.corpus / "tokenizer" / "tokenizer.json").exists():
        train_tokenizer(corpus_sources(args.corpus), VOCAB, args.corpus / "tokenizer", show_progress=False)
    tokenizer = Tokenizer.load(args.corpus / "tokenizer")
    texts = {name: [t for s in sources for t in read_documents(s)] for name, sources in corpus_sources(args.corpus).items()}
    sample = []
    for docs in texts.values():  # up to ~1M characters per domain for the encoding comparison
        size = 0
        for t in docs:
            if size >= 1_000_000:
                break
            sample.append(t)
            size += len(t)
    results = {"machine": machine_info(), "corpus": corpus_summary, "tokenizer_vocab": tokenizer.vocab_size,
               "encoding": bench_encoding(tokenizer, sample, args.repeats),
               "sharding": bench_sharding(tokenizer, args.corpus, texts)}
    with tempfile.TemporaryDirectory() as tmp:
        tokenize_to_shards(corpus_sources(args.corpus), tokenizer, tmp, val_fraction=0.01, progress=False)
        results["loading"] = bench_loading(TokenDataset(tmp), args.steps)
    results["peak_rss_mib"] = peak_rss_mib()
    write_json(args.out, results)
    for part in ("encoding", "sharding", "loading"):
        print(part, {k: round(v, 3) if isinstance(v, float) else v for k, v in results[part].items()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
