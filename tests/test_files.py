"""Atomic writes: the final name holds the old version or the complete new one, never part of one."""

import pytest

from mmalign.files import write_atomic, write_text_atomic


def test_a_text_file_is_written_and_replaced(tmp_path):
    path = tmp_path / "deep" / "summary.json"
    assert write_text_atomic(path, "{}\n") == path
    write_text_atomic(path, '{"done": true}\n')
    assert path.read_text() == '{"done": true}\n'
    assert sorted(p.name for p in path.parent.iterdir()) == ["summary.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_text_atomic(tmp_path / "summary.json", "old")

    def half_then_fail(tmp):
        tmp.write_text('{"before": ')
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        write_atomic(path, half_then_fail)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_folder_replaces_a_folder_whole(tmp_path):
    def export(files):
        def write(tmp):
            tmp.mkdir()
            (tmp / "sub").mkdir()
            for name in files:
                (tmp / "sub" / name).write_text(name)
        return write

    out = write_atomic(tmp_path / "lora", export(["a", "b"]))
    write_atomic(out, export(["c"]))
    assert sorted(p.name for p in (out / "sub").iterdir()) == ["c"]  # nothing of the old export is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]


def test_a_temporary_left_by_a_killed_write_is_removed_by_the_next(tmp_path):
    (tmp_path / ".tmp-lora").mkdir()
    (tmp_path / ".tmp-lora" / "half.safetensors").write_bytes(b"\0")
    write_atomic(tmp_path / "lora", lambda tmp: (tmp.mkdir(), (tmp / "whole").write_text("x")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == ["whole"]
