"""Training progress: one line per step, metrics as JSONL (and TensorBoard when installed), FLOPs and MFU."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ..atomic import write_text_atomic
from ..config import ModelConfig
from ..schema import Schema, parse_json

METRICS_FILE = "metrics.jsonl"


def matmul_params(config: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: the blocks and the LM head (not the embedding lookup)."""
    d, hd = config.dim, config.head_dim
    attn = d * hd * (2 * config.n_heads + 2 * config.n_kv_heads)
    mlp = 3 * d * config.ffn_dim
    return config.n_layers * (attn + mlp) + config.vocab_size * d


def attention_context(config: ModelConfig, layer_type: str, seq_len: int) -> int:
    if layer_type == "sliding_attention":
        return min(seq_len, config.sliding_window)
    if layer_type == "chunked_attention":
        return min(seq_len, config.attention_chunk_size)
    return seq_len


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6N plus 12 * heads * head_dim * context per layer.

    The attention term follows the PaLM / nanoGPT convention (no halving for causality); a sliding layer
    sees at most its window, so MobileLLM-Pro's local layers cost a fraction of a global one's.
    """
    attn = sum(12 * config.n_heads * config.head_dim * attention_context(config, t, seq_len)
               for t in config.layer_types)
    return 6 * matmul_params(config) + attn


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def format_rate(tokens_per_s: float) -> str:
    if tokens_per_s >= 1e6:
        return f"{tokens_per_s / 1e6:.2f}M"
    return f"{tokens_per_s / 1e3:.1f}k" if tokens_per_s >= 1e3 else f"{tokens_per_s:.0f}"


class ProgressLog:
    """Prints `step 00100/05000 | loss 3.21 | lr 3.0e-04 | 12.3k tok/s | mfu 1.2% | eta 4m10s` and records JSONL.

    `peak_flops` is the hardware's peak FLOP/s (all devices together); without it MFU reads "n/a".
    Only the process that owns the log (rank 0) passes `enabled=True`.
    """

    def __init__(self, run_dir: Path, total_steps: int, model_config: ModelConfig, peak_flops: float | None,
                 enabled: bool = True, print_every: int = 1, objective: str = "loss"):
        self.run_dir, self.total_steps, self.enabled = Path(run_dir), total_steps, enabled
        self.objective = objective  # what "loss" measures (e.g. the loss class): KD's KL is not a CE
        self.model_config, self.peak_flops, self.print_every = model_config, peak_flops, print_every
        self.width = max(5, len(str(total_steps)))
        self.path = self.run_dir / METRICS_FILE
        self.recent: list[float] = []  # seconds per step, for the ETA
        self.tensorboard = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                pass

    def start_at(self, done: int) -> None:
        """On resume after `done` steps, drop later records (a killed run may have logged past its checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= done]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def _write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.tensorboard.add_scalar(key, value, record["step"])

    def step(self, step: int, loss: float, lr: float, grad_norm: float, tokens: int, seq_len: int, seconds: float,
             skipped: bool = False, metrics: dict[str, float] | None = None) -> str:
        """`metrics`: the loss's own figures of the step (e.g. DPO's reward accuracy), logged beside the loss."""
        metrics = metrics or {}
        self.recent = (self.recent + [seconds])[-20:]
        tok_s = tokens / seconds if seconds > 0 else float("nan")
        mfu = tok_s * flops_per_token(self.model_config, seq_len) / self.peak_flops if self.peak_flops else None
        eta = (self.total_steps - step - 1) * sum(self.recent) / len(self.recent)
        line = (f"step {step + 1:0{self.width}d}/{self.total_steps:0{self.width}d} | loss {loss:.4f} | lr {lr:.1e} | "
                f"{format_rate(tok_s)} tok/s | mfu {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | "
                f"eta {format_duration(eta)}" + "".join(f" | {name} {value:.3f}" for name, value in metrics.items())
                + (" | SKIPPED (non-finite)" if skipped else ""))
        if self.enabled:
            self._write({"step": step + 1, "loss": loss if math.isfinite(loss) else None, "objective": self.objective,
                         "lr": lr,
                         "grad_norm": grad_norm if math.isfinite(grad_norm) else None, "tokens_per_s": tok_s,
                         "mfu": mfu, "skipped": skipped, "time": time.time(),
                         **{name: value if math.isfinite(value) else None for name, value in metrics.items()}})
            if (step + 1) % self.print_every == 0 or step + 1 == self.total_steps or skipped:
                print(line, flush=True)
        return line

    def validation(self, step: int, losses: dict[str, float]) -> None:
        """`losses`: {"all": ..., and per domain when measured so}; each domain's as `val_loss/<domain>`."""
        if self.enabled:
            domains = {name: value for name, value in losses.items() if name != "all"}
            self._write({"step": step + 1, "val_loss": losses["all"],
                         **{f"val_loss/{name}": value for name, value in domains.items()}, "time": time.time()})
            detail = f" ({', '.join(f'{name} {value:.3f}' for name, value in domains.items())})" if domains else ""
            print(f"step {step + 1:0{self.width}d}/{self.total_steps:0{self.width}d} | val loss {losses['all']:.4f}"
                  + detail, flush=True)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


_FIX_METRICS = "delete the broken line (a run killed mid-write leaves at most the last one)"
METRICS_ROW = Schema({"step": (int,)}, ("step",), fix=_FIX_METRICS)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}: is it a training run folder?")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            rows.append(METRICS_ROW.check(parse_json(line, f"{path} line {number}", fix=_FIX_METRICS),
                                          f"{path} line {number}"))
    return rows
