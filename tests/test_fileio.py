"""atomic_write: all or nothing, usual permissions, parents created."""

from __future__ import annotations

import os
import stat

import pytest

import netshrink.fileio as fileio
from netshrink.fileio import atomic_write


def test_writes_bytes_and_text_creating_parents(tmp_path):
    target = tmp_path / "a" / "b" / "out.bin"
    assert atomic_write(target, b"\x00\x01") == target
    assert target.read_bytes() == b"\x00\x01"
    atomic_write(target, "text")
    assert target.read_text() == "text"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]


def test_permissions_follow_the_umask_not_the_temp_file(tmp_path):
    old = os.umask(0o022)
    try:
        target = atomic_write(tmp_path / "m.nsk", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "keep.json"
    target.write_text("previous")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, "new")
    assert target.read_text() == "previous"
    assert list(tmp_path.iterdir()) == [target]
