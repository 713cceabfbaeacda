"""Run untrusted model-written Python in Linux namespaces: its own PID, mount, network, IPC and UTS.

`run_program(source)` starts a trusted helper (`_sandbox_init.py`, run by the same interpreter) that
unshares a new PID namespace and forks the program's process as its PID 1. That process, before it
execs `python -I -c source`:
- enters new mount, network, IPC and UTS namespaces (and a user namespace when the caller is not root);
- builds a new root on a tmpfs: the Python install and /usr bound read-only, a fresh /proc of its own
  PID namespace, /dev/null, zero, random, urandom, and one private writable folder, /tmp (its cwd);
  `pivot_root` into it, so nothing else of the machine's file system can be named, read or written;
- caps memory, CPU time, file size, open files and processes (`setrlimit`), sets no-new-privileges,
  and drops to the unprivileged `nobody` uid/gid when run as root (RLIMIT_NPROC binds only a
  non-root uid); in a user namespace it drops every capability instead;
- has no network interface but a down loopback: nothing, not even the host's 127.0.0.1, is reachable.
When the program (PID 1) exits or is killed at the timeout, the kernel kills every process left in
its PID namespace, whatever session it started, before the helper reports: nothing outlives it.

Where namespaces cannot be made (no unshare(2) for this user, not Linux), `run_program` raises
`SandboxUnavailable` instead of running the code unconfined. Running unconfined must be asked for:
`allow_unsandboxed=True`, or the environment variable MOBILELLM_UNSAFE_NO_SANDBOX=1 (then only the
rlimits and a killed process group remain, and the program runs as the calling user).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserError

UNSAFE_ENV = "MOBILELLM_UNSAFE_NO_SANDBOX"
HELPER = Path(__file__).with_name("_sandbox_init.py")

# Prepended to every program: a readable error for the usual network calls. The network namespace is
# what contains the program (raw `_socket` reaches nothing); this only names the reason.
GUARD = """\
import socket as _socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the sandbox")
_socket.socket = _socket.create_connection = _socket.getaddrinfo = _no_network
del _socket, _no_network
"""


class SandboxUnavailable(UserError):
    """No isolation could be set up on this machine: the code was not run."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    memory_bytes: int = 1 << 30  # address space per process
    file_bytes: int = 16 << 20
    processes: int = 16  # processes and threads of the sandbox's uid, the program included
    open_files: int = 64


@dataclass(frozen=True)
class Outcome:
    passed: bool
    status: str  # "passed", "failed", "timeout"
    detail: str  # the end of stderr, for failures


def unsandboxed_allowed(allow_unsandboxed: bool = False) -> bool:
    return allow_unsandboxed or os.environ.get(UNSAFE_ENV, "") == "1"


def run_program(source: str, limits: Limits = Limits(), *, allow_unsandboxed: bool = False) -> Outcome:
    """Execute source in the sandbox; passed when it exits with status 0 within the time limit."""
    with tempfile.TemporaryDirectory(prefix="mobilellm-sandbox-") as base:
        base = Path(base)
        (base / "program.py").write_text(GUARD + source, encoding="utf-8")
        (base / "work").mkdir()
        (base / "root").mkdir()
        with open(base / "stderr", "w+b") as stderr:
            status = _run_isolated(base, limits, stderr)
            if status.get("status") == "unavailable":
                if not unsandboxed_allowed(allow_unsandboxed):
                    raise SandboxUnavailable(
                        f"cannot isolate generated code here ({status['reason']}); the code was not run. "
                        f"To run it unconfined as this user anyway, set {UNSAFE_ENV}=1")
                stderr.seek(0), stderr.truncate()
                status = _run_unconfined(base, limits, stderr)
            stderr.seek(0)
            detail = stderr.read()[-2000:].decode(errors="replace")[-500:]
    if status["status"] == "timeout":
        return Outcome(False, "timeout", f"no result within {limits.timeout_s:g} s")
    if status["code"] == 0:
        return Outcome(True, "passed", "")
    return Outcome(False, "failed", detail)


def _run_isolated(base: Path, limits: Limits, stderr) -> dict:
    """The helper's report: {"status": "exited", "code": n} | {"status": "timeout"} | unavailable."""
    if not sys.platform.startswith("linux"):
        return {"status": "unavailable", "reason": "Linux namespaces are needed"}
    spec = {"base": str(base), "python": sys.executable, "limits": asdict(limits),
            "ro_paths": sorted({"/usr", "/bin", "/lib", "/lib64", "/lib32", "/libx32", sys.prefix,
                                sys.base_prefix, str(Path(os.path.realpath(sys.executable)).parents[1])})}
    proc = subprocess.Popen([sys.executable, "-I", "-S", str(HELPER), json.dumps(spec)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
                            start_new_session=True)
    try:  # the helper enforces the timeout; this only guards against the helper itself hanging
        out, _ = proc.communicate(timeout=limits.timeout_s + 30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its PID 1 has PR_SET_PDEATHSIG: the namespace dies too
        proc.communicate()
        return {"status": "timeout"}
    try:
        return json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"status": "unavailable", "reason": f"the sandbox helper failed (exit {proc.returncode})"}


def _run_unconfined(base: Path, limits: Limits, stderr) -> dict:
    """Only where asked for: rlimits, a fresh session killed at the timeout, the caller's uid."""
    def apply():
        cpu = int(limits.timeout_s) + 1
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
    work = base / "work"
    shutil.move(str(base / "program.py"), str(base / "root" / "program.py"))
    proc = subprocess.Popen([sys.executable, "-I", str(base / "root" / "program.py")], cwd=work,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(work)}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=apply,
                            start_new_session=True)
    try:
        return {"status": "exited", "code": proc.wait(timeout=limits.timeout_s)}
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return {"status": "timeout"}
