"""The `mobilellm corpus` and `mobilellm tokenize` commands, the starter corpus pieces, and a real kill."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from data_helpers import make_texts, tiny_tokenizer, write_jsonl
from mobilellm.cli import main
from mobilellm.data import DataError, TokenDataset
from mobilellm.data.starter import (build_starter_corpus, champ_problem_text, corpus_sources, python_doc_records,
                                    split_play, stdlib_records, train_tokenizer)
from mobilellm.tokenizer import Tokenizer


def test_split_play_gives_one_document_per_act_with_the_title():
    play = "HAMLET\n\nPERSONS.\n\nACT I.\nScene one.\n\nACT II.\nScene two.\n\nACT III.\nEnd."
    acts = split_play(play)
    assert acts == ["HAMLET\n\nPERSONS.\n\nACT I.\nScene one.", "HAMLET\n\nACT II.\nScene two.", "HAMLET\n\nACT III.\nEnd."]
    assert split_play("A POEM\n\nlines") == ["A POEM\n\nlines"]


def test_champ_problem_becomes_problem_solution_answer():
    problem = {"category": "Number-Theory", "_text": "Find x.", "_answer": "3",
               "solution": {"steps": [{"_text": "Step one."}, {"_text": "So x = 3."}]}}
    assert champ_problem_text(problem) == "Problem (Number Theory): Find x.\n\nSolution:\nStep one.\nSo x = 3.\n\nAnswer: 3"


def test_python_documentation_topics_are_prose():
    records = list(python_doc_records())
    assert len(records) > 50 and all(text.strip() for _, text in records)
    assert any("__getattr__" in text for _, text in records)


def test_stdlib_records_leave_out_tests_and_installed_packages(tmp_path):
    for rel in ("json/__init__.py", "os.py", "test/test_os.py", "site-packages/pkg/m.py", "idlelib/idle_test/t.py",
                "_sysconfigdata__linux.py", "lib2to3/tests/data/x.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\n")
    (tmp_path / "latin.py").write_bytes(b"# caf\xe9\n")  # not UTF-8: left out
    sources = [s for s, _ in stdlib_records(tmp_path)]
    assert sorted(sources) == ["stdlib:json/__init__.py", "stdlib:os.py"]
    assert sources == [s for s, _ in stdlib_records(tmp_path)]  # a fixed order


def test_code_corpus_tokenizer_and_shards_through_the_cli(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    assert main(["corpus", "--out", str(corpus), "--domains", "code", "--max-chars", "300000",
                 "--tokenizer-vocab", "400"]) == 0
    summary = json.loads((corpus / "corpus.json").read_text())
    assert 0 < summary["code"]["characters"] <= 300_000 and summary["code"]["documents"] > 5
    lines = (corpus / "code.jsonl").read_text().splitlines()
    assert len(lines) == summary["code"]["documents"]
    assert all(json.loads(line)["text"].strip() for line in lines)
    tokenizer = Tokenizer.load(corpus / "tokenizer")
    assert tokenizer.vocab_size == 400 and tokenizer.eos_ids
    assert main(["corpus", "--out", str(corpus), "--domains", "code", "--tokenizer-vocab", "400"]) == 0
    out = capsys.readouterr().out  # done already: skipped
    assert "code: " in out and "already in" in out and "tokenizer: 400-token BPE already in" in out

    shards = tmp_path / "shards"
    assert main(["tokenize", str(corpus / "code.jsonl"), "--tokenizer", str(corpus / "tokenizer"),
                 "--out", str(shards), "--val-fraction", "0.1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "code:" in out and "train" in out and "(uint16)" in out
    ds = TokenDataset(shards)
    ds.check_tokenizer(tokenizer)
    store = ds.documents("code")
    first = json.loads(lines[0])["text"]
    decoded = {tokenizer.decode(store.document(i)[:-1].tolist()) for i in range(len(store))}
    assert first in decoded or first in {tokenizer.decode(ds.documents("code", "val").document(i)[:-1].tolist())
                                         for i in range(len(ds.documents("code", "val")))}


def test_tokenize_names_domains_and_reads_folders(tmp_path):
    tiny_tokenizer(tmp_path / "tok")
    (tmp_path / "notes").mkdir()
    for i, text in enumerate(make_texts(20)):
        (tmp_path / "notes" / f"{i:02d}.txt").write_text(text)
    write_jsonl(tmp_path / "a.jsonl", make_texts(10, seed=1))
    write_jsonl(tmp_path / "b.jsonl", make_texts(10, seed=2))
    assert main(["tokenize", str(tmp_path / "notes"), f"mixed={tmp_path / 'a.jsonl'}", f"mixed={tmp_path / 'b.jsonl'}",
                 "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "s"), "--val-fraction", "0",
                 "--no-progress"]) == 0
    ds = TokenDataset(tmp_path / "s")
    assert ds.domains == ["mixed", "notes"]
    assert len(ds.documents("notes")) == 20 and len(ds.documents("mixed")) == 20


def test_tokenize_errors_are_reported_cleanly(tmp_path, capsys):
    tiny_tokenizer(tmp_path / "tok")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops}\n')
    assert main(["tokenize", str(tmp_path / "bad.jsonl"), "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(tmp_path / "s"), "--no-progress"]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert main(["tokenize", str(tmp_path / "nope.jsonl"), "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(tmp_path / "s"), "--no-progress"]) == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err
    assert main(["tokenize", str(tmp_path / "bad.jsonl"), "--tokenizer", str(tmp_path),
                 "--out", str(tmp_path / "s")]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err


def test_train_tokenizer_shares_the_budget_between_domains(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["aaaa bbbb " * 500])
    write_jsonl(tmp_path / "b.jsonl", ["zzzz yyyy " * 50])
    from mobilellm.data import Source
    folder = train_tokenizer({"a": [Source(tmp_path / "a.jsonl")], "b": [Source(tmp_path / "b.jsonl")]}, 280,
                             tmp_path / "tok", max_chars=1000, show_progress=False)
    tokenizer = Tokenizer.load(folder)
    # With an equal share, domain b's words are merged into single tokens too.
    assert len(tokenizer.encode("zzzz")) == 1 and len(tokenizer.encode("aaaa")) == 1


def test_a_killed_tokenize_resumes_to_the_same_shards(tmp_path):
    """SIGKILL a real `mobilellm tokenize` on 2 workers mid-way, resume it on 3, and compare with an
    uninterrupted run on 1: same manifest, byte-identical shard files."""
    tiny_tokenizer(tmp_path / "tok")
    write_jsonl(tmp_path / "d.jsonl", make_texts(3000, seed=4))
    args = lambda out, workers: ["tokenize", str(tmp_path / "d.jsonl"), "--tokenizer", str(tmp_path / "tok"),  # noqa: E731
                                 "--out", str(out), "--shard-chars", "15000", "--workers", str(workers), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-m", "mobilellm.cli", *args(tmp_path / "killed", 2)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record = tmp_path / "killed" / "tasks" / "pieces" / "d-00000.json"
    deadline = time.time() + 300  # a loaded machine starts the process slowly
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.loads(record.read_text())["shards"]) >= 3:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.skip("tokenize finished before it could be killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)  # the orphaned workers notice their parent is gone
    state = json.loads(record.read_text())
    assert len(state["shards"]) >= 3 and state["complete"] is False
    with pytest.raises(DataError, match="not finished"):
        TokenDataset(tmp_path / "killed")
    assert main(args(tmp_path / "killed", 3)) == 0
    assert main(args(tmp_path / "clean", 1)) == 0
    killed, clean = TokenDataset(tmp_path / "killed"), TokenDataset(tmp_path / "clean")
    assert killed.manifest == clean.manifest
    names = sorted(p.name for p in (tmp_path / "clean").glob("*.npy"))
    assert names == sorted(p.name for p in (tmp_path / "killed").glob("*.npy")) and len(names) > 20
    assert all((tmp_path / "clean" / n).read_bytes() == (tmp_path / "killed" / n).read_bytes() for n in names)
    assert not [p for p in (tmp_path / "killed").iterdir() if p.name.startswith(".")]  # temp files of the kill?


@pytest.mark.slow
def test_full_starter_corpus_from_the_registries(tmp_path):
    start = time.time()
    summary = build_starter_corpus(tmp_path, log=lambda line: None)
    elapsed = time.time() - start
    assert summary["prose"]["documents"] > 150 and summary["prose"]["characters"] > 4_000_000
    assert summary["code"]["documents"] > 300 and summary["code"]["characters"] > 5_000_000
    assert summary["math"]["documents"] > 300 and summary["math"]["characters"] > 150_000
    assert set(corpus_sources(tmp_path)) == {"prose", "code", "math"}
    hamlet = [json.loads(line) for line in (tmp_path / "prose.jsonl").open() if "hamlet" in line]
    assert any("To be, or not to be" in r["text"] for r in hamlet)
    assert any(line.startswith('{"text"') and "pydoc_data.topics:" in line for line in (tmp_path / "prose.jsonl").open())
    assert elapsed < 120, f"starter corpus took {elapsed:.0f}s"
