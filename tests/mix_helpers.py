"""A tiny shard folder with structure to learn (counting, templated sentences) and the proxy recipe the mix tests run."""

from __future__ import annotations

import random
from pathlib import Path

from mobilellm.config import ModelConfig
from mobilellm.data import Source, tokenize_to_shards
from mobilellm.train import CE, Recipe, Schedule, TrainConfig
from tests.data_helpers import tiny_tokenizer, write_jsonl

NUMBERS = "zero one two three four five six seven eight nine".split()
ADJ, NOUN, VERB = "quick lazy red old".split(), "fox dog cat bird".split(), "jumps runs looks".split()


def counting(n: int, rng: random.Random) -> list[str]:
    return [" ".join(NUMBERS[(start + k) % 10] for k in range(rng.randint(20, 60)))
            for start in (rng.randrange(10) for _ in range(n))]


def sentences(n: int, rng: random.Random) -> list[str]:
    return [" ".join(f"the {rng.choice(ADJ)} {rng.choice(NOUN)} {rng.choice(VERB)} over the {rng.choice(NOUN)}."
                     for _ in range(rng.randint(3, 10))) for _ in range(n)]


def mix_shards(folder: Path) -> tuple[Path, Path]:
    """(shards, tokenizer folder): domains count and prose, 20% held out."""
    rng = random.Random(0)
    tiny_tokenizer(folder / "tok")
    from mobilellm.tokenizer import Tokenizer
    docs = {"count": [Source(write_jsonl(folder / "count.jsonl", counting(150, rng)))],
            "prose": [Source(write_jsonl(folder / "prose.jsonl", sentences(150, rng)))]}
    tokenize_to_shards(docs, Tokenizer.load(folder / "tok"), folder / "shards", val_fraction=0.2, progress=False)
    return folder / "shards", folder / "tok"


def proxy_recipe(shards: Path, tokenizer: Path, steps: int = 8, rows: int = 8) -> Recipe:
    return Recipe(name="proxy", student=ModelConfig.from_name("tiny").replace(vocab_size=300),
                  train=TrainConfig(steps=steps, schedule=Schedule(1e-2, steps, min(2, steps)), print_every=1000),
                  seq_len=32, global_batch_rows=rows, shards=str(shards), tokenizer=str(tokenizer), objective=CE())
