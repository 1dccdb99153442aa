"""Saving never loses or mixes anything: CompressionResult.save and netshrink.save write every
file in one locked group (report first, artifact last), fail with one-line WriteErrors, and
leave no temp files; two processes saving to one path never leave a mismatched pair."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import multiprocessing
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from torch import nn

import netshrink as ns
import netshrink.fileio as fileio
from netshrink.errors import WriteError
from netshrink.fileio import atomic_write, locked
from netshrink.report import Report


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.fixture(scope="module")
def results():
    """Two results of the same tiny model whose artifacts (and reports) differ."""
    model = _mlp()
    return [ns.compress(model, [ns.step("magnitude", sparsity=s)], latency=False, seed=0)
            for s in (0.5, 0.8)]


@pytest.fixture
def quick_plot(monkeypatch):
    """A plot that takes no time and says whose it is."""
    monkeypatch.setattr(Report, "plot", _quick_plot)


def _quick_plot(self: Report, path: Path) -> Path:
    return atomic_write(path, f"plot of {self.storage_bytes}")


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _refuse(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied")


def test_report_first_artifact_last_under_the_lock(results, tmp_path, monkeypatch, quick_plot):
    renamed = []
    real_replace = os.replace

    def spy(src, dst):
        if not Path(dst).name.startswith("."):  # not the plot's own temp file, say
            renamed.append((Path(dst).name, (tmp_path / ".m.nsk.lock").exists()))
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", spy)
    results[0].save(tmp_path / "m.nsk")
    assert renamed == [("m.report.json", True), ("m.report.png", True), ("m.nsk", True)]
    assert _names(tmp_path) == ["m.nsk", "m.report.json", "m.report.png"]
    assert (tmp_path / "m.nsk").read_bytes() == results[0].artifact
    assert Report.load_json(tmp_path / "m.report.json") == results[0].report


def test_real_plot_lands_beside_its_report_with_no_temp_files(results, tmp_path):
    path = results[1].save(tmp_path / "m.nsk")
    assert _names(tmp_path) == ["m.nsk", "m.report.json", "m.report.png"]
    assert (tmp_path / "m.report.png").read_bytes().startswith(b"\x89PNG")
    assert stat.S_IMODE((tmp_path / "m.report.png").stat().st_mode) == fileio._default_mode()
    assert path.read_bytes() == results[1].artifact


def test_save_onto_a_directory_writes_nothing(results, tmp_path, quick_plot):
    (tmp_path / "m.nsk").mkdir()
    with pytest.raises(WriteError, match=r"^cannot write .*m\.nsk: is a directory \(give a"):
        results[0].save(tmp_path / "m.nsk")
    assert _names(tmp_path) == ["m.nsk"]  # not even the report


@pytest.mark.parametrize("where", ["mkstemp", "replace"])
def test_save_refused_by_the_folder_keeps_the_old_files(
    results, tmp_path, monkeypatch, quick_plot, where
):
    results[0].save(tmp_path / "m.nsk")
    before = {name: (tmp_path / name).read_bytes() for name in _names(tmp_path)}
    monkeypatch.setattr(*((fileio.tempfile, "mkstemp") if where == "mkstemp"
                          else (fileio.os, "replace")), _refuse)
    with pytest.raises(WriteError, match=r"^cannot write .*: permission denied \(choose a folder"):
        results[1].save(tmp_path / "m.nsk")
    assert {name: (tmp_path / name).read_bytes() for name in _names(tmp_path)} == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_save_into_a_read_only_folder(results, tmp_path, quick_plot):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(WriteError, match=r"cannot write .*m\.nsk: permission denied"):
            results[0].save(folder / "m.nsk")
        with pytest.raises(WriteError, match=r"cannot write .*m\.nsk: permission denied"):
            ns.save(_mlp(), folder / "m.nsk")
        assert _names(folder) == []
    finally:
        folder.chmod(0o700)


def test_a_failed_plot_removes_the_old_plot(results, tmp_path, monkeypatch, quick_plot, caplog):
    results[0].save(tmp_path / "m.nsk")

    def no_backend(self, path):
        raise RuntimeError("no backend")

    monkeypatch.setattr(Report, "plot", no_backend)
    with caplog.at_level(logging.WARNING, logger="netshrink"):
        results[1].save(tmp_path / "m.nsk")
    assert "could not draw the report plot: no backend" in caplog.text
    assert _names(tmp_path) == ["m.nsk", "m.report.json"]  # no plot of the other result
    assert (tmp_path / "m.nsk").read_bytes() == results[1].artifact


def test_save_cleans_a_killed_saves_leftovers(results, tmp_path, quick_plot):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # its pid is now a dead writer's
    for name in ("m.nsk", "m.report.json", "m.report.png"):
        (tmp_path / f".{name}.{proc.pid}.abcd1234.tmp").write_bytes(b"half")
    results[0].save(tmp_path / "m.nsk")
    assert _names(tmp_path) == ["m.nsk", "m.report.json", "m.report.png"]


def test_plain_module_saves_the_same_way(tmp_path, monkeypatch):
    model = _mlp()
    (tmp_path / "dir.nsk").mkdir()
    with pytest.raises(WriteError, match=r"cannot write .*dir\.nsk: is a directory"):
        ns.save(model, tmp_path / "dir.nsk")
    locked_at_rename = []
    real_replace = os.replace

    def spy(src, dst):
        locked_at_rename.append((tmp_path / ".m.nsk.lock").exists())
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", spy)
    path = ns.save(model, tmp_path / "m.nsk")
    assert locked_at_rename == [True]
    assert _names(tmp_path) == ["dir.nsk", "m.nsk"]
    loaded = ns.load(path)
    assert all((a == b).all() for a, b in zip(loaded.state_dict().values(),
                                               model.state_dict().values()))
    monkeypatch.setattr(fileio.os, "replace", _refuse)
    with pytest.raises(WriteError, match="permission denied"):
        ns.save(model, tmp_path / "m.nsk")
    assert _names(tmp_path) == ["dir.nsk", "m.nsk"]


# --- two savers on one path -----------------------------------------------------------------

def _save_rounds(result, path: str, barrier, rounds: int) -> None:
    """Save ``result`` to ``path`` ``rounds`` times, each round started together with the
    other saver."""
    for _ in range(rounds):
        barrier.wait(timeout=60)
        result.save(path)


def _saver(result, path: str, barrier, rounds: int) -> None:
    """:func:`_save_rounds` in a spawned process."""
    Report.plot = _quick_plot  # the real plot takes ~0.1 s; what it draws does not matter here
    _save_rounds(result, path, barrier, rounds)


def _mismatch(path: Path, reports: dict[str, dict]) -> str | None:
    """Why the files at ``path`` are not one result's artifact, report and plot, or None."""
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        report = json.loads(path.with_suffix(".report.json").read_text())
        plot = path.with_suffix(".report.png").read_text()
    except FileNotFoundError as exc:
        return f"{Path(exc.filename).name} is missing"
    if report.get("artifact_sha256", digest) != digest:
        return "the report's artifact_sha256 is not the artifact's"
    if report != reports[digest]:
        return f"artifact of {reports[digest]['storage_bytes']} B beside the report of another"
    if plot != f"plot of {report['storage_bytes']}":
        return f"{plot!r} beside the report of {report['storage_bytes']} B"
    return None


def _watch(path: Path, savers: list, results) -> None:
    """While ``savers`` run, read ``path`` under the lock (a reader that takes it sees whole
    groups only) and check each snapshot; then check what they left."""
    reports = {hashlib.sha256(r.artifact).hexdigest(): json.loads(json.dumps(
        r.report.to_dict(), default=str)) for r in results}
    seen, problems, deadline = 0, [], time.monotonic() + 120
    while any(s.is_alive() for s in savers) and time.monotonic() < deadline:
        with locked(path):
            if path.exists():
                seen += 1
                problems.append(_mismatch(path, reports))
        time.sleep(0.002)
    for saver in savers:
        saver.join(timeout=10)
    assert _mismatch(path, reports) is None
    assert [p for p in problems if p] == []
    assert seen > 0
    assert _names(path.parent) == ["m.nsk", "m.report.json", "m.report.png"]


def test_two_threads_saving_to_one_path_never_mix(results, tmp_path, quick_plot):
    pytest.importorskip("fcntl")
    path, barrier, errors = tmp_path / "m.nsk", threading.Barrier(2), []

    def run(result) -> None:
        try:
            _save_rounds(result, str(path), barrier, 20)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    savers = [threading.Thread(target=run, args=(r,)) for r in results]
    for saver in savers:
        saver.start()
    _watch(path, savers, results)
    assert errors == []


@pytest.mark.slow  # ~8 s on an idle 2-core machine (each process imports torch); more if busy
def test_two_processes_saving_to_one_path_never_mix(results, tmp_path):
    pytest.importorskip("fcntl")
    path = tmp_path / "m.nsk"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    savers = [ctx.Process(target=_saver, args=(r, str(path), barrier, 12)) for r in results]
    for saver in savers:
        saver.start()
    _watch(path, savers, results)
    assert [saver.exitcode for saver in savers] == [0, 0]
