"""Peak memory of merging 1B-sized checkpoints: our streamed merge against mergekit on the same files.

Three random pro-1b checkpoints (1.08B parameters each, bf16, 512 MB shards) are written once, tensor by tensor;
each merge then runs in a fresh process whose peak resident memory (VmHWM) is read at its end. Ours streams
one tensor per input (`mobilellm.merge.merge_checkpoints`); mergekit (`mergekit-yaml`, run from a venv that
has it: `--mergekit-python`) with its default options. The peak is compared with the largest tensor (the
202,048 x 1280 embedding, 517 MB in bf16) and with one model (2.2 GB).

    python benchmarks/merge_memory.py [--mergekit-python /path/to/venv/bin/python] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mobilellm.config import ModelConfig  # noqa: E402
from mobilellm.hf import ShardWriter  # noqa: E402
from mobilellm.model import Transformer  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info, write_json  # noqa: E402

SHARD = 512 * 2**20
OURS = """
import sys
from mobilellm.merge import MergeMethod, merge_checkpoints
out, *models = sys.argv[1:]
merge_checkpoints(models, [1 / len(models)] * len(models), MergeMethod("linear"), out, max_shard_bytes=%d, progress=False)
""" % SHARD
PEAK = "; print('PEAK_KB', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"


def random_checkpoint(config: ModelConfig, folder: Path, seed: int) -> None:
    if (folder / "config.json").exists():
        return
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Transformer(config).state_dict().items()}
    with ShardWriter(folder, config, max_shard_bytes=SHARD) as writer:
        for name, shape in shapes.items():
            writer.add(name, (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16))


def peak_of(cmd: list[str], env_path: str) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of a command that prints PEAK_KB at its end."""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    kb = next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("PEAK_KB"))
    return int(kb.strip("'[]")) / 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mergekit-python", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "merge-memory")
    args = parser.parse_args()
    config = ModelConfig.from_name("pro-1b")
    inputs = [args.work / f"model{i}" for i in range(3)]
    for i, folder in enumerate(inputs):
        random_checkpoint(config, folder, seed=i)
    root = str(Path(__file__).resolve().parents[1])
    largest = config.vocab_size * config.dim  # the (tied) embedding
    result = {"command": "python benchmarks/merge_memory.py " + " ".join(sys.argv[1:]),
              "machine": machine_info(), "model": "pro-1b, random, bf16", "inputs": len(inputs),
              "parameters": sum(p.numel() for p in _meta_params(config)),
              "largest_tensor_mb": largest * 2 / 2**20,
              "model_mb": sum(f.stat().st_size for f in inputs[0].glob("*.safetensors")) / 2**20}
    script = OURS + PEAK.removeprefix("; ")
    peak, seconds = peak_of([sys.executable, "-c", script, str(args.work / "ours"), *map(str, inputs)], root)
    result["ours"] = {"peak_rss_mb": peak, "seconds": seconds}
    if args.mergekit_python:
        yml = args.work / "merge.yml"
        yml.write_text("merge_method: linear\ndtype: bfloat16\nmodels:\n" + "".join(
            f"  - model: {f}\n    parameters: {{weight: 1.0}}\n" for f in inputs))
        runner = (f"import sys\nfrom mergekit.scripts.run_yaml import main\n"
                  f"sys.argv = ['mergekit-yaml', {str(yml)!r}, {str(args.work / 'theirs')!r}]\n"
                  "try:\n    main()\nexcept SystemExit:\n    pass\n" + PEAK.removeprefix("; "))
        peak, seconds = peak_of([str(args.mergekit_python), "-c", runner], "")
        result["mergekit"] = {"peak_rss_mb": peak, "seconds": seconds, "version": "0.1.5", "options": "defaults"}
        result["peak_ratio_ours_over_mergekit"] = result["ours"]["peak_rss_mb"] / peak
    print(json.dumps(result, indent=1))
    write_json(Path(__file__).parent / "results" / "merge_memory.json", result)


def _meta_params(config: ModelConfig):
    with torch.device("meta"):
        return list(Transformer(config).parameters())


if __name__ == "__main__":
    main()
