"""Tokenizing as tasks of datatrove, the data engine behind FineWeb: its local executor and Slurm arrays.

The tasks run the one tokenization path (mobilellm.data.sharding): task `rank` of `world_size` takes the
pieces `plan[rank::world_size]` of the same plan every process computes from the inputs, writes their shards
and piece records to the shared output folder, and a final single task writes the manifest once all pieces
are finished. The shards are the same as a local run's, whatever the number of tasks.

Why datatrove rather than Ray Data: its executors are made for exactly this shape of job (N independent
tasks, each taking a deterministic slice by rank, then a dependent step), they run on Slurm, the scheduler
LLM data is prepared on, by writing a plain sbatch array script with no cluster service to keep up, and it
installs beside torch 2.13 with two small new packages (humanize, loguru); Ray needs its own cluster
runtime (a head node, `ray start` on every node) and a large wheel.

datatrove's own Slurm launcher pickles the executor and submits it at once; here the sbatch scripts are
written by datatrove's SlurmPipelineExecutor with our command line as the task (nothing is unpickled, and
the scripts can be read before they are submitted): `mobilellm tokenize-slurm` writes them.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from ..atomic import write_json_atomic, write_text_atomic
from ..errors import UserError
from ..tokenizer import Tokenizer
from .sharding import TASKS, TokenizeRun, tokenize_pieces, write_manifest

try:
    from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
    from datatrove.pipeline.base import PipelineStep
except ImportError as err:  # the optional extra
    raise UserError("the datatrove engine needs datatrove: pip install 'mobilellm[cluster]'") from err

MAX_ARRAY = 1001  # datatrove's default limit of tasks in one Slurm array


class TokenizeSlice(PipelineStep):
    """A datatrove step: this task's slice of the plan, tokenized with `workers` processes."""
    name = "mobilellm tokenize"
    type = "Tokenizer"

    def __init__(self, job: TokenizeRun, tokenizer: Tokenizer, workers: int = 1):
        super().__init__()
        self.job, self.tokenizer, self.workers = job, tokenizer, workers

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        pieces = self.job.pieces[rank::world_size]
        tokenize_pieces(self.job, pieces, self.tokenizer, workers=self.workers, board_key=f"task-{rank:05d}")
        self.stat_update("pieces", value=len(pieces))
        yield from ()


class WriteManifest(PipelineStep):
    """The final datatrove step (one task, after every tokenize task): the manifest."""
    name = "mobilellm manifest"
    type = "Writer"

    def __init__(self, job: TokenizeRun):
        super().__init__()
        self.job = job

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        write_manifest(self.job)
        yield from ()


def _logging_dir(job: TokenizeRun, name: str) -> str:
    return str(job.out / TASKS / "datatrove" / name)


def run_local(job: TokenizeRun, tokenizer: Tokenizer, *, tasks: int, workers: int) -> None:
    """`tasks` slices run `workers` at a time by datatrove's LocalPipelineExecutor, then the manifest step."""
    tokenize = LocalPipelineExecutor([TokenizeSlice(job, tokenizer)], tasks=tasks, workers=workers,
                                     logging_dir=_logging_dir(job, "tokenize"), skip_completed=False,
                                     start_method="fork")
    manifest = LocalPipelineExecutor([WriteManifest(job)], tasks=1, logging_dir=_logging_dir(job, "manifest"),
                                     depends=tokenize, skip_completed=False, start_method="fork")
    manifest.run()  # runs its dependency first


def _slurm_executor(job: TokenizeRun, tokenizer: Tokenizer, *, tasks: int, cpus_per_task: int, partition: str = "",
                    time: str = "", mem_per_cpu_gb: int = 2, qos: str | None = None,
                    env_command: str | None = None) -> SlurmPipelineExecutor:
    return SlurmPipelineExecutor([TokenizeSlice(job, tokenizer, cpus_per_task)], tasks=tasks, time=time,
                                 partition=partition, cpus_per_task=cpus_per_task, mem_per_cpu_gb=mem_per_cpu_gb,
                                 job_name="mobilellm-tokenize", qos=qos, env_command=env_command,
                                 logging_dir=_logging_dir(job, "slurm"), skip_completed=False,
                                 slurm_logs_folder=str(job.out / TASKS / "slurm" / "logs"),
                                 max_array_size=MAX_ARRAY)


def run_slurm_task(job: TokenizeRun, tokenizer: Tokenizer, *, tasks: int, cpus_per_task: int) -> None:
    """Inside one task of the array job `write_slurm` wrote: datatrove picks the rank from Slurm's variables."""
    if "SLURM_ARRAY_TASK_ID" not in os.environ:
        raise UserError("--engine slurm runs one task of the Slurm array job that `mobilellm tokenize-slurm` "
                        "writes; submit that job (its submit.sh) instead of running this by hand")
    _slurm_executor(job, tokenizer, tasks=tasks, cpus_per_task=cpus_per_task).run()


def write_slurm(job: TokenizeRun, tokenizer: Tokenizer, command: list[str], *, tasks: int, partition: str, time: str,
                cpus_per_task: int, mem_per_cpu_gb: int, qos: str | None, env_command: str | None) -> Path:
    """The sbatch scripts of a cluster run: an array of `tasks` tokenize tasks (each running `command`
    with its rank from Slurm), the manifest job after them, and submit.sh that submits both in order."""
    folder = job.out / TASKS / "slurm"
    executor = _slurm_executor(job, tokenizer, tasks=tasks, cpus_per_task=cpus_per_task, partition=partition,
                               time=time, mem_per_cpu_gb=mem_per_cpu_gb, qos=qos, env_command=env_command)
    line = " ".join(shlex.quote(part) for part in command)
    array = min(tasks, MAX_ARRAY)
    task_script = executor.get_launch_file_contents(
        executor.get_sbatch_args(array),
        f"srun -l -n 1 {line} --engine slurm --tasks {tasks} --workers {cpus_per_task} --no-progress")
    manifest_args = {k: v for k, v in executor.get_sbatch_args(1).items() if k != "array"}
    manifest_args.update({"job-name": "mobilellm-tokenize-manifest", "cpus-per-task": 1,
                          "output": str(folder / "logs" / "manifest-%j.out"),
                          "error": str(folder / "logs" / "manifest-%j.out")})
    manifest_script = executor.get_launch_file_contents(manifest_args, f"{line} --manifest-only --no-progress")
    # What datatrove's launcher writes before submitting: the ranks the array's task ids index.
    write_json_atomic(Path(_logging_dir(job, "slurm")) / "ranks_to_run.json", list(range(tasks)), indent=None)
    write_text_atomic(folder / "tokenize.slurm", task_script)
    write_text_atomic(folder / "manifest.slurm", manifest_script)
    offsets = range((tasks + MAX_ARRAY - 1) // MAX_ARRAY)
    submit = ["#!/bin/bash", "# Submits the tokenize array (in arrays of at most "
              f"{MAX_ARRAY} tasks) and the manifest job that waits for all of them.", "set -e",
              f"cd {shlex.quote(str(folder))}", "ids="]
    submit += [f"ids=$ids:$(sbatch --parsable --export=ALL,RUN_OFFSET={k} tokenize.slurm)" for k in offsets]
    submit += ["sbatch --dependency=afterok$ids manifest.slurm", 'echo "submitted tokenize job(s)${ids//:/ } and the manifest job"']
    write_text_atomic(folder / "submit.sh", "\n".join(submit) + "\n")
    (folder / "submit.sh").chmod(0o755)
    return folder
