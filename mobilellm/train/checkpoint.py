"""Training checkpoints: atomic, resumable with any number of processes, loadable by the rest of the tool.

    RUN/checkpoints/step_0000100/
        config.json, mobilellm_config.json, model.safetensors   full weights (`mobilellm.hf` format)
        tokenizer files                                          when the run names a tokenizer
        resume/                                                  what a resume reads, without pickle:
            model.json + model.safetensors                       the full model state dict (a tied name once)
            optimizer.json + optimizer.safetensors               the full optimizer state dict, by parameter name
            train_state.json + train_state.safetensors           step, data-sampler and RNG states per process

A checkpoint is written into `.step_0000100.partial` and renamed into place as the last act, so a kill at
any moment leaves the previous checkpoints intact, and a folder named `step_*` is always complete.

Every resume file is JSON or safetensors (`safe_state` says exactly what they may hold), so a planted file
fails to load but never runs code; the pickle-based format of older versions (train_state.pt, dcp/) is
refused. Model and optimizer are stored as *full* tensors by parameter name: saving gathers them on
process 0 (CPU), resuming reads them there and broadcasts them, each process keeping its FSDP2 shard or
DDP replica, so a run saved by N processes resumes with M. The cost is process 0's CPU memory: the whole
state at once, about 13 GB for a 1B model with Adam (fp32 weights and two moments; safetensors writes
from the tensors' own memory, no second copy), acceptable at the sizes this tool trains. Per-process
sharded files would spare it, at the price of resharding logic or of torch.distributed.checkpoint, whose
metadata is a pickle (its safetensors storage keeps tensors only, not the optimizer's param groups).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..hf import CheckpointError, ShardWriter
from .safe_state import read_state, write_state

CHECKPOINTS = "checkpoints"
RESUME = "resume"
OLD_FORMAT = ("train_state.pt", "dcp")  # pickle-based, before mobilellm stored resumes as JSON + safetensors
TRAIN_KEYS = ("step", "bad_steps", "data", "rng", "world_size")
STEP_DIR = re.compile(r"^step_(\d+)$")


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


def nothing_to_resume(run_dir: str | Path) -> str:
    """Why a resume of run_dir starts from step 0: the line a run prints when it finds no finished checkpoint."""
    root = Path(run_dir) / CHECKPOINTS
    partials = sorted(p.name for p in root.glob(".step_*.partial")) if root.is_dir() else []
    if partials:
        return (f"resume: no finished checkpoint in {root}, only {partials[-1]} (a save that was interrupted; "
                "it is discarded): starting from step 0")
    return f"resume: no checkpoint in {root} yet: starting from step 0"


def tied_names(model: nn.Module) -> dict[str, str]:
    """{alias: first name} for every tensor the model holds under more than one name (a tied LM head)."""
    first: dict[int, str] = {}
    aliases = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    train_state: dict, parallel, keep_last: int = 3,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write checkpoint `step` (every process calls this); returns its folder."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step_{step:07d}"
    partial = root / f".{final.name}.partial"
    # Collective under FSDP: every rank takes part, rank 0 receives the full tensors (the others nothing).
    model_sd, optim_sd = get_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rngs = parallel.gather_object(rng_state())
    if parallel.is_main:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while saving
        with ShardWriter(partial, model.config, extra_files=extra_files) as weights:  # the exported model
            for name, tensor in model_sd.items():
                weights.add(name, tensor)
        resume = partial / RESUME
        resume.mkdir()
        aliases = tied_names(model)
        write_state(resume, "model", {k: v for k, v in model_sd.items() if k not in aliases})
        write_state(resume, "optimizer", optim_sd)
        write_state(resume, "train_state", {**train_state, "rng": rngs, "world_size": parallel.world_size})
        if final.exists():  # the same step saved again after a resume: replace it
            os.replace(final, root / f".{final.name}.old")
            shutil.rmtree(root / f".{final.name}.old")
        os.replace(partial, final)
        for old in step_dirs(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    parallel.barrier()
    return final


def read_train_state(folder: Path) -> dict:
    """The train state of checkpoint `folder`; CheckpointError for an old-format or incomplete one."""
    resume = folder / RESUME
    if not resume.is_dir():
        if any((folder / name).exists() for name in OLD_FORMAT):
            raise CheckpointError(
                f"{folder} is a training checkpoint of an older mobilellm (train_state.pt and dcp/, stored with "
                "pickle, which can run code when read): this format is not supported any more, and it was not "
                "opened. Its weights (model.safetensors) still load as a model to start a new run from")
        raise CheckpointError(f"{folder} is not a complete training checkpoint (no {RESUME}/ folder)")
    state = read_state(resume, "train_state")
    missing = [k for k in TRAIN_KEYS if not isinstance(state, dict) or k not in state]
    if missing or len(state["rng"]) != state["world_size"]:
        raise CheckpointError(f"{resume / 'train_state.json'} lacks {', '.join(missing) or 'an RNG state per process'}")
    return state


def load_checkpoint(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, parallel) -> dict:
    """Restore model, optimizer and this process's RNG; returns the train state (step, data state, ...)."""
    folder = Path(folder)
    train_state = read_train_state(folder)
    model_sd, optim_sd = {}, {}
    if parallel.is_main:  # the others receive their part by broadcast
        model_sd = read_state(folder / RESUME, "model")
        model_sd.update({alias: model_sd[name] for alias, name in tied_names(model).items() if name in model_sd})
        optim_sd = read_state(folder / RESUME, "optimizer")
    # Two calls, optimizer first as set_state_dict does: given an empty model state dict (ranks > 0),
    # set_state_dict would skip the model, and with it rank 0's broadcast.
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=parallel.world_size > 1)
    set_optimizer_state_dict(model, optimizer, optim_sd, options=options)
    set_model_state_dict(model, model_sd, options=options)
    rngs = train_state.pop("rng")
    if parallel.world_size == train_state["world_size"]:  # RNG streams only carry over rank for rank
        set_rng_state(rngs[parallel.rank])
    return train_state
