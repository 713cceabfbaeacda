"""A tiny pipeline plan on local data (no network): the tiny configs, a 300-token BPE, two domains of documents,
a tiny teacher, chat and preference JSONL, the standard-task fixtures for multiple choice."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np

from mobilellm.config import ModelConfig
from mobilellm.hf import save_pretrained
from mobilellm.model import build_model
from mobilellm.pipeline import (CorpusSpec, EvalSpec, ExportSpec, InstructSpec, MergeSpec, MixSpec, Plan,
                                RecipeCall, build_stages, run_pipeline)
from recipes.dpo import dpo
from recipes.phase2 import phase2
from recipes.pipeline import phase1, proxy
from recipes.qat import qat
from recipes.sft import sft
from recipes.specialists import specialist
from tests.data_helpers import WORDS, tiny_tokenizer, write_jsonl
from tests.mix_helpers import counting, sentences

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


def words(rng, k):
    return " ".join(rng.choice(WORDS, size=int(rng.integers(2, k))))


def make_inputs(root: Path) -> dict:
    """Tokenizer, teacher, corpus and instruction files under root (once)."""
    root.mkdir(parents=True, exist_ok=True)
    if (root / "done").exists():
        return json.loads((root / "done").read_text())
    tokenizer = tiny_tokenizer(root / "tok")
    teacher = ModelConfig.from_name("tiny-llama").replace(vocab_size=tokenizer.vocab_size)
    save_pretrained(build_model(teacher, seed=5), root / "teacher")
    tokenizer.save(root / "teacher")
    rng = random.Random(0)
    corpus = {"count": str(write_jsonl(root / "count.jsonl", counting(120, rng))),
              "prose": str(write_jsonl(root / "prose.jsonl", sentences(120, rng)))}
    nrng = np.random.default_rng(0)
    chats = [{"prompt": words(nrng, 8), "completion": words(nrng, 10)} for _ in range(24)]
    pairs = [{"prompt": words(nrng, 8), "chosen": "the " + words(nrng, 6), "rejected": "of " + words(nrng, 6)}
             for _ in range(16)]
    for name, records in (("sft.jsonl", chats[:20]), ("sft_val.jsonl", chats[20:]), ("dpo.jsonl", pairs)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    files = {"tokenizer": str(root / "tok"), "teacher": str(root / "teacher"), "corpus": corpus,
             "sft": str(root / "sft.jsonl"), "sft_val": str(root / "sft_val.jsonl"), "dpo": str(root / "dpo.jsonl")}
    (root / "done").write_text(json.dumps(files))
    return files


def tiny_plan(files: dict) -> Plan:
    student = ModelConfig.from_name("tiny").replace(vocab_size=300)
    return Plan(
        name="tiny",
        tokenizer=files["tokenizer"],
        teacher=files["teacher"],
        student=student,
        corpus=CorpusSpec(files=files["corpus"], val_fraction=0.2),
        mix=MixSpec(RecipeCall(proxy, {"steps": 8, "batch_rows": 4, "seq_len": 32, "model": student}),
                    target_domains=("count",), checkpoints=4, probe_rows=4),
        phase1=RecipeCall(phase1, {"steps": 6, "batch_rows": 4, "seq_len": 32, "save_every": 2, "eval_every": 3,
                                   "lr": 3e-3}),
        phase2=RecipeCall(phase2, {"seq_len": 64, "max_seq_len": 256, "rope_theta": 40_000.0, "short_doc_tokens": 32, "steps": 4,
                                   "batch_rows": 2, "save_every": 2, "lr": 1e-3}),
        specialists=RecipeCall(specialist, {"steps": 2, "lr": 1e-3, "batch_rows": 2, "seq_len": 32, "save_every": 1}),
        specialist_domains=("count", "prose"),
        merge=MergeSpec(step=0.5, seq_len=32, batch_size=2, val_batches=2),
        qat=RecipeCall(qat, {"scheme": "cpu", "steps": 3, "batch_rows": 2, "seq_len": 32, "save_every": 1}),
        instruct=InstructSpec(sft=RecipeCall(sft, {"steps": 3, "batch_rows": 2, "seq_len": 64, "lr": 1e-3,
                                                   "save_every": 1}),
                              dpo=RecipeCall(dpo, {"steps": 2, "batch_rows": 2, "seq_len": 64, "lr": 1e-4,
                                                   "precompute_reference": True, "save_every": 1}),
                              sft_data=files["sft"], sft_val=files["sft_val"], dpo_data=files["dpo"]),
        eval=EvalSpec(tasks=("arc_easy",), limit=4, data_dir=str(FIXTURES), seq_len=32, val_batches=2,
                      needle_lengths=(160,), needle_depths=(0.0, 1.0), needle_trials=1, position_length=40,
                      position_buckets=4),
        export=ExportSpec(prompt="the quick", max_new_tokens=4),
    )


def env_tiny_plan() -> Plan:
    """`--recipe tests.pipeline_helpers:env_tiny_plan`: the tiny plan on the inputs under $MOBILELLM_TINY_INPUTS."""
    import os

    return tiny_plan(make_inputs(Path(os.environ["MOBILELLM_TINY_INPUTS"])))


if __name__ == "__main__":  # python -m tests.pipeline_helpers INPUTS OUT: the tiny pipeline in its own process
    import torch

    torch.set_num_threads(1)
    run_pipeline(build_stages(tiny_plan(make_inputs(Path(sys.argv[1])))), sys.argv[2])
