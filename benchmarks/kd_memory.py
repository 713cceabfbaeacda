"""Peak memory of the KD loss at MobileLLM-Pro's vocabulary (202,048): chunked vs full logits, forward + backward.

Each variant runs in a fresh process; its extra peak resident memory (ru_maxrss after the loss and its
backward, minus ru_maxrss after the inputs were made) is what the loss itself needed. Hidden size is
small (the memory in question scales with tokens x vocab, not with the hidden size). The full-logits
reference is measured at 512 tokens (at 2048 it would need ~10 GB, past this shared machine's budget);
the chunked loss at 512 and 2048 tokens.

    python benchmarks/kd_memory.py
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB, DIM = 202_048, 64

CHILD = """
import resource, sys, torch
import torch.nn.functional as F
sys.path.insert(0, {root!r})
from mobilellm.train.losses import chunk_rows, chunked_linear_loss, kl_full
torch.set_num_threads(1)
variant, tokens, vocab, dim = sys.argv[1], int(sys.argv[2]), {vocab}, {dim}
chunk = chunk_rows(vocab)  # the losses' default
g = torch.Generator().manual_seed(0)
hidden = torch.randn(tokens, dim, generator=g, requires_grad=True)
weight = (torch.randn(vocab, dim, generator=g) * 0.02).requires_grad_()
t_hidden, t_weight = torch.randn(tokens, dim, generator=g), torch.randn(vocab, dim, generator=g) * 0.02
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if variant == "chunked":
    loss = chunked_linear_loss(hidden, weight, lambda z, rows, ng: kl_full(z, t_hidden[rows] @ t_weight.T, 1.0, ng), chunk)
else:
    logits = hidden @ weight.T  # (N, V)
    with torch.no_grad():
        t_logits = t_hidden @ t_weight.T
    loss = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(t_logits, -1), log_target=True, reduction="sum")
loss.backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024, loss.item())
"""


def measure(variant: str, tokens: int) -> dict:
    root = str(Path(__file__).resolve().parents[1])
    code = CHILD.format(root=root, vocab=VOCAB, dim=DIM)
    out = subprocess.run([sys.executable, "-c", code, variant, str(tokens)], capture_output=True, text=True, check=True)
    extra, loss = out.stdout.split()
    return {"variant": variant, "tokens": tokens, "extra_peak_bytes": int(extra), "extra_peak_mb": int(extra) / 2**20,
            "loss": float(loss), "one_logits_tensor_mb": tokens * VOCAB * 4 / 2**20}


def main():
    from benchmarks.machine import machine_info, write_json
    from mobilellm.train.losses import chunk_rows

    rows = [measure("full", 512), measure("chunked", 512), measure("chunked", 2048)]
    for row in rows:
        print(f"{row['variant']:8s} {row['tokens']:5d} tokens: +{row['extra_peak_mb']:8.1f} MB peak "
              f"(one fp32 logits tensor: {row['one_logits_tensor_mb']:.0f} MB), loss {row['loss']:.3f}")
    full, chunked = rows[0], rows[1]
    result = {"vocab": VOCAB, "hidden": DIM, "chunk_rows": chunk_rows(VOCAB), "runs": rows,
              "full_over_chunked_at_512": full["extra_peak_bytes"] / chunked["extra_peak_bytes"],
              "same_loss_at_512": abs(full["loss"] - chunked["loss"]) <= 1e-3 * abs(full["loss"]),
              "measure": "ru_maxrss growth of a fresh process during loss + backward",
              "machine": machine_info()}
    write_json(Path(__file__).parent / "results" / "kd_memory.json", result)
    print(f"full / chunked peak at 512 tokens: x{result['full_over_chunked_at_512']:.1f}")


if __name__ == "__main__":
    main()
