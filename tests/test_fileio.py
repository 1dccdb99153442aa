"""atomic_write, FileGroup and locked: all or nothing, usual permissions, parents created, no
leftovers of killed writers, one-line WriteErrors, and a lock that keeps a second saver out."""

from __future__ import annotations

import errno
import os
import re
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import netshrink.fileio as fileio
from netshrink.errors import NetshrinkError, WriteError
from netshrink.fileio import FileGroup, atomic_write, locked


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


# --- leftovers of killed writers ------------------------------------------------------------

def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temp_names_carry_the_writers_pid(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(Path(src).name)
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", spy)
    atomic_write(tmp_path / "m.nsk", b"x")
    assert len(seen) == 1
    assert re.fullmatch(rf"\.m\.nsk\.{os.getpid()}\.[a-z0-9_]+\.tmp", seen[0]), seen


def test_leftover_of_a_dead_writer_is_removed(tmp_path):
    leftover = tmp_path / f".m.nsk.{_dead_pid()}.abcd1234.tmp"
    leftover.write_bytes(b"half an artifact")
    atomic_write(tmp_path / "m.nsk", b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.nsk"]


def test_leftovers_of_live_writers_and_other_targets_are_kept(tmp_path):
    dead = _dead_pid()
    kept = [
        tmp_path / f".m.nsk.{os.getpid()}.abcd1234.tmp",  # this process: maybe another thread
        tmp_path / f".m.nsk.{os.getppid()}.abcd1234.tmp",  # another live process
        tmp_path / ".m.nsk.abcd1234.tmp",  # old name without a pid, less than a day old
        tmp_path / f".other.nsk.{dead}.abcd1234.tmp",  # another target's
        tmp_path / f".m.nsk.x.{dead}.abcd1234.tmp",  # the temp file of target 'm.nsk.x'
    ]
    for path in kept:
        path.write_bytes(b"busy")
    atomic_write(tmp_path / "m.nsk", b"x")
    assert all(path.exists() for path in kept)


def test_day_old_leftovers_go_whatever_their_pid(tmp_path):
    day_old = time.time() - fileio.STALE_AFTER_S - 60
    old = [tmp_path / ".m.nsk.abcd1234.tmp", tmp_path / f".m.nsk.{os.getppid()}.abcd1234.tmp"]
    for path in old:
        path.write_bytes(b"stale")
        os.utime(path, (day_old, day_old))
    assert sorted(fileio.remove_leftovers(tmp_path / "m.nsk")) == sorted(old)
    assert list(tmp_path.iterdir()) == []


# --- failures are WriteErrors naming the path, with nothing left behind ---------------------

def _disk_full(*args, **kwargs):
    raise OSError("disk full")


def test_failure_is_a_write_error_naming_the_path(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio.os, "fsync", _disk_full)
    with pytest.raises(WriteError, match=r"^cannot write .*m\.nsk: disk full$") as info:
        atomic_write(tmp_path / "m.nsk", b"x")
    assert isinstance(info.value, NetshrinkError) and isinstance(info.value, OSError)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "m.nsk").write_bytes(b"old")
    folder.chmod(0o500)
    try:
        with pytest.raises(WriteError, match=r"cannot write .*m\.nsk: permission denied \("):
            atomic_write(folder / "m.nsk", b"new")
        assert (folder / "m.nsk").read_bytes() == b"old"
        assert sorted(p.name for p in folder.iterdir()) == ["m.nsk"]
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize("where", ["mkstemp", "replace"])
def test_permission_denied_simulated(tmp_path, monkeypatch, where):
    """Root ignores folder permissions, so the refusal is simulated where the OS would raise."""

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    if where == "mkstemp":
        monkeypatch.setattr(fileio.tempfile, "mkstemp", refuse)
    else:
        monkeypatch.setattr(fileio.os, "replace", refuse)
    (tmp_path / "m.nsk").write_bytes(b"old")
    with pytest.raises(WriteError) as info:
        atomic_write(tmp_path / "m.nsk", b"new")
    assert str(info.value) == (
        f"cannot write {tmp_path / 'm.nsk'}: permission denied (choose a folder you can write to)"
    )
    assert info.value.errno == errno.EACCES
    assert (tmp_path / "m.nsk").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.nsk"]


def test_directory_as_the_target(tmp_path):
    (tmp_path / "m.nsk").mkdir()
    with pytest.raises(WriteError, match=r"cannot write .*m\.nsk: is a directory \(give a file"):
        atomic_write(tmp_path / "m.nsk", b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["m.nsk"]
    assert list((tmp_path / "m.nsk").iterdir()) == []


def test_a_file_in_the_way_of_the_folder(tmp_path):
    (tmp_path / "a").write_text("a file")
    with pytest.raises(WriteError, match=r"cannot write .*out\.bin: cannot create its folder"):
        atomic_write(tmp_path / "a" / "b" / "out.bin", b"x")
    assert (tmp_path / "a").read_text() == "a file"


# --- groups: all or nothing, in order -------------------------------------------------------

def test_group_renames_in_order_only_after_all_are_written(tmp_path, monkeypatch):
    renamed = []
    real_replace = os.replace

    def spy(src, dst):
        renamed.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", spy)
    (tmp_path / "m.report.png").write_bytes(b"stale plot")
    with FileGroup() as group:
        group.write(tmp_path / "m.report.json", "{}")
        group.write_with(tmp_path / "m.extra", lambda tmp: tmp.write_bytes(b"written by a writer"))
        group.remove(tmp_path / "m.report.png")
        group.write(tmp_path / "m.nsk", b"artifact")
        assert renamed == []  # nothing visible before the group is complete
    assert renamed == ["m.report.json", "m.extra", "m.nsk"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.extra", "m.nsk", "m.report.json"]
    assert stat.S_IMODE((tmp_path / "m.extra").stat().st_mode) == fileio._default_mode()


def test_group_failure_changes_nothing(tmp_path):
    (tmp_path / "m.nsk").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="plot failed"), FileGroup() as group:
        group.write(tmp_path / "m.report.json", "{}")
        group.write(tmp_path / "m.nsk", b"new")
        raise RuntimeError("plot failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.nsk"]
    assert (tmp_path / "m.nsk").read_bytes() == b"old"


def test_writer_failure_names_the_target_not_the_temp_file(tmp_path, monkeypatch):
    group = FileGroup()
    monkeypatch.setattr(fileio.os, "fsync", _disk_full)
    with pytest.raises(WriteError) as info:
        group.write_with(tmp_path / "m.json", lambda tmp: atomic_write(tmp, "{}"))
    assert str(info.value) == f"cannot write {tmp_path / 'm.json'}: disk full"
    assert list(tmp_path.iterdir()) == []


# --- the lock -------------------------------------------------------------------------------

_TRY_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    print("busy")
else:
    print("free")
"""


def test_lock_excludes_another_process(tmp_path):
    pytest.importorskip("fcntl")
    target = tmp_path / "m.nsk"
    lock_file = tmp_path / ".m.nsk.lock"
    with locked(target):
        assert lock_file.exists()
        probe = subprocess.run([sys.executable, "-c", _TRY_LOCK, str(lock_file)],
                               capture_output=True, text=True, check=True, timeout=60)
        assert probe.stdout.strip() == "busy"
    assert not lock_file.exists()  # removed on release
    lock_file.touch()  # a lock file left by a killed holder is no obstacle
    with locked(target):
        probe = subprocess.run([sys.executable, "-c", _TRY_LOCK, str(lock_file)],
                               capture_output=True, text=True, check=True, timeout=60)
        assert probe.stdout.strip() == "busy"
    assert list(tmp_path.iterdir()) == []


def test_lock_excludes_other_threads_across_lock_file_removals(tmp_path):
    """Waiters that were queued on a lock file its holder removed must not hold the lock
    together with a newcomer who created the next one."""
    pytest.importorskip("fcntl")
    target, inside, overlaps = tmp_path / "m.nsk", [], []

    def work() -> None:
        for _ in range(40):
            with locked(target):
                inside.append(1)
                if len(inside) > 1:
                    overlaps.append(len(inside))
                time.sleep(0.0005)
                inside.pop()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert overlaps == []
    assert list(tmp_path.iterdir()) == []


def test_lock_in_a_read_only_folder_is_a_write_error(tmp_path, monkeypatch):
    pytest.importorskip("fcntl")

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(fileio.os, "open", refuse)
    with (pytest.raises(WriteError, match=r"cannot write .*m\.nsk: permission denied"),
          locked(tmp_path / "m.nsk")):
        pass
