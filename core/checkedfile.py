"""Checksummed safetensors files for what netshrink caches (reference weights, training
checkpoints): written atomically with the key they were made for and a SHA-256 over key,
metadata and tensors; read back only if all of it matches. Never unpickles; reads are bounded."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch

from netshrink.errors import ArtifactError, ConfigError
from netshrink.fileio import atomic_write


def tensors_sha256(key: str, meta: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over ``key``, the ``meta`` entries and every tensor's name, dtype, shape and
    bytes (in name order): what :func:`write_checked` stores and :func:`read_checked` checks."""
    digest = hashlib.sha256(json.dumps([key, sorted(meta.items())]).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # no copy
    return digest.hexdigest()


def write_checked(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    fmt: str,
    key: str,
    meta: Mapping[str, str] | None = None,
) -> Path:
    """Write ``tensors`` atomically as safetensors whose metadata holds ``fmt``, ``key``, the
    ``meta`` entries and their :func:`tensors_sha256`; read it back with :func:`read_checked`."""
    from safetensors.torch import save as st_save

    meta = dict(meta or {})
    if {"format", "key", "sha256"} & meta.keys():
        raise ConfigError("write_checked: meta must not use the names format, key, sha256")
    data = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    header = {**meta, "format": fmt, "key": key, "sha256": tensors_sha256(key, meta, data)}
    return atomic_write(path, st_save(data, metadata=header))


def read_checked(
    path: str | Path, *, fmt: str, key: str, max_bytes: int
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and extra metadata of a file :func:`write_checked` wrote for ``fmt`` and
    ``key``, checksum verified. Never unpickles, and reads at most ``max_bytes`` (and never
    more than the file holds); raises :class:`ArtifactError` saying why a file is unusable."""
    from safetensors.torch import load as st_load

    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ArtifactError(f"{path}: is {size} bytes, more than the {max_bytes} expected")
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    meta = _safetensors_metadata(path, data, max_bytes)
    if "sha256" not in meta:
        raise ArtifactError(f"{path}: has no checksum (written by an older netshrink, or not "
                            "by netshrink)")
    if meta.get("format") != fmt:
        raise ArtifactError(f"{path}: is not a {fmt} file (format {meta.get('format')!r})")
    if meta.get("key") != key:
        raise ArtifactError(f"{path}: was written for other settings (copied from another "
                            "entry, or left over from another run)")
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors' errors share no base class with ours
        raise ArtifactError(f"{path}: is not a readable safetensors file ({exc})") from None
    extra = {k: v for k, v in meta.items() if k not in ("format", "key", "sha256")}
    if tensors_sha256(key, extra, tensors) != meta["sha256"]:
        raise ArtifactError(f"{path}: checksum mismatch (the tensors or metadata were changed "
                            "after writing)")
    return tensors, extra


def _safetensors_metadata(path: Path, data: bytes, max_bytes: int) -> dict[str, str]:
    """The ``__metadata__`` of safetensors ``data``, the header checked against its length."""
    if len(data) > max_bytes:
        raise ArtifactError(f"{path}: holds more than the {max_bytes} bytes expected")
    if len(data) < 8:
        raise ArtifactError(f"{path}: is truncated or not safetensors ({len(data)} bytes)")
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8:
        raise ArtifactError(f"{path}: is truncated or not safetensors (header of {length} "
                            f"bytes in a file of {len(data)})")
    try:
        header = json.loads(data[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ArtifactError(f"{path}: is not safetensors (unreadable header)") from None
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ArtifactError(f"{path}: is not safetensors (malformed header)")
    return meta


def check_like(
    path: str | Path, tensors: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]
) -> None:
    """Raise :class:`ArtifactError` unless ``tensors`` has exactly the names, shapes and dtypes
    of ``like``."""
    missing, extra = sorted(like.keys() - tensors.keys()), sorted(tensors.keys() - like.keys())
    if missing or extra:
        raise ArtifactError(f"{path}: tensors do not match the model (missing {missing[:3]}, "
                            f"unexpected {extra[:3]})")
    for name, ref in like.items():
        got = tensors[name]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise ArtifactError(
                f"{path}: tensor {name!r} is {got.dtype} {tuple(got.shape)}, the model needs "
                f"{ref.dtype} {tuple(ref.shape)}"
            )
