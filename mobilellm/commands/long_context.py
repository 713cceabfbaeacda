"""`mobilellm extend-context` (phase 2), `mobilellm position-loss` and `mobilellm retrieval` (long-context eval)."""

from __future__ import annotations

from pathlib import Path

from ..data.shards import TokenDataset
from ..dtypes import parse_dtype
from ..eval.long_context import loss_by_position, long_documents, retrieval_grid, save_curves
from ..eval.report import save_results
from ..loading import load
from ..train.recipe import run_recipe
from .needle import parse_numbers, report_grid


def extend_context(checkpoint: str, *, data: Path | None = None, teacher: Path | None = None, seq_len: int = 1024,
                   max_seq_len: int | None = None, rope_theta: float | None = None, loss: str = "kd",
                   short_docs: int | None = None, long_docs: int | None = None, domains: list[str] | None = None,
                   steps: int | None = None, batch_rows: int = 4, lr: float = 4e-5, top_k: int | None = None,
                   teacher_cache: Path | None = None, tokenizer: Path | None = None, seed: int = 0,
                   recipe: str | None = None, out: Path | None = None, resume: bool = False,
                   parallel: str | None = None, micro_batch: int | None = None) -> None:
    """Phase 2: extend a checkpoint's context, by positional distillation (kd) or CE on long documents (ce).

    RoPE theta and the context are raised in the checkpoint's config (every saved checkpoint records them).
    kd (implicit positional distillation): short documents packed into windows of --seq-len tokens, positions
    continuous and attention across documents, KD from a long-context --teacher on the same window. ce: the
    long-data baseline, documents of at least --long-docs tokens only. `--recipe pro-1b` takes MobileLLM-Pro's
    phase 2 (100k steps, 20B tokens, LR 4e-5) with --teacher, --data and --tokenizer.

    Args:
        checkpoint: the phase-1 checkpoint folder
        data: token-shard folder made by `mobilellm tokenize`
        teacher: long-context teacher checkpoint folder sharing the student's tokenizer (kd)
        seq_len: training window in tokens
        max_seq_len: the new context (default: --seq-len)
        rope_theta: the new RoPE theta (default: unchanged)
        loss: kd (positional distillation) or ce (long-document baseline)
        short_docs: kd: cut documents into pieces of at most this many tokens (the phase-1 length)
        long_docs: ce: keep documents of at least this many tokens (default: --seq-len + 1)
        domains: train on these domains of the shards, equally weighted (default: all)
        steps: optimizer steps (default 100; pro-1b: the recipe's)
        batch_rows: windows per optimizer step
        lr: peak learning rate (cosine to 0 after 5% warmup)
        top_k: distill the teacher's top-k only (default: its full distribution)
        teacher_cache: folder caching the teacher's top-k per window (needs --top-k), shared across runs
        tokenizer: tokenizer folder (default: the checkpoint's)
        seed: data order seed
        recipe: pro-1b for MobileLLM-Pro's full-scale phase 2
        out: run folder (default: runs/extend-context-LOSS)
        resume: continue from the latest checkpoint in OUT
        parallel: ddp or fsdp, when launched with torchrun
        micro_batch: rows per forward pass on one process
    """
    from recipes.phase2 import phase2  # the recipes package sits beside mobilellm
    from recipes.pro_1b import pro_1b_phase2

    if recipe not in (None, "pro-1b"):
        raise ValueError(f"unknown phase-2 recipe {recipe!r}; expected pro-1b (or none: the flags)")
    if recipe == "pro-1b":
        chosen = pro_1b_phase2(checkpoint, str(teacher) if teacher else None, str(data) if data else None,
                               str(tokenizer) if tokenizer else None)
        if steps is not None:
            chosen = chosen.with_steps(steps)
    else:
        weights = {name: 1.0 for name in domains} if domains else None
        chosen = phase2(checkpoint, str(data) if data else None, seq_len=seq_len, loss=loss,
                        teacher=str(teacher) if teacher else None, max_seq_len=max_seq_len, rope_theta=rope_theta,
                        short_doc_tokens=short_docs, long_doc_tokens=long_docs, domain_weights=weights,
                        steps=steps or 100, batch_rows=batch_rows, lr=lr, top_k=top_k,
                        teacher_cache=str(teacher_cache) if teacher_cache else None,
                        tokenizer=str(tokenizer) if tokenizer else None, seed=seed, print_every=1)
    result = run_recipe(chosen, out or Path("runs") / f"extend-context-{loss}", resume=resume, strategy=parallel,
                        micro_batch=micro_batch)
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint}")


def position_loss(checkpoint: str, *, data: Path, length: int = 1024, buckets: int = 8, scale: str = "linear",
                  domains: list[str] | None = None, split: str = "val", limit: int | None = None,
                  out: Path | None = None, png: Path | None = None, dtype: str = "float32") -> None:
    """Loss by position: mean next-token loss per bucket of positions on long held-out documents.

    Each document of at least --length + 1 tokens runs as one sequence from its start; a model that uses its
    context keeps the curve falling to the end, one past the length it learned bends up. Lengths past the
    checkpoint's context are allowed (that is the point of the measurement).

    Args:
        checkpoint: checkpoint folder or fetchable name
        data: token-shard folder made by `mobilellm tokenize` (with the checkpoint's tokenizer)
        length: positions measured per document
        buckets: position buckets
        scale: linear (equal widths) or log (doubling widths)
        domains: domains of the shards to read (default: all)
        split: val (held out) or train
        limit: at most this many documents
        out: results JSON to write
        png: curve PNG to write
        dtype: float32 or bfloat16
    """
    loaded = load(checkpoint, parse_dtype(dtype))
    dataset = TokenDataset(data)
    dataset.check_model_vocab(loaded.model.config.vocab_size)
    if loaded.tokenizer is not None:
        dataset.check_tokenizer(loaded.tokenizer)
    docs = long_documents(dataset, length, split, domains, limit)
    curve = loss_by_position(loaded.model, docs, length, buckets, scale)
    print(f"{len(docs)} documents of at least {length + 1:,} tokens; context {loaded.model.config.max_seq_len:,}")
    for a, b, value in zip(curve.edges[:-1], curve.edges[1:], curve.loss):
        print(f"positions {a:>7,}-{b - 1:<7,} loss {value:.4f}")
    if out is not None:
        save_results({"model": str(checkpoint), "position_loss": curve.to_dict()}, out)
        print(f"results written to {out}")
    if png is not None:
        save_curves({Path(str(checkpoint)).name: curve}, png,
                    marks={"context": loaded.model.config.max_seq_len} if loaded.model.config.max_seq_len < length else None)
        print(f"curve written to {png}")


def retrieval(checkpoint: str, *, lengths: str = "256,512,1024,2048", depths: str = "0,0.25,0.5,0.75,1",
              trials: int = 3, seed: int = 0, out: Path | None = None, png: Path | None = None,
              dtype: str = "float32") -> None:
    """Key-value retrieval in RULER's single-needle format (lm-eval's niah_single_1) over depths x lengths.

    A 7-digit value is hidden under a word key in a repeated haystack; a cell counts the keys whose value the
    model would decode greedily. Lengths may pass the checkpoint's context.

    Args:
        checkpoint: checkpoint folder or fetchable name (with its tokenizer)
        lengths: comma-separated prompt lengths in tokens
        depths: comma-separated needle depths as fractions of the haystack (0 = start, 1 = end)
        trials: keys per cell
        seed: seed of the keys and values
        out: results JSON to write
        png: heatmap PNG to write
        dtype: float32 or bfloat16
    """
    loaded = load(checkpoint, parse_dtype(dtype), require_tokenizer=True)
    grid = retrieval_grid(loaded.model, loaded.tokenizer, parse_numbers(lengths, int, "--lengths"),
                          parse_numbers(depths, float, "--depths"), trials, seed)
    report_grid(grid, checkpoint, "retrieval", out, png, title=f"RULER single needle: {Path(str(checkpoint)).name}",
                note=f" (context {loaded.model.config.max_seq_len:,})")
