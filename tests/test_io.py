"""Atomic writes: a reader sees the old file or the new one, never a part; failures leave nothing."""

import os

import pytest

from glmgym._io import atomic_dir, atomic_path, atomic_write_json, atomic_write_text


def test_text_and_json_replace_the_file_whole(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    atomic_write_json(tmp_path / "b.json", {"x": [1, 2]})
    assert (tmp_path / "b.json").read_text() == '{\n  "x": [\n    1,\n    2\n  ]\n}\n'
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "b.json", "sub"]  # no temp left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target, suffix=".bin") as tmp:
        assert tmp.suffix == ".bin" and tmp.parent == tmp_path
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_written_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a", "x")
    finally:
        os.umask(umask)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_directories_are_replaced_only_when_complete(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_dir(out) as d:
        (d / "w").write_text("1")
    with pytest.raises(ValueError), atomic_dir(out) as d:
        (d / "w").write_text("2")
        raise ValueError
    assert (out / "w").read_text() == "1"
    with atomic_dir(out) as d:
        (d / "w").write_text("3")
    assert (out / "w").read_text() == "3"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
