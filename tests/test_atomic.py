"""Atomic writes: a failed write leaves the previous file whole and no temporary file behind."""

from __future__ import annotations

import pytest

from fedsparse.atomic import write_atomic, write_text_atomic


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = write_text_atomic(tmp_path / "summary.json", "old")

    def half_then_crash(f):
        f.write(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half_then_crash)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary left behind
    write_text_atomic(path, "new")
    assert path.read_text() == "new"
