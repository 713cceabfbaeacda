"""Document sources: text folders, JSONL, Parquet, HF datasets on disk, and their errors."""

import pytest

from data_helpers import make_texts, write_jsonl
from mobilellm.data.sources import DataError, Source, SourceStats, read_documents


def test_text_folder_is_recursive_sorted_and_filtered_by_pattern(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("zeta")
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "notes.md").write_text("markdown")
    (tmp_path / "skip.py").write_text("print()")
    docs = list(read_documents(Source(tmp_path)))
    assert docs == ["alpha", "zeta", "markdown"]  # sorted by path: a.txt, b/z.txt, notes.md
    assert list(read_documents(Source(tmp_path, patterns=("**/*.py",)))) == ["print()"]
    assert list(read_documents(Source(tmp_path, patterns=("*.txt",)))) == ["alpha"]  # not recursive


def test_jsonl_with_a_configurable_field(tmp_path):
    texts = make_texts(5)
    path = write_jsonl(tmp_path / "d.jsonl", texts, field="content")
    assert list(read_documents(Source(path, text_field="content"))) == texts
    with pytest.raises(DataError, match=r"d\.jsonl:1: no text field 'text' \(has: \['content', 'id'\]\)"):
        list(read_documents(Source(path)))


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        list(read_documents(Source(path)))
    path.write_text('{"text": "ok"}\n{"text": 5}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'text' is int, not text"):
        list(read_documents(Source(path)))


def test_non_utf8_files_are_refused_with_their_name(tmp_path):
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt is not UTF-8 text \(bad byte at offset 3\)"):
        list(read_documents(Source(tmp_path)))
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:2 is not UTF-8"):
        list(read_documents(Source(jsonl)))


def test_empty_documents_are_skipped_and_counted(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\n")
    (tmp_path / "real.txt").write_text("content")
    stats = SourceStats()
    assert list(read_documents(Source(tmp_path), stats)) == ["content"]
    assert stats.documents == 1 and stats.skipped == {"empty": 2}
    assert "skipped 2 empty documents" in stats.summary() and "blank.txt" in stats.summary()


def test_empty_input_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match=r"no documents in .* \(1 empty skipped\)"):
        list(read_documents(Source(tmp_path)))
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match=r"no files matching \*\*/\*\.txt, \*\*/\*\.md under .*sub"):
        list(read_documents(Source(tmp_path / "sub")))
    with pytest.raises(DataError, match="does not exist"):
        list(read_documents(Source(tmp_path / "missing.jsonl")))
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"cannot tell the format of .*data\.csv"):
        list(read_documents(Source(tmp_path / "data.csv")))


def test_parquet_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = make_texts(2500)  # more than one read batch
    pq.write_table(pa.table({"body": texts, "n": list(range(2500))}), tmp_path / "d.parquet", row_group_size=700)
    assert list(read_documents(Source(tmp_path / "d.parquet", text_field="body"))) == texts
    with pytest.raises(DataError, match=r"no text column 'text' \(has: \['body', 'n'\]\)"):
        list(read_documents(Source(tmp_path / "d.parquet")))
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        list(read_documents(Source(tmp_path / "junk.parquet")))


def test_hf_dataset_saved_on_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = make_texts(30) + [""]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    stats = SourceStats()
    assert list(read_documents(Source(tmp_path / "ds"), stats)) == texts[:-1]
    assert stats.skipped == {"empty": 1}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts[:3]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"holds several splits \(train\); point at one of them"):
        list(read_documents(Source(tmp_path / "dd")))
    assert list(read_documents(Source(tmp_path / "dd" / "train"))) == texts[:3]
