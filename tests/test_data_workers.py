"""Tokenizing on several workers and as engine tasks: byte-identical output, summaries, progress, formats."""

import gzip
import json
import shlex
import stat

import numpy as np
import pytest

from data_helpers import make_texts, tiny_tokenizer, write_jsonl
from mobilellm.cli import main
from mobilellm.data import TokenDataset
from mobilellm.data.progress import read_counts
from mobilellm.data.sharding import plan_pieces, tokenize_to_shards
from mobilellm.data.shards import is_validation
from mobilellm.data.sources import DataError, Source, input_bytes, read_documents

SHARD_CHARS = 3000


def _jsonl_bytes(texts):
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three domains: compressed and plain JSONL files (with empty documents), a folder of text files,
    and one large JSONL file; returns (folder, {domain: texts in input order}, {domain: [Source]})."""
    root = tmp_path_factory.mktemp("corpus")
    web = [make_texts(150, seed=s) for s in (1, 2, 3)]
    (root / "web").mkdir()
    (root / "web" / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(web[0][:70] + [""] + web[0][70:])))
    try:  # the data extra's zstandard; without it the second file is gzip too
        import zstandard
        (root / "web" / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl_bytes(web[1] + ["  "])))
    except ImportError:
        (root / "web" / "b.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(web[1] + ["  "])))
    write_jsonl(root / "web" / "c.jsonl", web[2])
    (root / "notes").mkdir()
    notes = make_texts(60, seed=7, min_words=30, max_words=120)
    for i, text in enumerate(notes):
        (root / "notes" / f"{i:03d}.txt").write_text(text)
    big = make_texts(1500, seed=8)
    write_jsonl(root / "big.jsonl", big)
    texts = {"web": web[0] + web[1] + web[2], "notes": notes, "big": big}
    sources = {"web": [Source(root / "web", patterns=("*.jsonl*",))], "notes": [Source(root / "notes")],
               "big": [Source(root / "big.jsonl")]}
    return root, texts, sources


def _b(root):
    return next(p.name for p in (root / "web").iterdir() if p.name.startswith("b."))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    tiny_tokenizer(folder)
    return folder


def _files(folder):
    """Every file of a shard folder (the manifest and the shards; not the writers' tasks/ folder)."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_the_plan_depends_on_the_inputs_only(corpus):
    _, _, sources = corpus
    web = plan_pieces("web", sources["web"], SHARD_CHARS)
    assert [p.files[0][0].rsplit("/", 1)[1] for p in web] == ["a.jsonl.gz", _b(corpus[0]), "c.jsonl"]
    notes = plan_pieces("notes", sources["notes"], SHARD_CHARS)  # text files grouped by size
    assert 1 < len(notes) < 60 and sum(len(p.files) for p in notes) == 60
    assert all(sum(f[2] for f in p.files) >= SHARD_CHARS for p in notes[:-1])
    assert plan_pieces("notes", sources["notes"], SHARD_CHARS) == notes


def test_one_two_and_three_workers_write_identical_shards(corpus, tokenizer_dir, tmp_path):
    _, texts, sources = corpus
    tokenizer = type(tiny_tokenizer())  # Tokenizer
    tok = tokenizer.load(tokenizer_dir)
    outputs = []
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        manifest = tokenize_to_shards(sources, tok, out, val_fraction=0.1, shard_chars=SHARD_CHARS, workers=workers,
                                      progress=False)
        outputs.append((manifest, _files(out)))
    assert outputs[0][0] == outputs[1][0] == outputs[2][0]
    assert outputs[0][1] == outputs[1][1] == outputs[2][1]  # manifest.json and every .npy, byte for byte
    manifest = outputs[0][0]
    assert len(manifest["domains"]["big"]["shards"]) > 5 and len(outputs[0][1]) > 40
    ds = TokenDataset(tmp_path / "w2")
    ds.check_tokenizer(tok)  # the tokenizer hash
    for domain, docs in texts.items():  # document order within a domain is the input order
        for split in ("train", "val"):
            store = ds.documents(domain, split)
            decoded = [tok.decode(store.document(i)[:-1].tolist()) for i in range(len(store))]
            assert decoded == [t for t in docs if is_validation(t, 0.1) == (split == "val")]


def test_the_manifest_sums_up_each_domain(corpus, tokenizer_dir, tmp_path):
    _, texts, sources = corpus
    tok = type(tiny_tokenizer()).load(tokenizer_dir)
    manifest = tokenize_to_shards(sources, tok, tmp_path / "out", val_fraction=0.1, shard_chars=SHARD_CHARS, workers=2,
                                  progress=False)
    web = manifest["domains"]["web"]
    assert web["documents"] == 450 == web["train_documents"] + web["val_documents"]
    assert web["skipped"] == {"empty": 2}
    assert [w.rsplit("/", 1)[1] for w in web["skipped_examples"]["empty"]] == ["a.jsonl.gz:71", f"{_b(corpus[0])}:151"]
    assert web["characters"] == sum(map(len, texts["web"]))
    ds = TokenDataset(tmp_path / "out")
    assert web["tokens"] == ds.documents("web").num_tokens + ds.documents("web", "val").num_tokens
    assert manifest["domains"]["notes"]["skipped"] == {} and manifest["domains"]["notes"]["documents"] == 60
    # One progress count across the workers: the boards add up to the whole corpus.
    counts = read_counts(tmp_path / "out" / "tasks" / "progress")
    assert counts["documents"] == sum(d["documents"] for d in manifest["domains"].values())
    assert counts["tokens"] == sum(d["tokens"] for d in manifest["domains"].values())
    root = corpus[0]
    assert counts["bytes"] == input_bytes(root / "web") + input_bytes(root / "notes") + input_bytes(root / "big.jsonl")


def test_compressed_jsonl_streams_like_plain(corpus, tmp_path):
    pytest.importorskip("zstandard")
    root, texts, _ = corpus
    assert list(read_documents(Source(root / "web" / "a.jsonl.gz"))) == make_texts(150, seed=1)
    assert list(read_documents(Source(root / "web" / "b.jsonl.zst"))) == make_texts(150, seed=2)
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes((root / "web" / "a.jsonl.gz").read_bytes()[:-200])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: damaged or truncated archive"):
        list(read_documents(Source(truncated)))
    (tmp_path / "bad.jsonl.zst").write_bytes(b"not zstd at all")
    with pytest.raises(DataError, match=r"bad\.jsonl\.zst: damaged or truncated archive"):
        list(read_documents(Source(tmp_path / "bad.jsonl.zst")))


def test_the_cli_names_compressed_inputs_after_the_file(corpus, tokenizer_dir, tmp_path, capsys):
    root, _, _ = corpus
    assert main(["tokenize", str(root / "web" / "a.jsonl.gz"), "--tokenizer", str(tokenizer_dir),
                 "--out", str(tmp_path / "s"), "--workers", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "a: " in out and "1 skipped (empty)" in out
    assert TokenDataset(tmp_path / "s").domains == ["a"]


def _inputs(corpus):
    root = corpus[0]
    return [f"web={root / 'web'}", f"notes={root / 'notes'}", f"big={root / 'big.jsonl'}"]


def test_datatrove_local_executor_writes_the_same_shards(corpus, tokenizer_dir, tmp_path):
    pytest.importorskip("datatrove")
    common = ["--tokenizer", str(tokenizer_dir), "--val-fraction", "0.1", "--shard-chars", str(SHARD_CHARS),
              "--patterns", "*.jsonl*", "**/*.txt", "--no-progress"]
    assert main(["tokenize", *_inputs(corpus), "--out", str(tmp_path / "local"), "--workers", "1", *common]) == 0
    assert main(["tokenize", *_inputs(corpus), "--out", str(tmp_path / "dt"), "--engine", "datatrove",
                 "--tasks", "4", "--workers", "3", *common]) == 0
    assert _files(tmp_path / "dt") == _files(tmp_path / "local")
    completions = tmp_path / "dt" / "tasks" / "datatrove" / "tokenize" / "completions"
    assert sorted(p.name for p in completions.iterdir()) == ["00000", "00001", "00002", "00003"]


def test_slurm_scripts_run_as_an_array_then_the_manifest(corpus, tokenizer_dir, tmp_path, monkeypatch):
    """`tokenize-slurm` writes the job; its task line is run here once per array index (with Slurm's variables
    and a stand-in scontrol), then the manifest job's line; the shards equal a local run's."""
    pytest.importorskip("datatrove")
    common = ["--tokenizer", str(tokenizer_dir), "--val-fraction", "0.1", "--shard-chars", str(SHARD_CHARS),
              "--patterns", "*.jsonl*", "**/*.txt"]
    out = tmp_path / "cluster"
    assert main(["tokenize-slurm", *_inputs(corpus), "--out", str(out), "--tasks", "3", "--partition", "cpu",
                 "--cpus-per-task", "2", "--time", "2:00:00", "--env-command", "source /venv/bin/activate", *common]) == 0
    folder = out / "tasks" / "slurm"
    task_script, manifest_script = (folder / "tokenize.slurm").read_text(), (folder / "manifest.slurm").read_text()
    for line in ("#SBATCH --array=0-2", "#SBATCH --partition=cpu", "#SBATCH --cpus-per-task=2", "#SBATCH --time=2:00:00",
                 "source /venv/bin/activate"):
        assert line in task_script
    assert "--array" not in manifest_script and "--manifest-only" in manifest_script
    submit = (folder / "submit.sh").read_text()
    assert "RUN_OFFSET=0 tokenize.slurm" in submit and "--dependency=afterok$ids manifest.slurm" in submit
    with pytest.raises(DataError, match="not finished"):
        TokenDataset(out)

    def command(script):
        line = next(ln for ln in script.splitlines() if "mobilellm tokenize" in ln)
        words = shlex.split(line)
        return words[words.index("mobilellm") + 1:]

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho node1\n")
    (bin_dir / "scontrol").chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("SLURM_NODELIST", "node1")
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    for rank in (2, 0, 1):  # array tasks start in any order
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(rank))
        assert main(command(task_script)) == 0
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    assert main(command(manifest_script)) == 0
    assert main(["tokenize", *_inputs(corpus), "--out", str(tmp_path / "local"), "--workers", "2", *common,
                 "--no-progress"]) == 0
    assert _files(out) == _files(tmp_path / "local")


def test_the_manifest_step_refuses_unfinished_tasks(corpus, tokenizer_dir, tmp_path):
    pytest.importorskip("datatrove")
    common = ["--tokenizer", str(tokenizer_dir), "--shard-chars", str(SHARD_CHARS), "--patterns", "*.jsonl*", "**/*.txt"]
    out = tmp_path / "cluster"
    assert main(["tokenize-slurm", *_inputs(corpus), "--out", str(out), "--tasks", "2", "--partition", "cpu",
                 *common]) == 0
    assert main(["tokenize", *_inputs(corpus), "--out", str(out), "--manifest-only", *common]) == 2
    assert main(["tokenize", *_inputs(corpus), "--out", str(out), "--engine", "slurm", "--tasks", "2", *common]) == 2


def test_bad_engine_is_refused(corpus, tokenizer_dir, tmp_path, capsys):
    assert main(["tokenize", str(corpus[0] / "big.jsonl"), "--tokenizer", str(tokenizer_dir), "--out",
                 str(tmp_path / "s"), "--engine", "spark"]) == 2
    assert "unknown engine 'spark'" in capsys.readouterr().err


def test_memory_mapped_reading_of_many_shards(corpus, tokenizer_dir, tmp_path):
    _, texts, sources = corpus
    tok = type(tiny_tokenizer()).load(tokenizer_dir)
    tokenize_to_shards({"big": sources["big"]}, tok, tmp_path / "o", val_fraction=0.0, shard_chars=500, workers=2,
                       progress=False)
    store = TokenDataset(tmp_path / "o").documents("big")
    assert len(store) == 1500 and isinstance(store.tokens[0], np.memmap)
    assert tok.decode(store.document(1499)[:-1].tolist()) == texts["big"][1499]


def test_without_datatrove_the_engine_says_what_to_install(corpus, tokenizer_dir, tmp_path, monkeypatch, capsys):
    import sys

    import mobilellm.data

    monkeypatch.delitem(sys.modules, "mobilellm.data.cluster", raising=False)
    monkeypatch.delattr(mobilellm.data, "cluster", raising=False)  # set on the package by an earlier import
    for name in ("datatrove", "datatrove.executor", "datatrove.pipeline.base"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    assert main(["tokenize", str(corpus[0] / "big.jsonl"), "--tokenizer", str(tokenizer_dir), "--out",
                 str(tmp_path / "s"), "--engine", "datatrove", "--no-progress"]) == 2
    assert "pip install 'mobilellm[cluster]'" in capsys.readouterr().err
