"""The sandbox holds: each escape a model-written program could try is contained, or the code is not run."""

import os
import socket
import sys
import time
import uuid

import pytest

from mobilellm.eval import sandbox
from mobilellm.eval.sandbox import Limits, SandboxUnavailable, run_program

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux namespaces")

FAST = Limits(timeout_s=3.0, memory_bytes=512 << 20)


def alive(marker: str) -> list[int]:
    """Processes on the host whose command line holds marker."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return pids


def sleeper(marker: str) -> str:
    """Source that replaces the current process by `python -c 'sleep' MARKER`, visible on the host."""
    return f"os.execv(sys.executable, [sys.executable, '-c', 'import time\\nwhile True: time.sleep(1)', '{marker}'])"


def test_runs_as_nobody_in_a_private_root():
    code = ("import os, sys\n"
            "assert os.getcwd() == '/tmp' and os.listdir('/tmp') == [], os.listdir('/tmp')\n"
            "assert sorted(os.listdir('/proc'))[0] == '1' and os.getpid() == 1\n"  # its own PID namespace
            "assert not os.path.exists('/etc') and not os.path.exists('/work') and not os.path.exists('/home')\n")
    if os.geteuid() == 0:
        code += "assert os.getuid() == os.getgid() == 65534, os.getuid()\n"
    outcome = run_program(code, FAST)
    assert outcome.passed, outcome.detail


def test_writes_outside_the_scratch_folder_fail(tmp_path):
    target = tmp_path / "escaped.txt"
    code = ("import sys\nescaped = []\n"
            f"for path in [{str(target)!r}, sys.prefix + '/escaped.txt', '/usr/escaped.txt', '/escaped.txt', "
            "'/dev/escaped.txt', '/proc/escaped.txt']:\n"
            "    try:\n        open(path, 'w').write('x')\n        escaped.append(path)\n"
            "    except OSError:\n        pass\n"
            "assert not escaped, escaped\nopen('/tmp/inside.txt', 'w').write('allowed')\n")
    outcome = run_program(code, FAST)
    assert outcome.passed, outcome.detail
    assert not target.exists() and not os.path.exists(os.path.join(sys.prefix, "escaped.txt"))


def test_files_outside_are_invisible(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    code = (f"import os\nassert not os.path.exists({str(secret)!r})\n"
            f"assert not os.path.exists({str(tmp_path)!r})\n"
            f"print(open({str(secret)!r}).read())\n")
    outcome = run_program(code, FAST)
    assert outcome.status == "failed" and "FileNotFoundError" in outcome.detail
    assert "do not read" not in outcome.detail


def test_fifty_children_are_capped_at_the_process_limit():
    limits = Limits(timeout_s=5.0, processes=8)
    code = ("import os, sys, time\nstarted = 0\n"
            "for _ in range(50):\n"
            "    try:\n        pid = os.fork()\n    except OSError:\n        continue\n"
            "    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n"
            "    started += 1\n"
            "print('started', started, file=sys.stderr)\nsys.exit(1)\n")
    outcome = run_program(code, limits)
    assert outcome.status == "failed", outcome
    started = int(outcome.detail.split("started")[1].split()[0])
    assert 0 < started < limits.processes, outcome.detail


def test_a_fork_bomb_is_bounded_and_dies_at_the_timeout():
    marker = f"mobilellm-bomb-{uuid.uuid4().hex}"
    code = (f"import os, sys, time\nif os.fork() == 0:\n    {sleeper(marker)}\nwhile True:\n"
            "    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.01)\n")
    start = time.monotonic()
    outcome = run_program(code, Limits(timeout_s=2.0, processes=12))
    elapsed = time.monotonic() - start
    assert outcome.status == "timeout" and elapsed < 2.0 + 1.0, (outcome, elapsed)
    assert alive(marker) == []


def test_a_child_in_its_own_session_cannot_outlast_the_timeout():
    marker = f"mobilellm-session-{uuid.uuid4().hex}"
    code = (f"import os, sys, time\nif os.fork() == 0:\n    os.setsid()\n    {sleeper(marker)}\n"
            "while True:\n    pass\n")
    start = time.monotonic()
    outcome = run_program(code, Limits(timeout_s=2.0))
    elapsed = time.monotonic() - start
    assert outcome.status == "timeout" and 2.0 <= elapsed < 3.0, (outcome, elapsed)
    assert alive(marker) == []


def test_a_grandchild_dies_with_the_program():
    marker = f"mobilellm-orphan-{uuid.uuid4().hex}"
    code = (f"import os, sys, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        {sleeper(marker)}\n"
            "    os._exit(0)\n"
            "os.wait()\ntime.sleep(0.5)\n")  # the child has exited, the grandchild sleeps on
    start = time.monotonic()
    outcome = run_program(code, FAST)
    assert outcome.passed, outcome.detail
    assert time.monotonic() - start < FAST.timeout_s and alive(marker) == []


def test_loopback_of_the_host_is_unreachable():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    port = server.getsockname()[1]
    code = (f"import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\n"
            "s.send(b'escaped')\n")
    outcome = run_program(code, FAST)
    assert outcome.status == "failed" and "OSError" in outcome.detail, outcome
    with pytest.raises(socket.timeout):
        server.accept()
    server.close()


def test_no_isolation_means_no_run_unless_asked(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox, "_run_isolated", lambda *a: {"status": "unavailable", "reason": "test"})
    monkeypatch.delenv(sandbox.UNSAFE_ENV, raising=False)
    flag = tmp_path / "ran"
    code = f"open({str(flag)!r}, 'w').write('ran')\n"
    with pytest.raises(SandboxUnavailable, match=sandbox.UNSAFE_ENV):
        run_program(code, FAST)
    assert not flag.exists()
    monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")
    assert run_program(code, FAST).passed and flag.read_text() == "ran"  # unconfined: it can write anywhere
    looping = run_program("while True:\n    pass\n", Limits(timeout_s=1.0))
    assert looping.status == "timeout"
