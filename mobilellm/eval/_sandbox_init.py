"""The sandbox's trusted helper (see sandbox.py): `python -I -S _sandbox_init.py SPEC_JSON`.

Standard library only, run without site-packages. Prints one JSON line: {"status": "exited", "code": n},
{"status": "timeout"} or {"status": "unavailable", "reason": "..."} (nothing was run).
"""

import ctypes
import json
import os
import platform
import resource
import select
import signal
import sys
import time

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
NOBODY = 65534

libc = ctypes.CDLL(None, use_errno=True)


def check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else str(s).encode()  # noqa: E731
    check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
          f"mount {target}")


def bind(source: str, target: str, *, writable: bool = False) -> None:
    """Bind source at target, read-only unless writable; keeps the source's nosuid/nodev/noexec."""
    mount(source, target, None, MS_BIND | MS_REC)
    kept = os.statvfs(source).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)  # ST_* bits equal MS_* here
    mount(None, target, None, MS_REMOUNT | MS_BIND | MS_NOSUID | kept | (0 if writable else MS_RDONLY))


def build_root(spec: dict, root: str) -> None:
    """A tmpfs root with the read-only system paths, /dev basics, /proc, /tmp (writable), /program.py."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=8m,mode=0755")
    bound = []
    for path in spec["ro_paths"]:
        if not os.path.lexists(path) or any(path.startswith(b.rstrip("/") + "/") for b in bound):
            continue
        target = root + path
        if os.path.islink(path):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.lexists(target):
                os.symlink(os.readlink(path), target)
            continue
        os.makedirs(target, exist_ok=True)
        bind(os.path.realpath(path), target)
        bound.append(path)
    os.makedirs(root + "/dev")
    for name in ("null", "zero", "random", "urandom"):
        open(f"{root}/dev/{name}", "w").close()
        bind(f"/dev/{name}", f"{root}/dev/{name}", writable=name in ("null", "zero"))
    os.makedirs(root + "/proc")
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    work = os.path.join(spec["base"], "work")
    if os.geteuid() == 0 and not spec["userns"]:
        os.chown(work, NOBODY, NOBODY)
    os.makedirs(root + "/tmp")
    bind(work, root + "/tmp", writable=True)
    with open(os.path.join(spec["base"], "program.py"), "rb") as src, open(root + "/program.py", "wb") as dst:
        dst.write(src.read())
    mount(None, root, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def enter_root(root: str) -> None:
    os.chdir(root)
    number = SYS_PIVOT_ROOT.get(platform.machine())
    if number is not None and libc.syscall(number, b".", b".") == 0:
        check(libc.umount2(b".", MNT_DETACH), "umount old root")  # the old root is stacked under "."
    else:  # e.g. an initramfs root: chroot, safe once every capability is gone (below)
        os.chroot(".")
    os.chdir("/tmp")


def set_limits(limits: dict) -> None:
    cpu = int(limits["timeout_s"]) + 1
    for which, value in ((resource.RLIMIT_AS, limits["memory_bytes"]), (resource.RLIMIT_CPU, cpu),
                         (resource.RLIMIT_FSIZE, limits["file_bytes"]), (resource.RLIMIT_CORE, 0),
                         (resource.RLIMIT_NOFILE, limits["open_files"]),
                         (resource.RLIMIT_NPROC, limits["processes"])):
        resource.setrlimit(which, (value, value))


def drop_privileges(userns: bool) -> None:
    if not userns:  # root: become nobody, which loses every capability
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
    else:  # uid 0 of our own user namespace: empty the bounding set, then every capability set
        for cap in range(64):
            libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
        check(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def program_process(spec: dict) -> None:
    """PID 1 of the new PID namespace: isolate, then exec the program (never returns)."""
    check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
    root = os.path.join(spec["base"], "root")
    build_root(spec, root)
    enter_root(root)
    set_limits(spec["limits"])
    drop_privileges(spec["userns"])
    check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")  # helper killed: all die
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0), os.dup2(null, 1)
    python = spec["python"]
    os.execve(python, [python, "-I", "/program.py"], {"PATH": "/usr/bin:/bin", "HOME": "/tmp"})


def report(**status) -> None:
    print(json.dumps(status), flush=True)


def main() -> None:
    spec = json.loads(sys.argv[1])
    spec["userns"] = os.geteuid() != 0
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWPID | (CLONE_NEWUSER if spec["userns"] else 0)) != 0:
        return report(status="unavailable", reason=f"unshare(2): {os.strerror(ctypes.get_errno())}")
    if spec["userns"]:
        try:
            for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        except OSError as err:
            return report(status="unavailable", reason=f"user namespace map: {err}")
    deadline = time.monotonic() + spec["limits"]["timeout_s"]
    failure_r, failure_w = os.pipe()  # closed by the exec when setup succeeds
    pid = os.fork()
    if pid == 0:
        os.close(failure_r)
        try:
            program_process(spec)
        except BaseException as err:  # noqa: BLE001 - any setup failure means: not isolated, not run
            os.write(failure_w, f"{err}".encode()[:1000])
        os._exit(127)
    os.close(failure_w)
    failure = os.read(failure_r, 1000)
    if failure:
        os.waitpid(pid, 0)
        return report(status="unavailable", reason=failure.decode(errors="replace"))
    pidfd = os.pidfd_open(pid)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    if not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
        os.kill(pid, signal.SIGKILL)  # PID 1 dies: the kernel kills the rest of the namespace
        os.waitpid(pid, 0)  # returns once every process of the namespace is gone
        return report(status="timeout")
    _, status = os.waitpid(pid, 0)
    report(status="exited", code=os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main()
