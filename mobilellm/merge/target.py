"""What a merge is scored on: held-out next-token loss on chosen domains of a shard folder.

The held-out documents of each domain are split in two disjoint parts by document index: the weight search
sees part 0 ("search"), reports use part 1 ("report"), so the reported score of the searched weights is not
the score the search optimised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import TokenDataset, validation_batches
from ..train.loop import validation_loss

PARTS = {"search": (0, 2), "report": (1, 2)}


@dataclass
class DomainTarget:
    batches: dict[str, list[dict[str, torch.Tensor]]]  # domain -> fixed held-out batches

    @classmethod
    def from_shards(cls, shards: str, domains: list[str] | None, part: str, *, seq_len: int, batch_size: int,
                    max_batches: int | None) -> "DomainTarget":
        if part not in PARTS:
            raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
        dataset = TokenDataset(shards)
        domains = domains or dataset.domains
        return cls({d: list(validation_batches(dataset, seq_len=seq_len, batch_size=batch_size, domains=[d],
                                               max_batches=max_batches, part=PARTS[part])) for d in domains})

    def losses(self, model) -> dict[str, float]:
        """Per-domain mean next-token CE, and their unweighted mean under "mean"."""
        model.eval()
        per_domain = {d: validation_loss(model, batches) for d, batches in self.batches.items()}
        return {**per_domain, "mean": sum(per_domain.values()) / len(per_domain)}
