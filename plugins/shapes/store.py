"""The on-disk cache of generated shapes: one safetensors file per parameter set, verified on load.

The file is untrusted input: it is read with safetensors (no pickle), and used only if its
metadata names the same generator version and parameters, every tensor has the expected name,
dtype and shape, labels are in range, and a SHA-256 over the parameters and all tensor bytes
matches the one recorded at build time. Anything else (a truncated, edited or foreign file) is
logged and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from netshrink import atomic_write, cache_dir
from netshrink.plugins.shapes.generator import CLASSES, GENERATOR_VERSION, generate

log = logging.getLogger("netshrink.shapes")

SPLITS = ("train", "val", "test")
_FORMAT = "netshrink.shapes"


def cache_path(params: dict[str, Any]) -> Path:
    """Where the dataset with ``params`` is cached (under ``netshrink.cache_dir()``)."""
    key = json.dumps(params, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    name = f"shapes-v{GENERATOR_VERSION}-{params['size']}px-seed{params['seed']}-{digest}"
    return cache_dir() / "datasets" / f"{name}.safetensors"


def _digest(params: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].contiguous().numpy().data)
    return h.hexdigest()


def _expected_shapes(params: dict[str, Any]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    size = params["size"]
    out = {}
    for split in SPLITS:
        n = params[f"n_{split}"]
        out[f"x_{split}"] = (torch.uint8, (n, 3, size, size))
        out[f"y_{split}"] = (torch.int64, (n,))
    return out


def build(params: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Render every split for ``params`` (no cache)."""
    tensors = {}
    for split in SPLITS:
        x, y = generate(params["size"], params[f"n_{split}"], params["seed"], split)
        tensors[f"x_{split}"], tensors[f"y_{split}"] = x, y
    return tensors


def read(path: Path, params: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str] | None:
    """The cached tensors and their verified SHA-256 if ``path`` holds exactly the dataset for
    ``params``, else None (with the reason logged)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            expected = _expected_shapes(params)
            if meta.get("format") != _FORMAT or json.loads(meta.get("params", "null")) != params:
                raise ValueError("written for other parameters or by another generator version")
            if set(fh.keys()) != set(expected):
                raise ValueError(f"unexpected tensors {sorted(fh.keys())}")
            tensors = {key: fh.get_tensor(key) for key in expected}
    except Exception as exc:  # any unreadable file is rebuilt, whatever the library raised
        log.warning("shapes cache %s is unusable (%s); rebuilding", path, exc)
        return None
    problem = None
    for key, (dtype, shape) in expected.items():
        t = tensors[key]
        if t.dtype != dtype or tuple(t.shape) != shape:
            problem = f"{key} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}"
            break
        if key.startswith("y_") and len(t) and (int(t.min()) < 0 or int(t.max()) >= len(CLASSES)):
            problem = f"{key} has labels outside 0..{len(CLASSES) - 1}"
            break
    digest = _digest(params, tensors) if problem is None else ""
    if problem is None and digest != meta.get("sha256"):
        problem = "content does not match its recorded SHA-256"
    if problem is not None:
        log.warning("shapes cache %s is unusable (%s); rebuilding", path, problem)
        return None
    return tensors, digest


def load_or_build(params: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """The dataset for ``params`` and its SHA-256 (over the parameters and every tensor): from
    the verified cache, or rendered and cached atomically."""
    path = cache_path(params)
    cached = read(path, params)
    if cached is not None:
        return cached
    tensors = build(params)
    digest = _digest(params, tensors)
    meta = {"format": _FORMAT, "params": json.dumps(params, sort_keys=True), "sha256": digest}
    try:
        atomic_write(path, st_save(tensors, metadata=meta))
    except OSError as exc:  # a read-only cache still gives a usable dataset
        log.warning("could not cache shapes dataset at %s: %s", path, exc)
    return tensors, digest
