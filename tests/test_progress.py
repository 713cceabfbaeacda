"""Steps that can take more than a few seconds say so before they start: a download, the first kernel build,
the BIG-bench extraction."""

import io
import subprocess
import tarfile

import pytest
from torch.utils import cpp_extension

from mobilellm import artifacts
from mobilellm.eval.tasks import bigbench
from mobilellm.quant import kernels


def test_the_first_kernel_build_is_announced_and_a_cached_one_is_not(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "cpu_supports_avx2", lambda: True)
    built = []

    def no_compiler(name, **kwargs):
        built.append(name)
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    assert kernels.load_extension.__wrapped__() is None  # the build failed: the reference path runs
    assert "building the int4 CPU kernels (first use only" in capsys.readouterr().err
    (tmp_path / built[0]).mkdir()
    (tmp_path / built[0] / f"{built[0]}.so").write_bytes(b"")
    kernels.load_extension.__wrapped__()
    assert "building" not in capsys.readouterr().err


def test_a_download_is_announced_and_its_failure_named(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(kwargs)
        (tmp_path / "pkg-1.0.tar.gz").write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0, None, "")

    monkeypatch.setattr(artifacts.subprocess, "run", fake_pip)
    assert artifacts.pip_download("pkg==1.0", tmp_path, sdist=True) == tmp_path / "pkg-1.0.tar.gz"
    assert "downloading pkg==1.0 from PyPI" in capsys.readouterr().err
    assert calls[0]["stdout"] == subprocess.DEVNULL  # captured stderr has no descriptor: pip's output is dropped
    monkeypatch.setattr(artifacts.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, None, "ERROR: No matching distribution"))
    with pytest.raises(artifacts.FetchError, match="pip could not download nope==1.0.*No matching distribution"):
        artifacts.pip_download("nope==1.0", tmp_path / "empty")


def test_bigbench_extraction_shows_progress(tmp_path, monkeypatch, capsys):
    archive = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        data = b'{"examples": []}'
        info = tarfile.TarInfo("bigbench-1.0.0/bigbench/benchmark_tasks/toy/task.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(bigbench, "bigbench_dir", lambda: tmp_path / "tasks")
    monkeypatch.setattr(bigbench, "cache_root", lambda: tmp_path)
    monkeypatch.setattr(bigbench, "pip_download", lambda requirement, dest, sdist: archive)
    root = bigbench.fetch_bigbench(["toy"])
    assert (root / "toy" / "task.json").read_bytes() == data
    assert "extracting 1 BIG-bench task(s)" in capsys.readouterr().err
