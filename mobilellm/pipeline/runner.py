"""Running a plan's stages in order, each into its own folder with a `stage.json`, skipping what is up to date.

    OUT/NAME.partial/   a stage at work: its runs checkpoint here, a killed run resumes here
    OUT/NAME/           the finished stage, renamed into place whole (`atomic.replace_folder`), with stage.json:
                        its key, settings, inputs (with content hashes), outputs (with content hashes), metrics,
                        tokens, wall time and the lineage of the checkpoints it made

A stage's key is the hash of its settings (its recipe), the content hashes of the outputs of the stages it reads
and of its inputs from outside the run (teacher, tokenizer). A finished stage whose key is unchanged is skipped;
a changed recipe changes that stage's key, then its outputs, hence the keys of the stages after it only. A
partial folder made under another key is discarded, one made under the same key is resumed (each training
run resumes from its latest checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ..artifacts import resolve_checkpoint
from ..atomic import replace_folder, write_json_atomic
from ..errors import UserError
from ..schema import Schema, read_json_object

FORMAT = "mobilellm-stage/1"
STAGE_FILE = "stage.json"
KEY_FILE = "key.json"  # in a partial folder: the key it was started under
SKIP_DIRS = ("tensorboard",)  # written with timestamps: never part of a content hash


class PipelineError(UserError):
    pass


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[["StageRun"], "StageResult"]
    needs: tuple[str, ...] = ()  # stages whose outputs it reads
    settings: dict = field(default_factory=dict)  # JSON: its recipe; hashed into the key
    external: dict[str, str] = field(default_factory=dict)  # inputs from outside the run: name -> path or fetchable name
    tokens: int | None = None  # the stage's token budget (training tokens)
    flops: float | None = None  # its training FLOPs (student forward+backward, teacher forward)
    trains: bool = False  # may run under torchrun (--nproc-per-node)


@dataclass
class StageResult:
    outputs: dict[str, str]  # name -> path relative to the stage folder; content-hashed (what later stages read)
    metrics: dict = field(default_factory=dict)
    tokens: int | None = None  # tokens processed
    files: dict[str, str] = field(default_factory=dict)  # more paths for the report (figures, runs); not hashed
    lineage: list[dict] = field(default_factory=list)  # {checkpoint, from: [...], how}


@dataclass(frozen=True)
class Record:
    """A finished stage, read back from its stage.json."""
    folder: Path
    data: dict

    def path(self, output: str) -> Path:
        if output not in self.data["outputs"]:
            raise PipelineError(f"{self.folder / STAGE_FILE} has no output {output!r}")
        return self.folder / self.data["outputs"][output]["path"]

    def file(self, name: str) -> Path | None:
        rel = self.data.get("files", {}).get(name)
        return self.folder / rel if rel else None

    def hashes(self) -> dict[str, str]:
        return {name: out["sha256"] for name, out in self.data["outputs"].items()}


@dataclass
class StageRun:
    """What a stage function gets: its work folder, where it will live once finished, the records it reads."""
    stage: Stage
    work: Path
    final: Path
    inputs: dict[str, Record]
    strategy: str | None = None  # ddp or fsdp under torchrun
    log: Callable[[str], None] = print

    def input(self, stage: str, output: str) -> Path:
        return self.inputs[stage].path(output)


STAGE_SCHEMA = Schema({"format": (str,), "stage": (str,), "key": (str,), "outputs": (dict,)},
                      ("format", "stage", "key", "outputs"), fix="remove that stage folder to run the stage again")

_hashes: dict[tuple, str] = {}


def content_hash(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, in sorted order)."""
    path = Path(path)
    if path.is_file():
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _hashes:
            digest = hashlib.sha256()
            with path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            _hashes[key] = digest.hexdigest()
        return _hashes[key]
    if not path.is_dir():
        raise PipelineError(f"{path} does not exist: nothing to hash")
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not set(p.relative_to(path).parts) & set(SKIP_DIRS)):
        digest.update(f"{file.relative_to(path)}\0{content_hash(file)}\n".encode())
    return digest.hexdigest()


def environment() -> dict:
    """Where a stage ran: machine, versions, the commit of this checkout (recorded in each stage.json)."""
    import torch

    from .. import __version__

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    return {"machine": f"{platform.node()} {platform.machine()}", "cpu": cpu_model(), "cores": os.cpu_count(),
            "torch threads": torch.get_num_threads(), "os": platform.platform(), "python": sys.version.split()[0],
            "torch": torch.__version__, "mobilellm": __version__, "commit": commit}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def read_record(folder: Path) -> Record | None:
    path = folder / STAGE_FILE
    if not path.exists():
        return None
    data = STAGE_SCHEMA.check(read_json_object(path, fix="remove that stage folder to run the stage again"), path)
    if data["format"] != FORMAT:
        raise PipelineError(f"{path} is not a stage record ({FORMAT}): remove that folder to run the stage again")
    return Record(folder, data)


def stage_key(stage: Stage, inputs: dict[str, Record], external: dict[str, dict]) -> str:
    material = {"stage": stage.name, "settings": stage.settings,
                "inputs": {name: record.hashes() for name, record in sorted(inputs.items())},
                "external": {name: e["sha256"] for name, e in sorted(external.items())}}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def external_inputs(stage: Stage) -> dict[str, dict]:
    resolved = {}
    for name, where in stage.external.items():
        path = resolve_checkpoint(where) if not Path(where).exists() else Path(where)
        resolved[name] = {"path": str(path), "sha256": content_hash(path)}
    return resolved


def up_to_date(record: Record | None, key: str) -> bool:
    return (record is not None and record.data["key"] == key
            and all((record.folder / out["path"]).exists() for out in record.data["outputs"].values()))


def select(stages: list[Stage], from_: str | None, until: str | None, only: str | None) -> tuple[int, int]:
    names = [s.name for s in stages]
    for flag, name in (("--from", from_), ("--until", until), ("--stage", only)):
        if name is not None and name not in names:
            raise PipelineError(f"{flag} {name}: no such stage; the stages: {', '.join(names)}")
    if only is not None:
        return names.index(only), names.index(only)
    first = names.index(from_) if from_ else 0
    last = names.index(until) if until else len(names) - 1
    if first > last:
        raise PipelineError(f"--from {from_} comes after --until {until}")
    return first, last


def run_pipeline(stages: list[Stage], out: str | Path, *, from_: str | None = None, until: str | None = None,
                 only: str | None = None, nproc_per_node: int = 1, relaunch: list[str] | None = None,
                 strategy: str | None = None, log: Callable[[str], None] = print) -> dict[str, Record]:
    """Run `stages` (in order) into OUT; returns every finished stage's record.

    Stages before `from_` must be up to date already; `from_` and those after it run again whatever their key;
    `until` stops after that stage; `only` runs one stage (as torchrun's processes do). `nproc_per_node` > 1
    runs each training stage as `torchrun --nproc-per-node N -m mobilellm.cli pipeline ... --stage NAME`, the
    `relaunch` arguments (the pipeline command's own) naming the plan.
    """
    first, last = select(stages, from_, until, only)
    env = environment()  # the code this process imported: its commit now, not when a stage ends
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records: dict[str, Record] = {}
    rank = int(os.environ.get("RANK", 0))
    for index, stage in enumerate(stages[:last + 1]):
        inputs = {}
        for need in stage.needs:
            if need not in records:
                raise PipelineError(f"stage {stage.name} needs stage {need}, which is not finished")
            inputs[need] = records[need]
        external = external_inputs(stage)
        key = stage_key(stage, inputs, external)
        final = out / stage.name
        record = read_record(final)
        forced = from_ is not None and index >= first
        if index < first:
            if not up_to_date(record, key):
                raise PipelineError(f"stage {stage.name} (before {stages[first].name}) is not finished or its inputs "
                                    f"changed: run from it (--from {stage.name}) or without --from")
            records[stage.name] = record
            continue
        if up_to_date(record, key) and not forced:
            log(f"[pipeline] {stage.name}: up to date, skipped ({record.data['seconds']:.0f} s when run)")
            records[stage.name] = record
            continue
        if nproc_per_node > 1 and stage.trains and only is None:
            launch(stage.name, nproc_per_node, relaunch or [], log)
            record = read_record(final)
            if not up_to_date(record, key):
                raise PipelineError(f"stage {stage.name} under torchrun did not finish with key {key[:12]}")
        else:
            record = run_stage(stage, out, inputs, external, key, fresh=forced, strategy=strategy, log=log,
                               publish=rank == 0, env=env)
            if record is None:  # a process other than the first under torchrun: the first one publishes
                return records
        records[stage.name] = record
    return records


def launch(name: str, nproc: int, args: list[str], log) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m",
               "mobilellm.cli",
               "pipeline", *args, "--stage", name, "--parallel", "ddp"]
    log(f"[pipeline] {name}: " + " ".join(command[2:]))
    done = subprocess.run(command)
    if done.returncode:
        raise PipelineError(f"stage {name} under torchrun exited with status {done.returncode}")


def run_stage(stage: Stage, out: Path, inputs: dict[str, Record], external: dict[str, dict], key: str, *,
              fresh: bool, strategy: str | None, log, publish: bool = True, env: dict | None = None) -> Record | None:
    final, work = out / stage.name, out / f"{stage.name}.partial"
    started = read_json_object(work / KEY_FILE, fix="remove that folder") if (work / KEY_FILE).exists() else None
    if publish and work.exists() and (fresh or started is None or started.get("key") != key):
        log(f"[pipeline] {stage.name}: discarding {work} (" + ("--from" if fresh else "made under other inputs") + ")")
        shutil.rmtree(work)
        started = None
    if publish:
        work.mkdir(parents=True, exist_ok=True)
        write_json_atomic(work / KEY_FILE, {"key": key})
    resumed = started is not None
    log(f"[pipeline] {stage.name}: " + ("resuming in" if resumed else "running in") + f" {work}")
    t0, begun = time.perf_counter(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    result = stage.run(StageRun(stage, work, final, inputs, strategy=strategy, log=log))
    if not publish:
        return None
    seconds = time.perf_counter() - t0
    data = {
        "format": FORMAT, "stage": stage.name, "key": key, "settings": stage.settings,
        "inputs": {**{name: {"stage": name, "outputs": record.hashes()} for name, record in inputs.items()},
                   **external},
        "outputs": {name: {"path": rel, "sha256": content_hash(work / rel)} for name, rel in result.outputs.items()},
        "files": result.files, "metrics": result.metrics, "tokens": result.tokens, "budget_tokens": stage.tokens,
        "seconds": seconds, "resumed": resumed, "started": begun,
        "processes": int(os.environ.get("WORLD_SIZE", 1)), "environment": env or environment(),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "lineage": result.lineage,
    }
    write_json_atomic(work / STAGE_FILE, data)
    (work / KEY_FILE).unlink()
    replace_folder(work, final)
    log(f"[pipeline] {stage.name}: done in {seconds:.0f} s -> {final}")
    return Record(final, data)
