"""`mobilellm quantize` (PTQ) and `mobilellm qat` (QAT with self-distillation through the train loop)."""

from __future__ import annotations

from pathlib import Path

from ..artifacts import resolve_checkpoint
from ..hf import load_pretrained
from ..quant import QuantConfig, quantize_
from ..quant.checkpoint import save_quantized
from ..tokenizer import tokenizer_files


def quantize(checkpoint: Path, *, scheme: str, out: Path) -> None:
    """Post-training int4 quantization (round-to-nearest) of a checkpoint folder.

    Writes packed int4 safetensors with the model and quantization configs beside them; load them with
    mobilellm.quant.checkpoint.load_quantized.

    Args:
        checkpoint: a full-precision checkpoint folder, or smollm2-135m
        scheme: cpu (int4 group-32 + int8 dynamic activations + int8 KV) or accelerator (int4 per channel)
        out: output folder (written atomically)
    """
    config = QuantConfig.from_scheme(scheme)
    checkpoint = resolve_checkpoint(checkpoint)
    model = quantize_(load_pretrained(checkpoint).eval(), config)
    save_quantized(model, config, out, extra_files=tokenizer_files(checkpoint))
    size = sum(f.stat().st_size for f in Path(out).iterdir())
    print(f"{checkpoint} -> {out}: {scheme} scheme, {size / 1e6:.1f} MB")


def qat(checkpoint: Path, *, scheme: str, data: Path, out: Path, steps: int = 100, batch_size: int = 4,
        seq_len: int = 256, lr: float = 2e-5, self_distillation: bool = True, run_dir: Path | None = None) -> None:
    """Quantization-aware training: prepare -> train (KL to the frozen full-precision model) -> convert.

    Runs the project's one training loop on tokenized shards (mobilellm tokenize), equal domain weights,
    and saves the converted int4 model like `mobilellm quantize`.

    Args:
        checkpoint: a full-precision checkpoint folder (the QAT start and, by default, its teacher), or smollm2-135m
        scheme: cpu or accelerator
        data: tokenized shard folder (its train split is used)
        out: output folder for the converted int4 model
        steps: optimizer steps
        batch_size: sequences per step
        seq_len: tokens per sequence
        lr: peak learning rate (cosine decay, 10% warmup, no weight decay)
        self_distillation: KL to the full-precision model; --no-self-distillation trains with plain CE
        run_dir: the loop's checkpoints and log (default: OUT.run)
    """
    from ..data import MixtureLoader, TokenDataset
    from ..quant.qat import qat as run_qat
    from ..train.loop import TrainConfig
    from ..train.optim import OptimConfig, Schedule

    config = QuantConfig.from_scheme(scheme)
    checkpoint = resolve_checkpoint(checkpoint)
    dataset = TokenDataset(data)
    batches = MixtureLoader(dataset, {d: 1.0 for d in dataset.domains}, seq_len=seq_len, global_batch_size=batch_size)
    train_config = TrainConfig(steps, Schedule(lr, steps, warmup_steps=max(1, steps // 10)),
                               OptimConfig(weight_decay=0.0))
    result = run_qat(load_pretrained(checkpoint), config, batches, train_config,
                     run_dir or Path(str(out) + ".run"), self_distillation=self_distillation)
    save_quantized(result.model, config, out, extra_files=tokenizer_files(checkpoint))
    print(f"QAT {scheme}: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} in {steps} steps; saved {out}")
