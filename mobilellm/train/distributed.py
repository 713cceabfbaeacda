"""The same training loop on one process or under `torchrun`, data-parallel with DDP or FSDP2.

The loop talks to a `Parallel` object only: it prepares the model (shard or replicate), turns gradient
sync off for all but the last micro-batch, sums across processes and names the device. Every rank reads
its own batches; the batch source's state must describe the *global* stream (each rank taking its rows),
so that a checkpoint resumes with another number of processes.

    torchrun --nproc_per_node 8 -m mobilellm pretrain --recipe pro-1b --parallel fsdp ...
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("ddp", "fsdp")


class SingleProcess:
    rank, world_size, is_main = 0, 1, True

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    def prepare(self, model: nn.Module, loss):
        """A function batch -> summed loss that runs `loss(model, batch)` with whatever wrapping is needed."""
        return lambda batch: loss(model, batch)

    def accumulating(self, step_fn, sync: bool):
        return contextlib.nullcontext()

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def gather_object(self, obj) -> list:
        return [obj]

    def barrier(self) -> None:
        pass


class _LossModule(nn.Module):
    """Model + loss as one module, so DDP's forward (and its gradient hooks) covers the loss computation."""

    def __init__(self, model: nn.Module, loss):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch):
        return self.loss(self.model, batch)


class DataParallel(SingleProcess):
    """One process of a torchrun job; `strategy` is "ddp" (replicas) or "fsdp" (FSDP2 `fully_shard`, per block)."""

    def __init__(self, strategy: str):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown parallel strategy {strategy!r}; expected one of {STRATEGIES}")
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: start with torchrun, or call init_parallel()")
        self.strategy = strategy
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        local = int(os.environ.get("LOCAL_RANK", 0))
        super().__init__(f"cuda:{local}" if torch.cuda.is_available() else "cpu")

    def prepare(self, model, loss):
        if self.strategy == "ddp":
            module = _LossModule(model, loss)
            self._ddp = nn.parallel.DistributedDataParallel(
                module, device_ids=[self.device] if self.device.type == "cuda" else None)
            return self._ddp
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)  # embeddings, final norm and the (tied) head form the root group
        register_fsdp_forward_method(model, "hidden_states")  # the losses call it rather than forward
        self._fsdp_model = model
        return lambda batch: loss(model, batch)

    def accumulating(self, step_fn, sync: bool):
        if self.strategy == "ddp":
            return contextlib.nullcontext() if sync else self._ddp.no_sync()
        self._fsdp_model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def all_reduce_sum(self, value):
        value = value.clone()
        dist.all_reduce(value)
        return value

    def gather_object(self, obj):
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        dist.barrier()


def init_parallel(strategy: str | None) -> SingleProcess:
    """A `DataParallel` when launched by torchrun with more than one process, else `SingleProcess`."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return SingleProcess("cuda" if torch.cuda.is_available() else "cpu")
    if strategy is None:
        raise ValueError("launched with several processes: choose a parallel strategy (ddp or fsdp)")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return DataParallel(strategy)
