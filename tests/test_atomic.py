"""Atomic writes: the target changes only once the new content is complete, and no temporaries are left."""

import json

import pytest

from mobilellm.atomic import atomic_file, atomic_folder, write_json_atomic, write_text_atomic


def test_atomic_file_replaces_the_target_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / "sub" / "out.bin"  # the parent is created
    with atomic_file(path, "wb") as fh:
        fh.write(b"first")
        assert not path.exists()  # invisible until the block ends
    with atomic_file(path, "wb") as fh:
        fh.write(b"second")
    assert path.read_bytes() == b"second"
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["out.bin"]


def test_a_failed_write_keeps_the_old_content(tmp_path):
    path = write_text_atomic(tmp_path / "notes.txt", "old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_file(path) as fh:
            fh.write("half of the new")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_write_json_atomic_indents_and_ends_with_a_newline(tmp_path):
    text = write_json_atomic(tmp_path / "r.json", {"a": [1, "é"]}, indent=2).read_text(encoding="utf-8")
    assert text.endswith("}\n") and json.loads(text) == {"a": [1, "é"]}
    assert text == json.dumps({"a": [1, "é"]}, indent=2) + "\n"


def test_atomic_folder_replaces_an_existing_folder_with_nested_files(tmp_path):
    folder = tmp_path / "ckpt"
    with atomic_folder(folder) as tmp:
        (tmp / "old.txt").write_text("old")
    with atomic_folder(folder) as tmp:
        (tmp / "nested").mkdir()
        (tmp / "nested" / "a.txt").write_text("a")
        assert not (folder / "nested").exists()
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == ["nested", "nested/a.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_a_failed_folder_keeps_the_old_one(tmp_path):
    folder = tmp_path / "ckpt"
    with atomic_folder(folder) as tmp:
        (tmp / "keep.txt").write_text("kept")
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(folder) as tmp:
            (tmp / "keep.txt").write_text("replaced")
            raise KeyboardInterrupt
    assert (folder / "keep.txt").read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
