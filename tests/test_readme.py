"""The README stays true: its shell blocks run in order as a new user runs them, and its Python snippets run too.

Every ```bash / ```sh block is cut into commands (a trailing backslash continues a line, `&&` chains are cut into
their parts, comments are dropped) and run by bash in one fresh working folder, with MOBILELLM_HOME a fresh cache
that links the models and BIG-bench tasks already downloaded (read, never written: new ones land in the fresh
cache) and a user site of its own for the lm-eval hook; every output stays in tmp. A `# -> TEXT` line says what
the command above it prints: the test checks it. Each command runs as written, except those in the two tables below:
SCALED appends flags (argparse keeps the last value of a repeated flag) so a long command runs in seconds, SKIPPED
says why a command cannot run here. The Python blocks run in their README order, `steps=N` scaled to 2.

The whole run takes long (tens of minutes on 2 cores): it is marked slow. The default
suite keeps the cheap half: every `mobilellm` command line of the README parses with today's flags.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from mobilellm.artifacts import cache_root
from mobilellm.cli import _ParseError, build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# (command pattern, flags appended, why). A command matching several patterns gets every one's flags.
SCALED = [
    (r"^mobilellm pipeline$", "--until mix", "the whole starter run is ~20 minutes: its timed run from a fresh clone is "
     "committed (benchmarks/results/pipeline_starter), and tests/test_pipeline.py runs every stage on tiny configs"),
    (r"^mobilellm corpus\b", "--max-chars 800000", "8M characters a domain take minutes to build and tokenize"),
    (r"^mobilellm tokenize\b", "--val-fraction 0.2", "the scaled corpus has a few dozen documents a domain: 1% "
     "held out leaves none in some"),
    (r"^mobilellm mix\b", "--steps 4 --probe-rows 2 --target-rows 2",
     "the proxy's steps (a multiple of its 4 checkpoints) and the rows of its gradients"),
    (r"\bpretrain\b", "--steps 2", "100 KD steps are minutes"),
    (r"^mobilellm extend-context\b", "--steps 2", "100 steps at 1,024 tokens"),
    (r"^mobilellm position-loss\b", "--limit 2", "every held-out document at 2,048 positions"),
    (r"^mobilellm (needle|retrieval)\b", "--lengths 256 --trials 1", "a grid of long prompts"),
    (r"^mobilellm specialize\b", "--steps 1", "500 steps of SmolLM2-135M per specialist"),
    (r"^mobilellm merge-search\b", "--step 0.5 --val-batches 1", "66 grid points of 3 SmolLM2 merges"),
    (r"^mobilellm qat\b", "--steps 1", "100 QAT steps of SmolLM2-135M are about 20 minutes"),
    (r"^mobilellm sft-data\b", "--max-per-task 4", "every BIG-bench task's examples"),
    (r"^mobilellm (sft|dpo)(?=\s)", "--steps 2", "200 / 100 steps of SmolLM2-135M"),
    (r"^mobilellm eval (?!.*--list-tasks)", "--limit 4", "every item of each task"),
    (r"^mobilellm chat\b.*--compile", "--no-compile", "the first compile takes minutes (tests/test_infer_* cover it)"),
    (r"^lm_eval\b", "--limit 4", "every item of the task"),
    (r"^mobilellm lm-eval-hook\b", "--site-dir {user_site}", "the hook goes into the test's own user site"),
    (r"^mobilellm serve\b", "--port {port}", "a free port (it is then asked for /health and stopped)"),
]
SKIPPED = [
    (r"^pip install\b", "installs this checkout: the test runs in the environment that made"),
    (r"^python -m pytest\b", "the test suite itself"),
    (r"--recipe pro-1b(?!.*--dry-run)", "MobileLLM-Pro's full scale: the user's 1B checkpoint and long-context "
                                        "teacher, GPU-days"),
]
BACKGROUND = r"^mobilellm serve\b"  # runs until stopped: started, asked for /health, stopped
STDIN = "What is the capital of France?\n"  # what an interactive command (chat) reads before end of input
EXPECT = "# -> "


@dataclass
class Block:
    lang: str
    text: str
    line: int  # in README.md


def readme_blocks(text: str) -> list[Block]:
    blocks, pattern = [], re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
    for m in pattern.finditer(text):
        if m.group(1) in ("bash", "sh", "python"):
            blocks.append(Block(m.group(1), m.group(2), text[:m.start()].count("\n") + 1))
    return blocks


def shell_commands(block: str) -> list[tuple[str, str | None]]:
    """(command, the text a `# -> ` line after it expects, or None), `&&` chains cut into their parts."""
    out: list[tuple[str, str | None]] = []
    for line in re.sub(r"\\\n\s*", " ", block).splitlines():
        stripped = line.strip()
        if stripped.startswith(EXPECT):
            command, _ = out[-1]
            out[-1] = (command, stripped[len(EXPECT):])
            continue
        command = re.sub(r"\s+#.*$", "", stripped) if not stripped.startswith("#") else ""
        out += [(part.strip(), None) for part in command.split(" && ") if part.strip()]
    return out


def skip_reason(command: str) -> str | None:
    return next((why for pattern, why in SKIPPED if re.search(pattern, command)), None)


def scaled(command: str, **values) -> str:
    extra = [flags.format(**values) for pattern, flags, _ in SCALED if re.search(pattern, command)]
    return " ".join([command, *extra])


def mobilellm_argv(command: str) -> list[str] | None:
    words = shlex.split(command)
    if words[:1] == ["mobilellm"]:
        return words[1:]
    if words[:1] == ["torchrun"] and "mobilellm.cli" in words:
        return words[words.index("mobilellm.cli") + 1:]
    return None


BLOCKS = readme_blocks(README.read_text())


def test_the_readme_has_shell_blocks_and_a_python_snippet():
    assert sum(b.lang != "python" for b in BLOCKS) >= 3 and any(b.lang == "python" for b in BLOCKS)


def test_every_mobilellm_command_of_the_readme_parses_as_written_and_as_scaled():
    parser, _ = build_parser()
    commands = [c for b in BLOCKS if b.lang != "python" for c, _ in shell_commands(b.text)]
    written = [c for c in commands if skip_reason(c) is None]
    as_run = [scaled(c, user_site="/tmp/site", port=8000) for c in written]  # the scaled flags must parse too
    argvs = [(c, argv) for c in written + as_run if (argv := mobilellm_argv(c)) is not None]
    assert len(argvs) > 60
    for command, argv in argvs:
        try:
            parser.parse_args(argv)
        except _ParseError as err:
            pytest.fail(f"README: {command}\n{err}")


# ---- the README run, in order (slow) ---------------------------------------------------------------------------

def link_children(real: Path, fresh: Path) -> None:
    """fresh/NAME -> real/NAME for what real holds: reused as it is, while anything new lands in fresh."""
    fresh.mkdir(parents=True, exist_ok=True)
    for child in sorted(real.iterdir()) if real.is_dir() else ():
        if not child.name.startswith("."):
            (fresh / child.name).symlink_to(child)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("readme")
    home, real = tmp / "home", cache_root()
    link_children(real / "models", home / "models")
    link_children(real / "data" / "bigbench", home / "data" / "bigbench")
    user_base = tmp / "userbase"
    user_site = subprocess.run([sys.executable, "-c", "import site; print(site.getusersitepackages())"],
                               env={**os.environ, "PYTHONUSERBASE": str(user_base)}, capture_output=True,
                               text=True, check=True).stdout.strip()
    env = {**os.environ, "MOBILELLM_HOME": str(home), "PYTHONUSERBASE": str(user_base), "MPLBACKEND": "Agg",
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp / "hf-datasets"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    (tmp / "work").mkdir()
    return {"cwd": tmp / "work", "env": env, "user_site": user_site}


def run_background(command: str, cwd: Path, env: dict, port: int) -> str | None:
    """Start a server, wait for its /health, stop it: None, or why it failed."""
    proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + (900 if "--compile" in command else 300)  # the first compile: minutes
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    return None if response.status == 200 else f"answered /health with {response.status}"
            except OSError:
                time.sleep(2)
        if proc.poll() is not None:
            return f"exited {proc.returncode} before answering /health:\n{proc.communicate(timeout=30)[0][-3000:]}"
        return "never answered /health in 300 s"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)


def run_shell_block(block: Block, workdir: dict) -> tuple[list[str], list[str]]:
    """Every command of the block, on past a failure (later failures may follow from it): (failures, skipped)."""
    failures, skipped = [], []
    for command, expected in shell_commands(block.text):
        if (why := skip_reason(command)) is not None:
            skipped.append(f"{command}: {why}")
            continue
        port = free_port()
        line = scaled(command, user_site=workdir["user_site"], port=port)
        started = time.monotonic()
        if re.search(BACKGROUND, command):
            failure = run_background(line, workdir["cwd"], workdir["env"], port)
        else:
            done = subprocess.run(["bash", "-c", line], cwd=workdir["cwd"], env=workdir["env"], input=STDIN,
                                  capture_output=True, text=True, timeout=3600)
            failure = (f"exited {done.returncode}:\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}" if done.returncode
                       else f"does not print {expected!r}; it printed:\n{done.stdout[-1500:]}"
                       if expected is not None and expected not in done.stdout else None)
        print(f"{time.monotonic() - started:7.1f} s  {'FAILED' if failure else 'ok':6}  {line}", flush=True)
        if failure:
            failures.append(f"README block at line {block.line}: `{line}` {failure}")
    return failures, skipped


def run_python_block(block: Block, workdir: dict) -> None:
    code = re.sub(r"\bsteps=\d+", "steps=2", block.text)
    done = subprocess.run([sys.executable, "-c", code], cwd=workdir["cwd"], env=workdir["env"], capture_output=True,
                          text=True, timeout=3600)
    assert done.returncode == 0, f"README line {block.line}: the Python block failed:\n{done.stderr[-4000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)),
                         ids=[f"line{b.line}-{b.lang}-{b.text.split()[0] if b.text.split() else ''}" for b in BLOCKS])
def test_readme_block_runs_as_written(index, workdir):
    block = BLOCKS[index]
    if block.lang == "python":
        run_python_block(block, workdir)
    else:
        failures, skipped = run_shell_block(block, workdir)
        for line in skipped:
            print(f"skipped: {line}")
        assert not failures, "\n\n".join(failures)
