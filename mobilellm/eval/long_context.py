"""Long-context evaluation: loss by position on long documents, and a key-value retrieval grid (RULER format).

- `loss_by_position`: the standard context-extension curve. Long held-out documents are cut to their first
  `length` + 1 tokens and run as one sequence each; every position's next-token loss goes into its bucket
  of positions. A model that extends its context keeps the curve falling (or flat) to the end; one that does
  not bends up past the length it learned.
- `retrieval_grid`: RULER's single-needle task as lm-eval ships it (`niah_single_1`: word key, 7-digit value,
  the "repeat" haystack, the same instruction, question and answer prefix), with the needle placed at a
  chosen depth. A cell is correct when greedy decoding would produce the value: every token of " VALUE" is
  the model's argmax after the prompt (scored in one forward pass, so lengths may pass the model's context,
  where generation with a KV cache would refuse). The grid (`NeedleGrid`) is drawn by needle.save_heatmap.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_file
from ..train.losses import token_logprobs
from .needle import NeedleGrid

# lm-eval's RULER niah_single_1 (tasks/ruler: prepare_niah.py, niah_utils.py), single needle and query.
RULER_HAYSTACK = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
RULER_NEEDLE = "One of the special magic numbers for {key} is: {value}."
RULER_INSTRUCTION = ("A special magic number is hidden within the following text. Make sure to memorize it. "
                     "I will quiz you about the number afterwards.\n")
RULER_QUESTION = ("\nWhat is the special magic number for {key} mentioned in the provided text? "
                  "The special magic number for {key} mentioned in the provided text is")
# RULER draws keys as adjective-noun pairs (wonderwords' lists); a fixed sample of common ones here.
_ADJECTIVES = ("quiet", "bright", "silent", "ancient", "curious", "golden", "hollow", "rapid", "gentle", "frozen",
               "hidden", "lucky", "narrow", "polite", "rustic", "tidy", "vivid", "wooden", "brave", "calm")
_NOUNS = ("river", "lantern", "garden", "falcon", "ladder", "meadow", "pepper", "harbor", "candle", "violin",
          "tunnel", "pillow", "orchard", "compass", "blanket", "kettle", "mirror", "saddle", "teapot", "window")


# ---- loss by position -----------------------------------------------------------------------------

@dataclass(frozen=True)
class PositionCurve:
    length: int  # positions measured: 0 .. length - 1
    edges: tuple[int, ...]  # bucket b holds positions edges[b] <= p < edges[b + 1]
    loss: tuple[float, ...]  # mean next-token loss (nats) per bucket
    documents: int

    def to_dict(self) -> dict:
        return {"length": self.length, "edges": list(self.edges), "loss": list(self.loss),
                "documents": self.documents}


def bucket_edges(length: int, buckets: int, scale: str = "linear") -> tuple[int, ...]:
    """`buckets` + 1 increasing edges from 0 to `length`: equal widths, or doubling widths ("log")."""
    if buckets < 1 or buckets > length:
        raise ValueError(f"buckets must be in [1, {length}], got {buckets}")
    if scale == "linear":
        edges = np.linspace(0, length, buckets + 1)
    elif scale == "log":
        edges = np.concatenate([[0], np.geomspace(length / 2 ** (buckets - 1), length, buckets)])
    else:
        raise ValueError(f"scale must be linear or log, got {scale!r}")
    edges = sorted({int(round(e)) for e in edges})
    if len(edges) != buckets + 1:
        raise ValueError(f"{buckets} {scale} buckets over {length} positions leave some empty")
    return tuple(edges)


@torch.no_grad()
def position_losses(model, documents: Sequence[np.ndarray], length: int) -> np.ndarray:
    """Next-token loss (documents, length) of each document's first `length` + 1 tokens, run as one sequence."""
    short = [i for i, d in enumerate(documents) if len(d) < length + 1]
    if short:
        raise ValueError(f"{len(short)} of {len(documents)} documents have fewer than {length + 1} tokens")
    model.eval()
    device = next(model.parameters()).device
    out = np.empty((len(documents), length), dtype=np.float64)
    for i, doc in enumerate(documents):
        ids = torch.as_tensor(np.asarray(doc[:length + 1], dtype=np.int64), device=device)
        hidden = model.hidden_states(ids[None, :-1])[0]  # (length, D); positions 0 .. length - 1
        out[i] = (-token_logprobs(model.lm_head, hidden, ids[1:])).double().cpu().numpy()
    return out


def loss_by_position(model, documents: Sequence[np.ndarray], length: int, buckets: int = 8,
                     scale: str = "linear") -> PositionCurve:
    """The mean loss per bucket of positions over `documents` (each at least `length` + 1 tokens long)."""
    if not documents:
        raise ValueError(f"no documents of at least {length + 1:,} tokens to measure")
    edges = bucket_edges(length, buckets, scale)
    losses = position_losses(model, documents, length)  # (docs, length)
    means = tuple(float(losses[:, a:b].mean()) for a, b in zip(edges[:-1], edges[1:]))
    return PositionCurve(length, edges, means, len(documents))


def long_documents(dataset, length: int, split: str = "val", domains: Sequence[str] | None = None,
                   limit: int | None = None) -> list[np.ndarray]:
    """The documents of a token-shard folder with at least `length` + 1 tokens, in stored order."""
    docs = []
    for name in domains or dataset.domains:
        store = dataset.documents(name, split)
        docs += [d for d in (store.document(i) for i in range(len(store))) if len(d) >= length + 1]
    return docs[:limit] if limit is not None else docs


def save_curves(curves: dict[str, PositionCurve], path: Path, title: str = "loss by position",
                marks: dict[str, int] | None = None) -> None:
    """One line per model: mean loss at each bucket's middle position; `marks` draws vertical lines (lengths)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        middles = [(a + b) / 2 for a, b in zip(curve.edges[:-1], curve.edges[1:])]
        ax.plot(middles, curve.loss, marker="o", label=name)
    for label, x in (marks or {}).items():
        ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        ax.text(x, ax.get_ylim()[1], f" {label}", va="top", fontsize=8, color="grey")
    ax.set_xlabel("position in the document (tokens)")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)


# ---- retrieval (RULER single needle) ----------------------------------------------------------------

def ruler_prompt(tokenizer, length: int, depth: float, key: str, value: str,
                 haystack: str = RULER_HAYSTACK) -> tuple[list[int], list[int]]:
    """(prompt tokens, answer tokens) of about `length` tokens in all, the needle after `depth` of the haystack."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    needle = RULER_NEEDLE.format(key=key, value=value)

    def build(n: int) -> list[int]:
        sentences = [haystack] * n
        sentences.insert(round(depth * n), needle)
        return tokenizer.encode(RULER_INSTRUCTION + "\n".join(sentences) + RULER_QUESTION.format(key=key))

    answer = tokenizer.encode(" " + value)
    fixed = len(build(0)) + len(answer)
    per_sentence = len(tokenizer.encode(haystack + "\n"))
    n = max(0, (length - fixed) // per_sentence)
    while n > 0 and len(build(n)) + len(answer) > length:  # joins may merge tokens: trim to fit
        n -= 1
    if n == 0 and fixed > length:
        raise ValueError(f"length {length} leaves no room for the haystack (the needle and question take {fixed})")
    return build(n), answer


def ruler_key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


@torch.no_grad()
def greedy_hit(model, prompt: list[int], answer: list[int]) -> bool:
    """Would greedy decoding after `prompt` produce `answer`? (each answer token the argmax given the ones before)"""
    device = next(model.parameters()).device
    ids = torch.tensor(prompt + answer, device=device)[None]
    hidden = model.hidden_states(ids[:, :-1])[0, len(prompt) - 1:]  # (len(answer), D)
    predicted = model.lm_head(hidden).argmax(-1)
    return bool((predicted == torch.tensor(answer, device=device)).all())


def retrieval_grid(model, tokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int = 3,
                   seed: int = 0, haystack: str = RULER_HAYSTACK) -> NeedleGrid:
    """RULER single-needle retrieval accuracy at each depth x length; lengths may exceed the model's context."""
    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}")
    model.eval()
    rng = random.Random(seed)
    accuracy = []
    for depth in depths:
        row = []
        for length in lengths:
            hits = 0
            for _ in range(trials):
                key, value = ruler_key(rng), str(rng.randint(1_000_000, 9_999_999))
                hits += greedy_hit(model, *ruler_prompt(tokenizer, length, depth, key, value, haystack))
            row.append(hits / trials)
        accuracy.append(tuple(row))
    return NeedleGrid(tuple(lengths), tuple(depths), tuple(accuracy), trials)
