"""Cached top-k teacher distributions: the teacher's cost is paid once per window, whoever trains on it.

A window's entry holds, at every position, the teacher's k most likely next tokens and their log-probabilities
at the distillation temperature (`ids` int32 and `log_probs` fp32, both (T, k)), in one safetensors file named
by the sha256 of the window as the teacher sees it (tokens, positions, document ids). The folder is keyed by
the teacher's identity (config, weight files, dtype), k and the temperature, so runs that share a cache folder
(arms and seeds of an experiment, a resumed run) share entries only where they are the same computation.
Entries are written atomically (a killed run leaves no half entry) and read with safetensors (no pickle).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from ..atomic import atomic_file
from ..hf import weight_files
from .losses import chunk_rows


def teacher_identity(folder: str | Path, teacher: nn.Module, dtype: torch.dtype) -> dict:
    folder = Path(folder)
    files = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weight_files(folder)]
    return {"config": teacher.config.to_dict(), "weights": files, "dtype": str(dtype)}


class TopKCache:
    """The teacher's top-k log-probabilities of each window, computed on first use and kept in `folder`."""

    def __init__(self, folder: str | Path, teacher: nn.Module, k: int, temperature: float, identity: dict):
        if k < 1:
            raise ValueError(f"top_k must be at least 1, got {k}")
        self.teacher, self.k, self.temperature = teacher, k, temperature
        key = json.dumps({**identity, "k": k, "temperature": temperature}, sort_keys=True, default=str)
        self.folder = Path(folder) / hashlib.sha256(key.encode()).hexdigest()[:16]
        self.hits = self.misses = 0

    @staticmethod
    def window_key(tokens: torch.Tensor, positions: torch.Tensor | None, doc_ids: torch.Tensor | None) -> str:
        digest = hashlib.sha256()
        for part in (tokens, positions, doc_ids):
            digest.update(b"-" if part is None else part.to(torch.int64).cpu().numpy().tobytes())
        return digest.hexdigest()

    def lookup(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(log_probs fp32, ids int64), both (B, T, k), of every row of `batch`; missing rows are computed."""
        tokens, positions, doc_ids = batch["tokens"], batch.get("positions"), batch.get("doc_ids")
        rows = [self.window_key(tokens[b], None if positions is None else positions[b],
                                None if doc_ids is None else doc_ids[b]) for b in range(tokens.shape[0])]
        found = {b: self._read(key) for b, key in enumerate(rows)}
        missing = [b for b, entry in found.items() if entry is None]
        self.hits += len(rows) - len(missing)
        self.misses += len(missing)
        if missing:
            index = torch.tensor(missing)
            pick = lambda t: None if t is None else t[index]  # noqa: E731
            log_probs, ids = self.compute(tokens[index], pick(positions), pick(doc_ids))
            for i, b in enumerate(missing):
                entry = {"log_probs": log_probs[i].contiguous(), "ids": ids[i].to(torch.int32).contiguous()}
                with atomic_file(self.folder / f"{rows[b]}.safetensors", "wb") as fh:
                    fh.write(save_tensors(entry))
                found[b] = entry
        device = tokens.device
        return (torch.stack([found[b]["log_probs"] for b in range(len(rows))]).to(device),
                torch.stack([found[b]["ids"] for b in range(len(rows))]).to(device=device, dtype=torch.int64))

    def _read(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.folder / f"{key}.safetensors"
        return load_tensors(path.read_bytes()) if path.exists() else None

    @torch.no_grad()
    def compute(self, tokens, positions, doc_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's top-k of log_softmax(logits / T) at every position: ((B, T, k) fp32, (B, T, k) int64)."""
        hidden = self.teacher.hidden_states(tokens, positions, doc_ids)  # (B, T, D)
        flat = hidden.flatten(0, 1)
        head = self.teacher.lm_head
        step = chunk_rows(head.weight.shape[0])
        values, ids = [], []
        for start in range(0, flat.shape[0], step):
            logits = head(flat[start:start + step]).float()  # (n, V)
            top = (logits / self.temperature).log_softmax(-1).topk(self.k, dim=-1)
            values.append(top.values)
            ids.append(top.indices)
        shape = (*tokens.shape, self.k)
        return torch.cat(values).view(shape).cpu(), torch.cat(ids).view(shape).cpu()
