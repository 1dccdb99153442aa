"""Writing files so that nothing is lost: a temp file in the target folder, then a rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically and return the path.

    The bytes go to a hidden temp file in the same folder, are flushed to disk, get the usual
    permissions (not the temp file's 0600), and replace ``path`` in one rename: readers see the
    old file or the new one, never a partial one, and a failed write leaves the old file as it
    was. Missing parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def cache_dir() -> Path:
    """Where netshrink caches what it rebuilds on demand (reference weights, search checkpoints):
    ``$NETSHRINK_CACHE`` or ``~/.cache/netshrink``."""
    root = os.environ.get("NETSHRINK_CACHE") or Path.home() / ".cache" / "netshrink"
    return Path(root)
