"""`mobilellm quantize` (PTQ) and `mobilellm qat` (QAT with self-distillation through the train loop)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..loading import load
from ..quant import QuantConfig, convert, quantize_
from ..quant.checkpoint import save_quantized
from ..tokenizer import tokenizer_files


def quantize(checkpoint: str, *, scheme: str, out: Path) -> None:
    """Post-training int4 quantization (round-to-nearest) of a checkpoint folder.

    Writes packed int4 safetensors with the model and quantization configs beside them; load them with
    mobilellm.quant.checkpoint.load_quantized.

    Args:
        checkpoint: a full-precision checkpoint folder, a .gguf file, or smollm2-135m
        scheme: cpu (int4 group-32 + int8 dynamic activations + int8 KV) or accelerator (int4 per channel)
        out: output folder (written atomically)
    """
    config = QuantConfig.from_scheme(scheme)
    loaded = load(checkpoint)
    if loaded.quant is not None:
        raise ValueError(f"{loaded.source} is already quantized ({loaded.quant.scheme} scheme): quantize a "
                         "full-precision checkpoint")
    model = quantize_(loaded.model.eval(), config)
    save_quantized(model, config, out, extra_files=loaded.tokenizer_files)
    size = sum(f.stat().st_size for f in Path(out).iterdir())
    print(f"{loaded.source} -> {out}: {scheme} scheme, {size / 1e6:.1f} MB")


def qat(checkpoint: str, *, scheme: str, data: Path, out: Path, steps: int = 100, batch_size: int = 4,
        seq_len: int = 256, lr: float = 2e-5, self_distillation: bool = True, run_dir: Path | None = None,
        resume: bool = False, eval_every: int = 0, save_every: int = 0, parallel: str | None = None,
        micro_batch: int | None = None) -> None:
    """Quantization-aware training: prepare -> train (KL to the frozen full-precision model) -> convert.

    The `qat` recipe (recipes/qat.py) run through the one training loop on tokenized shards (mobilellm
    tokenize), every domain equally; saves the converted int4 model like `mobilellm quantize`. On 2 CPU cores
    the default 100 steps of SmolLM2-135M take about 20 minutes. Under torchrun, pass --parallel ddp or fsdp.

    Args:
        checkpoint: a full-precision checkpoint folder (the QAT start and, by default, its teacher), or smollm2-135m
        scheme: cpu or accelerator
        data: tokenized shard folder (its train split is used; its val split with --eval-every)
        out: output folder for the converted int4 model
        steps: optimizer steps
        batch_size: sequences per optimizer step (all processes together)
        seq_len: tokens per sequence
        lr: peak learning rate (cosine decay, 10% warmup, no weight decay)
        self_distillation: KL to the full-precision model; --no-self-distillation trains with plain CE
        run_dir: the loop's checkpoints and log (default: OUT.run)
        resume: continue the run in RUN_DIR from its latest checkpoint
        eval_every: validation loss every N steps (0: never)
        save_every: a resumable checkpoint every N steps (0: only at the end)
        parallel: ddp or fsdp, when launched with torchrun on several processes
        micro_batch: rows per forward pass on one process (default: all of the process's rows)
    """
    from recipes.qat import qat as qat_recipe

    from ..quant.qat import run_qat_recipe
    from ..train.distributed import init_parallel

    recipe = qat_recipe(str(checkpoint), str(data), scheme=scheme, steps=steps, batch_rows=batch_size,
                        seq_len=seq_len, lr=lr, self_distillation=self_distillation, save_every=save_every,
                        eval_every=eval_every)
    processes = init_parallel(parallel)
    result = run_qat_recipe(recipe, run_dir or Path(str(out) + ".run"), out, resume=resume, parallel=processes,
                            micro_batch=micro_batch)
    if not processes.is_main:
        return
    losses = [loss for loss in result.losses if loss == loss]
    summary = f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} steps" if losses else "no new steps"
    print(f"QAT {scheme}: {summary}; saved {out}")
