"""Preference optimisation (DPO and its variants) as one more loss of the one loop.

Per pair, with log-probabilities summed over the completion's tokens (averaged per token for IPO, as TRL does),
h = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)), and the pair's loss is
- sigmoid (DPO, Rafailov et al. 2023): -log sigmoid(beta h); with label smoothing e (cDPO):
  -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h);
- ipo (Azar et al. 2023): (h - 1 / (2 beta))^2;
- hinge (SLiC, Zhao et al. 2023): max(0, 1 - beta h).
The loss is summed over pairs and counts pairs (`Loss.count`), so the loop's division makes it the mean per pair
however the step is split. The implicit rewards beta (log pi - log ref) of each side, their margin and the
fraction of pairs whose chosen side wins go to metrics.jsonl (`Loss.take_metrics`).

No (B, T, V) logits: the policy's token log-probs are read a chunk of rows at a time (`token_logprobs`); the
gradient flows through a surrogate, the token CEs weighted by d loss / d log-prob of their sequence
(`head_loss` with weighted CE), whose gradient is exactly the pair loss's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_folder
from ..data.packing import IGNORE_INDEX
from ..data.pair_batches import pairs_in
from ..hf import CheckpointError
from .losses import Loss, cross_entropy, head_loss, target_rows, token_logprobs
from .safe_state import read_state, write_state

PAIR_LOSSES = ("sigmoid", "ipo", "hinge")
REFERENCE_CACHE = "reference_logps"  # a folder in the run: reference.json + reference.safetensors


def pair_losses(kind: str, h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Each pair's loss (P,) from its log-ratio difference h (P,)."""
    if kind == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if kind == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if kind == "hinge":
        return torch.relu(1 - beta * h)
    raise ValueError(f"unknown preference loss {kind!r}; expected one of {', '.join(PAIR_LOSSES)}")


def sequence_ids(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sequence (2 j + side) of each target position, in `target_rows` order (N,)."""
    return batch["sequence"][batch["targets"] != IGNORE_INDEX]


def sequence_sums(values: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float32, device=values.device).index_add_(0, ids, values.float())


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probs (2P,) of each sequence's targets under `model`, without gradients (a reference)."""
    with torch.no_grad():
        hidden, targets = target_rows(model, batch)
        return sequence_sums(token_logprobs(model.lm_head, hidden, targets), sequence_ids(batch), 2 * int(pairs_in(batch)))


@dataclass
class PreferenceLoss(Loss):
    """A pairwise preference loss on packed pair batches (`mobilellm.data.pair_batches`).

    `reference`: the frozen reference model, or None when batches carry cached `ref_logps`.
    """

    kind: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference: nn.Module | None = None
    chunk_size: int | None = None
    _sums: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.kind not in PAIR_LOSSES:
            raise ValueError(f"unknown preference loss {self.kind!r}; expected one of {', '.join(PAIR_LOSSES)}")
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")

    def count(self, batch):
        return pairs_in(batch)

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        n = 2 * int(pairs_in(batch))
        if self.reference is not None:
            return sequence_logps(self.reference, batch)
        if "ref_logps" not in batch:
            raise ValueError("the preference loss has no reference model and the batches carry no cached reference "
                             "log-probs (ref_logps)")
        return sequence_sums(batch["ref_logps"][batch["targets"] != IGNORE_INDEX], sequence_ids(batch), n)

    def __call__(self, model, batch):
        if "sequence" not in batch or "doc_ids" not in batch:
            raise ValueError("the preference loss reads packed pairs with document masks: batches need `sequence` "
                             "and `doc_ids` (PreferenceData, document_masking on)")
        hidden, targets = target_rows(model, batch)  # (N, D), (N,)
        ids, n = sequence_ids(batch), 2 * int(pairs_in(batch))
        policy = sequence_sums(token_logprobs(model.lm_head, hidden.detach(), targets, self.chunk_size), ids, n)
        reference = self.reference_logps(batch)
        scale = 1.0 / torch.bincount(ids, minlength=n).clamp_min(1) if self.kind == "ipo" else torch.ones_like(policy)
        with torch.enable_grad():  # the small (2P,) graph from sequence log-probs to the summed pair loss
            logps = policy.clone().requires_grad_()
            ratios = (logps - reference) * scale  # (2P,) log pi / ref per sequence
            losses = pair_losses(self.kind, ratios[0::2] - ratios[1::2], self.beta, self.label_smoothing)
            (d_logps,) = torch.autograd.grad(losses.sum(), logps)
        self._record(self.beta * ratios.detach())
        # d surrogate / d theta = sum_t -d_logps[seq(t)] d CE_t / d theta = sum_s d_logps[s] d log pi(s) / d theta.
        weights = -d_logps[ids]
        surrogate = head_loss(model.lm_head, hidden, lambda logits, rows, need_grad: cross_entropy(
            logits, targets[rows], need_grad, weights[rows]), self.chunk_size)
        return losses.sum().detach() + surrogate - surrogate.detach()

    def _record(self, rewards: torch.Tensor) -> None:
        chosen, rejected = rewards[0::2], rewards[1::2]
        figures = {"reward_chosen": chosen.sum(), "reward_rejected": rejected.sum(),
                   "reward_margin": (chosen - rejected).sum(), "reward_accuracy": (chosen > rejected).float().sum()}
        for name, value in figures.items():
            self._sums[name] = self._sums.get(name, 0) + value

    def take_metrics(self):
        sums, self._sums = self._sums, {}
        return sums


# ---- reference log-probs computed once --------------------------------------------------------------

def compute_reference(reference: nn.Module, batches, device: torch.device) -> np.ndarray:
    """Summed reference log-probs (pairs, 2) of every pair of a `PairBatches` source, in one pass."""
    values = np.zeros((len(batches.pairs), 2), dtype=np.float32)
    for batch, indices in batches.every_pair(batches.micro_batch_size):
        logps = sequence_logps(reference, {k: v.to(device) for k, v in batch.items()}).cpu().numpy()
        values[indices] = logps.reshape(-1, 2)
    return values


def cached_reference(reference: nn.Module, batches, run_dir: Path, parallel, device: torch.device,
                     identity: dict) -> np.ndarray:
    """The reference log-probs of every pair, read from the run's cache when it was made for the same data and
    reference (`identity`), else computed once by the main process and cached there (a resume reads them)."""
    folder = Path(run_dir) / REFERENCE_CACHE
    key = {"data": batches.setting, **identity}

    def cached():
        try:
            state = read_state(folder, "reference")
        except CheckpointError:  # none yet, or not ours
            return None
        return state["logps"] if state.get("identity") == json.loads(json.dumps(key)) else None

    if parallel.is_main and cached() is None:
        values = compute_reference(reference, batches, device)
        with atomic_folder(folder) as tmp:
            write_state(tmp, "reference", {"identity": key, "logps": values})
    parallel.barrier()
    values = cached()
    if values is None:
        raise CheckpointError(f"{folder}: the reference log-probs cache could not be read back")
    return values
