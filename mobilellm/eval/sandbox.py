"""Run untrusted model-written Python: one subprocess per program, with limits and no network.

Each program runs in a fresh `python -I` (isolated: no user site, no PYTHON* variables) in an empty
temporary folder, in its own session so a timeout kills everything it spawned. Before the program
starts the child caps its address space, CPU time, file size and process count with
`resource.setrlimit`, and moves into a new network namespace that has no interfaces (when the kernel
allows it); the program itself also finds `socket` disabled. This guards against accidents of
generated code, not against a determined attacker: run untrusted code in a container for that.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000

# Prepended to every program: no sockets even where no network namespace could be made.
GUARD = """\
import socket as _socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the sandbox")
_socket.socket = _socket.create_connection = _socket.getaddrinfo = _no_network
del _socket, _no_network
"""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    processes: int = 64


@dataclass(frozen=True)
class Outcome:
    passed: bool
    status: str  # "passed", "failed", "timeout"
    detail: str  # the end of stderr, for failures


def _isolate(limits: Limits):
    def apply():  # runs in the child between fork and exec
        cpu = int(limits.timeout_s) + 1
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0:  # needs CAP_SYS_ADMIN; unprivileged users need a user namespace
            libc.unshare(CLONE_NEWUSER | CLONE_NEWNET)
    return apply


def run_program(source: str, limits: Limits = Limits()) -> Outcome:
    """Execute source; passed when it exits with status 0 within the time limit."""
    with tempfile.TemporaryDirectory(prefix="mobilellm-sandbox-") as workdir:
        proc = subprocess.Popen([sys.executable, "-I", "-c", GUARD + source], cwd=workdir,
                                env={"PATH": "/usr/bin:/bin", "HOME": workdir}, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                preexec_fn=_isolate(limits), start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return Outcome(False, "timeout", f"no result within {limits.timeout_s:g} s")
    if proc.returncode == 0:
        return Outcome(True, "passed", "")
    return Outcome(False, "failed", stderr.decode(errors="replace")[-500:])
