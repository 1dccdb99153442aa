"""Writing files so that nothing is lost or mixed.

Every write goes to a hidden temp file in the target folder (``.<name>.<pid>.<random>.tmp``),
is flushed to disk, and replaces the target in one rename. :class:`FileGroup` renames several
such files together, and :func:`locked` keeps a second saver to the same path waiting until the
first one's group is in place. Temp files left by a killed writer are removed by the next write
to the same target. Every failure is a :class:`~netshrink.errors.WriteError` naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

from netshrink.errors import WriteError

try:  # POSIX; where it is missing (Windows) locked() does not lock
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("netshrink")

#: A temp file untouched for this long is a leftover whatever its pid says: pids are reused
#: (in containers most of all) and no write takes a day.
STALE_AFTER_S = 24 * 3600

# What to do about the usual reasons a write fails, by errno.
_HINTS = {
    errno.EACCES: "choose a folder you can write to",
    errno.EPERM: "choose a folder you can write to",
    errno.EROFS: "the file system is read-only; choose another folder",
    errno.EISDIR: "give a file name, not a folder",
    errno.ENOSPC: "free some disk space",
}
# A file system without locks: save unlocked rather than not at all.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)  # elsewhere: set and restore (briefly visible to other threads)
    os.umask(mask)
    return mask


def _default_mode() -> int:
    """The mode ``open()`` would give a new file: 0o666 less the process umask."""
    return 0o666 & ~_umask()


def _write_error(path: Path, exc: OSError, what: str = "") -> WriteError:
    """One line naming ``path``, the reason and, for the usual reasons, what to do."""
    if isinstance(exc, WriteError) and getattr(exc, "path", None) == path:
        return exc
    # a WriteError about a temp file (a writer given one by FileGroup.write_with) is retold
    # about the target
    reason = getattr(exc, "reason", None) or exc.strerror or str(exc) or type(exc).__name__
    reason = what + reason[:1].lower() + reason[1:]
    hint = _HINTS.get(exc.errno) if exc.errno is not None else None
    error = WriteError(f"cannot write {path}: {reason}" + (f" ({hint})" if hint else ""))
    error.errno = exc.errno  # callers that check errno (EACCES, ENOSPC) still can
    error.path, error.reason = path, reason
    return error


def _pid_alive(pid: int) -> bool | None:
    """Whether process ``pid`` exists; None where that cannot be told."""
    if os.name != "posix" or pid <= 0:  # on Windows os.kill(pid, 0) would end the process
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    except (OSError, OverflowError):
        return None
    return True


def _temp_pattern(path: Path) -> re.Pattern[str]:
    """Temp names of ``path``: ``.<name>.<pid>.<random>.tmp``, or ``.<name>.<random>.tmp``
    as written before temp names carried a pid (``random`` never holds a dot)."""
    return re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)\.)?[a-z0-9_]+\.tmp")


def remove_leftovers(path: str | Path) -> list[Path]:
    """Remove temp files of ``path`` left by writers that died, and return them.

    A temp file goes when its writer's pid is no longer alive, or when it is older than
    :data:`STALE_AFTER_S` (where the pid cannot be checked, or was reused); a live writer's
    file is kept. Best effort: what cannot be read or removed is left alone.
    """
    path = Path(path)
    pattern, now, removed = _temp_pattern(path), time.time(), []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        alive = _pid_alive(int(match[1])) if match[1] else None
        if alive is False or age > STALE_AFTER_S:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    if removed:
        log.debug("removed %d leftover temp file(s) of %s", len(removed), path)
    return removed


def _reserve(path: Path) -> tuple[int, Path]:
    """A new empty temp file next to ``path`` (open descriptor, path), after checking that
    ``path`` can be a file, creating its folder and removing dead writers' leftovers."""
    if path.is_dir():
        raise _write_error(path, IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR)))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(path, exc, f"cannot create its folder {path.parent}: ") from None
    remove_leftovers(path)
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent
        )
    except OSError as exc:
        raise _write_error(path, exc) from None
    return fd, Path(tmp)


def _settle(tmp: Path, fd: int | None = None) -> None:
    """Flush ``tmp`` (open as ``fd``, else opened here) to disk and give it the usual
    permissions (not the temp file's 0600)."""
    if fd is None:
        # POSIX fsyncs a read-only descriptor (the file may be read-only by now); Windows not
        own = os.open(tmp, os.O_RDONLY if os.name == "posix" else os.O_RDWR)
        try:
            os.fsync(own)
        finally:
            os.close(own)
    else:
        os.fsync(fd)
    os.chmod(tmp, _default_mode())


@contextlib.contextmanager
def _staged(path: Path, tmp: Path) -> Iterator[None]:
    """Writing ``tmp`` for ``path``: on any failure the temp file is removed, and an OSError
    becomes a :class:`WriteError` naming ``path``."""
    try:
        yield
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class FileGroup:
    """Files replaced together: each is written under a temp name next to its target, and
    only once all are written are they renamed into place, in the order they were added.

    Use it as a context manager. A clean exit renames (holding :func:`locked` on ``lock``
    while it does, if given); an exception removes the temp files and leaves every target as
    it was. Example::

        with FileGroup(lock="m.nsk") as group:
            group.write("m.report.json", report_text)
            group.write("m.nsk", artifact)  # last: once it is in place, so is its report
    """

    def __init__(self, lock: str | Path | None = None) -> None:
        self._lock = Path(lock) if lock is not None else None
        self._steps: list[tuple[Path | None, Path]] = []  # (temp file or None to delete, target)

    def write(self, path: str | Path, data: bytes | str) -> None:
        """Stage ``data`` (text is UTF-8 encoded) for ``path``."""
        path = Path(path)
        payload = data.encode() if isinstance(data, str) else data
        fd, tmp = _reserve(path)
        with _staged(path, tmp), os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            _settle(tmp, fh.fileno())
        self._steps.append((tmp, path))

    def write_with(self, path: str | Path, writer: Callable[[Path], object]) -> None:
        """Stage what ``writer`` writes for ``path``: it is called with a temp path next to
        ``path`` (e.g. a method that saves a figure). Its exceptions propagate (an OSError
        as a WriteError naming ``path``), with the temp file removed."""
        path = Path(path)
        fd, tmp = _reserve(path)
        os.close(fd)
        with _staged(path, tmp):
            writer(tmp)
            _settle(tmp)
        self._steps.append((tmp, path))

    def remove(self, path: str | Path) -> None:
        """Delete ``path``, if it exists, at its turn among the renames (a stale file that
        must not stay next to the new ones)."""
        self._steps.append((None, Path(path)))

    def discard(self) -> None:
        """Remove every staged temp file; the targets stay as they were."""
        for tmp, _ in self._steps:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        self._steps.clear()

    def commit(self) -> None:
        """Rename every staged file into place, in order (under the lock, if one was given)."""
        if not self._steps:
            return
        lock = locked(self._lock) if self._lock is not None else contextlib.nullcontext()
        try:
            with lock:
                while self._steps:
                    tmp, path = self._steps[0]
                    try:
                        if tmp is None:
                            path.unlink(missing_ok=True)
                        else:
                            os.replace(tmp, path)
                    except OSError as exc:
                        raise _write_error(path, exc) from None
                    self._steps.pop(0)
        finally:
            self.discard()

    def __enter__(self) -> FileGroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically and return the path.

    The bytes go to a hidden temp file in the same folder (``.<name>.<pid>.<random>.tmp``), are
    flushed to disk, get the usual permissions (not the temp file's 0600), and replace ``path``
    in one rename: readers see the old file or the new one, never a partial one. Missing parent
    folders are created; temp files of ``path`` left by dead writers are removed (see
    :func:`remove_leftovers`). A failure raises :class:`~netshrink.errors.WriteError` (an
    ``OSError``) naming the path and the reason, leaves the old file as it was and no temp file.
    """
    path = Path(path)
    with FileGroup() as group:
        group.write(path, data)
    return path


def _lock_fd(path: Path, lock: Path) -> int | None:
    """Open and flock ``lock`` (waiting for another holder), retrying if the file was removed
    meanwhile by a releasing holder; None where the file system has no locks."""
    assert fcntl is not None
    while True:
        try:  # read-only is enough for flock, and works on another user's lock file
            fd = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _write_error(path, exc) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another save to %s to finish", path)
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            os.close(fd)
            if exc.errno in _NO_LOCKS:
                log.warning("cannot lock %s (%s): saving without a lock", path, exc.strerror)
                with contextlib.suppress(OSError):
                    lock.unlink()
                return None
            raise _write_error(path, exc) from None
        except BaseException:  # e.g. Ctrl-C while waiting
            os.close(fd)
            raise
        try:
            held, now = os.fstat(fd), os.stat(lock)
            if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # we locked a file its holder removed on release: lock the new one


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for a group of writes: a second holder, in another
    process or thread, waits until the first leaves the block.

    The lock is ``fcntl.flock`` on a hidden ``.<name>.lock`` file in the folder of ``path``
    (created, with the folder, if missing, and removed on release). It is advisory: it keeps
    out only writers that take it too, as every netshrink save does. Where ``fcntl`` is missing
    (Windows) or the file system has no locks, nothing is locked. Not re-entrant: do not take
    it again inside the block. A folder that cannot be written raises
    :class:`~netshrink.errors.WriteError` naming ``path``.
    """
    path = Path(path)
    if fcntl is None:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(path, exc, f"cannot create its folder {path.parent}: ") from None
    lock = path.parent / f".{path.name}.lock"
    fd = _lock_fd(path, lock)
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):  # while held, so a waiter sees it went
                lock.unlink()
            os.close(fd)


def cache_dir() -> Path:
    """Where netshrink caches what it rebuilds on demand (reference weights, search checkpoints):
    ``$NETSHRINK_CACHE`` or ``~/.cache/netshrink``."""
    root = os.environ.get("NETSHRINK_CACHE") or Path.home() / ".cache" / "netshrink"
    return Path(root)
