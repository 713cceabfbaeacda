"""Training checkpoints: atomic, resumable with any number of processes, loadable by the rest of the tool.

    RUN/checkpoints/step_0000100/
        config.json, mobilellm_config.json, model.safetensors   full weights (`mobilellm.hf` format)
        tokenizer files                                          when the run names a tokenizer
        dcp/                                                     model + optimizer, torch.distributed.checkpoint
        train_state.pt                                           step, data-sampler state, RNG states, counters

A checkpoint is written into `.step_0000100.partial` and renamed into place as the last act, so a kill at
any moment leaves the previous checkpoints intact, and a folder named `step_*` is always complete.
DCP stores tensors by parameter name with their sharding, so a run saved by N processes (FSDP2 shards or
DDP replicas) resumes with M.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from ..config import ModelConfig
from ..hf import save_pretrained

CHECKPOINTS = "checkpoints"
TRAIN_STATE = "train_state.pt"
STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class _Weights:
    """What `save_pretrained` reads from a model: its config and a (full, unsharded) state dict."""

    config: ModelConfig
    tensors: dict[str, torch.Tensor]

    def state_dict(self):
        return self.tensors


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def step_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = step_dirs(Path(run_dir))
    return dirs[-1] if dirs else None


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    train_state: dict, parallel, keep_last: int = 3,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write checkpoint `step` (every process calls this); returns its folder."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step_{step:07d}"
    partial = root / f".{final.name}.partial"
    # Collective under FSDP: every rank takes part, rank 0 receives the full tensors.
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if parallel.is_main:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while saving
        save_pretrained(_Weights(model.config, full), partial, extra_files=extra_files)
    parallel.barrier()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")  # single process: expected
        dcp.save(_dcp_state(model, optimizer), checkpoint_id=partial / "dcp")
    rngs = parallel.gather_object(rng_state())
    if parallel.is_main:
        state_path = partial / TRAIN_STATE
        torch.save({**train_state, "rng": rngs, "world_size": parallel.world_size}, state_path)
        with open(state_path, "rb") as f:
            os.fsync(f.fileno())
        if final.exists():  # the same step saved again after a resume: replace it
            os.replace(final, root / f".{final.name}.old")
            shutil.rmtree(root / f".{final.name}.old")
        os.replace(partial, final)
        for old in step_dirs(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    parallel.barrier()
    return final


def load_checkpoint(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, parallel) -> dict:
    """Restore model, optimizer and this process's RNG; returns the train state (step, data state, ...)."""
    folder = Path(folder)
    if not (folder / TRAIN_STATE).exists():
        raise FileNotFoundError(f"{folder} is not a complete training checkpoint (no {TRAIN_STATE})")
    state = _dcp_state(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.load(state, checkpoint_id=folder / "dcp")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train_state = torch.load(folder / TRAIN_STATE, weights_only=False)
    rngs = train_state.pop("rng")
    if parallel.world_size == train_state["world_size"]:  # RNG streams only carry over rank for rank
        set_rng_state(rngs[parallel.rank])
    return train_state
