"""`mobilellm tokenize`: documents -> memory-mapped token shards with a validation split, on every core, as
tasks of datatrove's executors, or as a Slurm array (`mobilellm tokenize-slurm`)."""

from __future__ import annotations

from pathlib import Path

from ..data.sharding import (available_cores, plan_run, read_manifest, start_run, summary_line, tokenize_to_shards,
                             write_manifest)
from ..data.progress import ProgressBar
from ..data.sources import DEFAULT_PATTERNS, Source, default_domain
from ..errors import UserError
from ..tokenizer import Tokenizer

ENGINES = ("local", "datatrove", "slurm")


def parse_inputs(inputs: list[str], kind: str | None, text_field: str, patterns: list[str]) -> dict[str, list[Source]]:
    """`domain=path` or `path` (domain: the file's stem or the folder's name) -> {domain: sources}."""
    domains: dict[str, list[Source]] = {}
    for item in inputs:
        name, sep, path = item.partition("=")
        path = Path(path if sep else item)
        name = name if sep else default_domain(path)
        domains.setdefault(name, []).append(Source(path, kind, text_field, tuple(patterns)))
    return domains


def tokenize(inputs: list[str], *, tokenizer: Path, out: Path, val_fraction: float = 0.01,
             shard_chars: int = 16_000_000, text_field: str = "text", kind: str | None = None,
             patterns: list[str] = list(DEFAULT_PATTERNS), workers: int = 0, engine: str = "local", tasks: int = 0,
             manifest_only: bool = False, progress: bool = True) -> None:
    """Tokenize documents into token shards (one domain per input) for training and validation.

    Each input is DOMAIN=PATH or PATH (domain: the folder's name, or the file's name less its format suffix); several inputs may
    share a domain. PATH is a .jsonl / .jsonl.gz / .jsonl.zst or .parquet file, a folder of such files or of
    text files (see --patterns), or a folder saved by `datasets.save_to_disk`. Sources are streamed: memory
    stays flat in the size of the corpus. The shards are the same whatever the number of workers or tasks.
    Re-running resumes after the last finished shard; new domains are added to an existing --out folder
    made with the same tokenizer.

    Args:
        inputs: DOMAIN=PATH or PATH, one or more
        tokenizer: folder with tokenizer.json (and tokenizer_config.json naming the EOS token)
        out: output folder for the shards and manifest.json
        val_fraction: share of documents held out for validation (chosen by a hash of each text)
        shard_chars: characters of input per shard
        text_field: JSON field / Parquet or dataset column holding the text
        kind: read every file as this kind (text, jsonl, parquet, hf) instead of guessing from its suffix
        patterns: glob patterns for the files of a folder, e.g. '**/*.jsonl.gz'
        workers: worker processes (0: every core); with --engine datatrove, tasks run at once
        engine: local (a pool of workers), datatrove (datatrove's local executor running --tasks slices), or
            slurm (one task of the array job that `mobilellm tokenize-slurm` writes)
        tasks: slices of the inputs for --engine datatrove / slurm (0: as many as workers)
        manifest_only: only the final step: write the manifest once every task has finished
        progress: show the progress bar
    """
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
    domains = parse_inputs(inputs, kind, text_field, patterns)
    tok = Tokenizer.load(tokenizer)
    workers = available_cores() if workers == 0 else workers
    log = print if progress else (lambda line: None)
    if engine == "local" and not manifest_only:
        manifest = tokenize_to_shards(domains, tok, out, val_fraction=val_fraction, shard_chars=shard_chars,
                                      workers=workers, progress=progress)
    else:
        run = plan_run(domains, tok, out, val_fraction=val_fraction, shard_chars=shard_chars, log=log)
        if not run.domains:
            manifest = read_manifest(out)
        elif manifest_only:
            manifest = write_manifest(run)
        elif engine == "datatrove":
            from ..data import cluster

            start_run(run)
            with ProgressBar(run.progress_dir, run.total_bytes, desc=f"tokenize ({workers} datatrove workers)",
                             enabled=progress):
                cluster.run_local(run, tok, tasks=tasks or workers, workers=workers)
            manifest = read_manifest(out)
        else:
            from ..data import cluster

            cluster.run_slurm_task(run, tok, tasks=tasks or 1, cpus_per_task=workers)
            return
    for name in domains:
        print(summary_line(name, manifest["domains"][name], manifest["dtype"]))
    print(f"shards: {out}")


def tokenize_slurm(inputs: list[str], *, tokenizer: Path, out: Path, tasks: int, partition: str,
                   time: str = "24:00:00", cpus_per_task: int = 8, mem_per_cpu_gb: int = 2, qos: str | None = None,
                   env_command: str | None = None, val_fraction: float = 0.01, shard_chars: int = 16_000_000,
                   text_field: str = "text", kind: str | None = None,
                   patterns: list[str] = list(DEFAULT_PATTERNS)) -> None:
    """Write the Slurm job of a cluster tokenize run (datatrove's sbatch scripts), to read and submit.

    The inputs, tokenizer and --out must be on a filesystem every node sees. The array's task k runs
    `mobilellm tokenize ... --engine slurm --tasks TASKS` and tokenizes the k-th slice of the inputs (whole
    files: give a domain many files to use many tasks) with --cpus-per-task workers; a last job writes the
    manifest once all tasks succeeded. Submit with OUT/tasks/slurm/submit.sh; a failed or killed task is
    resumed by submitting again. The shards are the same as a local `mobilellm tokenize` writes.

    Args:
        inputs: DOMAIN=PATH or PATH, one or more (as for `mobilellm tokenize`)
        tokenizer: folder with tokenizer.json
        out: output folder for the shards and manifest.json (shared by all nodes)
        tasks: Slurm array tasks, each a slice of the inputs
        partition: Slurm partition
        time: time limit of each task
        cpus_per_task: cores of each task (its worker processes)
        mem_per_cpu_gb: memory per core
        qos: Slurm quality of service, if the cluster wants one
        env_command: shell line that sets up the environment on a node, e.g. 'source ~/venv/bin/activate'
        val_fraction: share of documents held out for validation
        shard_chars: characters of input per shard
        text_field: JSON field / Parquet or dataset column holding the text
        kind: read every file as this kind (text, jsonl, parquet, hf)
        patterns: glob patterns for the files of a folder, e.g. '**/*.jsonl.gz'
    """
    from ..data import cluster

    if tasks < 1:
        raise UserError("--tasks must be at least 1")
    domains = parse_inputs(inputs, kind, text_field, patterns)
    tok = Tokenizer.load(tokenizer)
    run = plan_run(domains, tok, out, val_fraction=val_fraction, shard_chars=shard_chars)
    if not run.domains:
        print(f"nothing to do: every domain is already in {out}")
        return
    start_run(run)
    resolved = {name: [str(Path(s.path).resolve()) for s in sources] for name, sources in domains.items()}
    command = ["mobilellm", "tokenize", *(f"{name}={path}" for name, paths in resolved.items() for path in paths),
               "--tokenizer", str(Path(tokenizer).resolve()), "--out", str(Path(out).resolve()),
               "--val-fraction", str(val_fraction), "--shard-chars", str(shard_chars), "--text-field", text_field,
               "--patterns", *patterns, *(["--kind", kind] if kind else [])]
    folder = cluster.write_slurm(run, tok, command, tasks=tasks, partition=partition, time=time,
                                 cpus_per_task=cpus_per_task, mem_per_cpu_gb=mem_per_cpu_gb, qos=qos,
                                 env_command=env_command)
    pieces = len(run.pieces)
    print(f"{pieces:,} pieces ({run.total_bytes / 2**30:,.2f} GiB) over {tasks} tasks"
          + (f"; only {pieces} can work at once (one piece is one file)" if pieces < tasks else ""))
    print(f"wrote {folder}/tokenize.slurm and manifest.slurm; submit with: bash {folder}/submit.sh")
