"""Files appear whole or not at all: atomic_file replaces the target only when the writer finishes."""

import pytest

from surgery.atomic import atomic_file, atomic_write_text


def test_atomic_file_replaces_on_success_and_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "first")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer died")
    assert target.read_text() == "first"  # the old content survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # and no temporary is left behind
    atomic_write_text(target, "second ü")
    assert target.read_text(encoding="utf-8") == "second ü"
