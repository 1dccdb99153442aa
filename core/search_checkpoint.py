"""The sensitivity scan's checkpoint: its key (the scan's identity), and the file written
atomically with a checksum and read back only when intact and for the same scan.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netshrink.data import DataSplits
from netshrink.fileio import atomic_write, cache_dir

log = logging.getLogger("netshrink")

_CHECKPOINT_VERSION = 1


def _state_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        # reshape: a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _checkpoint_key(
    model: nn.Module, data: DataSplits, val_limit: int, seed: int, keys: list[str],
    latency: str | None = None,
) -> str:
    """The scan's identity; ``latency`` (how latency is timed) is part of it only when the scan
    times latency, so a timed scan never reuses an untimed one's checkpoint and an untimed
    scan keeps the key it always had."""
    body: list[Any] = [
        _CHECKPOINT_VERSION, _state_digest(model), data.name, len(data.val), val_limit, seed, keys
    ]
    if latency is not None:
        body.append(latency)
    return hashlib.sha256(json.dumps(body).encode()).hexdigest()


def _entries_digest(entries: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def read_checkpoint(path: Path, key: str) -> dict[str, dict[str, Any]]:
    """The entries of a scan checkpoint if it is intact and for this scan, else ``{}`` (a
    damaged or foreign file is reported in the log and ignored: the scan starts over)."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
        entries = raw["entries"]
        ok = (
            raw.get("version") == _CHECKPOINT_VERSION
            and raw.get("key") == key
            and isinstance(entries, dict)
            and raw.get("sha256") == _entries_digest(entries)
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("search: ignoring unreadable scan checkpoint %s (%s)", path, exc)
        return {}
    if not ok:
        log.warning("search: ignoring scan checkpoint %s (another scan's, or damaged)", path)
        return {}
    return entries


def write_checkpoint(path: Path, key: str, entries: dict[str, dict[str, Any]]) -> None:
    """Write the scan's entries atomically, with a checksum :func:`read_checkpoint` verifies."""
    body = {
        "version": _CHECKPOINT_VERSION,
        "key": key,
        "sha256": _entries_digest(entries),
        "entries": entries,
    }
    atomic_write(path, json.dumps(body, sort_keys=True))


def _checkpoint_path(checkpoint: bool | str | Path, key: str) -> Path | None:
    if checkpoint is False:
        return None
    if checkpoint is True:
        return cache_dir() / "search" / f"scan-{key[:24]}.json"
    return Path(checkpoint)


__all__ = [
    "read_checkpoint",
    "write_checkpoint",
]
