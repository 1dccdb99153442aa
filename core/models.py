"""Models by spec through the registry (:func:`load_model`) and trained reference models, cached
on disk (:func:`reference_model`).

A reference cache file is safetensors whose metadata holds the cache key (the settings as JSON)
and a SHA-256 over the key and every tensor; a file that fails any check (foreign key, checksum,
truncated, not safetensors, tensors that do not fit the model, non-finite values) is rebuilt
with a warning. Reference training writes a resumable checkpoint next to the cache file after
every epoch, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netshrink import datasets
from netshrink.adapters import model_info, parse_spec, set_model_info
from netshrink.checkedfile import check_like, read_checked, write_checked
from netshrink.data import DataSplits
from netshrink.errors import ArtifactError
from netshrink.fileio import cache_dir
from netshrink.registry import get_model_adapter
from netshrink.training import CheckpointPolicy, FinetuneConfig, train

log = logging.getLogger("netshrink")

TRAINING_VERSION = 1  # bump when reference training changes, to invalidate caches
REFERENCE_EPOCHS = {"lenet300": 20, "lenet5": 15, "vgg_small": 20, "resnet_small": 20}
REFERENCE_FORMAT = "netshrink-reference/1"


def load_model(spec: str, **options: Any) -> nn.Module:
    """Build a model from a spec string; the result carries its :class:`ModelInfo`.

    ``options`` override options in the spec's query string, e.g.
    ``load_model("timm:resnet18", in_chans=1, num_classes=10)``.
    """
    prefix, name, spec_options = parse_spec(spec)
    adapter = get_model_adapter(prefix)
    model, info = adapter.load(name, **{**spec_options, **options})
    set_model_info(model, info)
    return model


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def reference_model(
    spec: str,
    data: DataSplits | str,
    *,
    seed: int = 0,
    epochs: int | None = None,
    lr: float = 1e-3,
    **options: Any,
) -> nn.Module:
    """A model built from ``spec`` and trained on ``data`` (cached on disk, keyed by spec,
    options, the data's name and its train and val sizes, seed and training settings; for a
    ``file:`` spec also by the file's SHA-256). Training takes seconds for the zoo models,
    prints one line per epoch when output is not a terminal, and resumes after an
    interruption. The result depends only on the arguments: the global torch RNG is seeded
    with ``seed`` first.

    A cache file that fails a check (written for other settings, checksum mismatch,
    truncated, tensors that do not fit the model, non-finite values) is rebuilt with a warning.
    """
    data = datasets.load(data)
    opts = {**data.model_options(), **options}
    torch.manual_seed(seed)
    model = load_model(spec, **opts)
    info = model_info(model)
    prefix, name, _ = parse_spec(spec)
    epochs = epochs if epochs is not None else REFERENCE_EPOCHS.get(name, 15)
    settings: dict[str, Any] = {
        "spec": spec,
        "options": info.options if info else opts,
        "data": data.name,
        # A subset that keeps its name (data.name is the content's identity) trains anew.
        "sizes": [len(data.train), len(data.val)],
        "seed": seed,
        "epochs": epochs,
        "lr": lr,
        "v": TRAINING_VERSION,
    }
    if prefix == "file":  # the same path may hold other weights tomorrow
        settings["file_sha256"] = file_sha256(name)
    key = json.dumps(settings, sort_keys=True)
    path = _cache_path(spec, data.name, key)
    if path.is_file() and _load_cached(model, path, key):
        model.eval()
        return model
    train(
        model,
        data,
        FinetuneConfig(epochs=epochs, lr=lr),
        seed=seed,
        desc=f"training reference {spec} on {data.name}",
        checkpoint=CheckpointPolicy(path=path.with_name(f"{path.stem}.resume.safetensors"),
                                    run_key=key),
        epoch_lines=True,
    )
    write_checked(path, model.state_dict(), fmt=REFERENCE_FORMAT, key=key)
    model.eval()
    return model


def _cache_path(spec: str, data_name: str, key: str) -> Path:
    """``$NETSHRINK_CACHE/reference/<spec>-<data>-<digest of key>.safetensors``."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() else "_" for c in f"{spec}-{data_name}")
    return cache_dir() / "reference" / f"{safe}-{digest}.safetensors"


def _load_cached(model: nn.Module, path: Path, key: str) -> bool:
    """Load the cached weights at ``path`` into ``model`` if every check passes; else warn
    (naming the file and the reason), leave ``model`` as it was and return False."""
    expected = model.state_dict()
    payload = sum(t.numel() * t.element_size() for t in expected.values())
    limit = payload + (1 << 20) + 512 * len(expected)  # the tensors, a generous header
    try:
        tensors, _ = read_checked(path, fmt=REFERENCE_FORMAT, key=key, max_bytes=limit)
        check_like(path, tensors, expected)
        bad = [n for n, t in tensors.items() if t.is_floating_point() and not t.isfinite().all()]
        if bad:
            raise ArtifactError(f"{path}: non-finite values in {', '.join(bad[:3])}")
    except ArtifactError as exc:
        log.warning("reference cache unusable: %s; retraining and rewriting it", exc)
        return False
    model.load_state_dict(tensors)
    return True
