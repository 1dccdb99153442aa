"""What the local-data loaders share: option checking, deterministic splits, fingerprints, and
turning arrays into :class:`netshrink.ArrayDataset` splits."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from netshrink import ArrayDataset, DataError, DataSplits


def check_options(prefix: str, options: dict[str, Any], valid: Iterable[str]) -> None:
    """Refuse options a loader does not know, naming the valid ones."""
    valid = sorted(valid)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise DataError(f"{prefix}: unknown option(s) {unknown}; valid options: {valid}")


def as_int(prefix: str, key: str, value: Any, low: int = 1) -> int:
    """An integer option of at least ``low`` (given as a number or a string)."""
    problem = f"{prefix}: {key} must be an integer >= {low}, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise DataError(problem)
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise DataError(problem) from None
    if out < low or (isinstance(value, float) and value != out):
        raise DataError(problem)
    return out


def as_fraction(prefix: str, key: str, value: Any) -> float:
    """A fraction in [0, 1)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{prefix}: {key} must be a number in [0, 1), got {value!r}") from None
    if not 0 <= out < 1:
        raise DataError(f"{prefix}: {key} must be in [0, 1), got {value!r}")
    return out


def carve(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices ``0..len(labels)-1`` into (kept, carved), with ``round(n * fraction)``
    carved (at least one when ``fraction > 0`` and two or more samples), stratified: each class
    gives its share. Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    keys = np.empty(len(labels))
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        # A random rank within the class, as a quantile; the offset breaks ties across classes.
        keys[idx] = (rng.permutation(len(idx)) + rng.random()) / len(idx)
    n = round(len(labels) * fraction)
    if fraction > 0 and len(labels) > 1:
        n = max(n, 1)
    order = np.argsort(keys, kind="stable")
    return np.sort(order[n:]), np.sort(order[:n])


def file_digest(path: Path, extra: dict[str, Any] | None = None) -> str:
    """SHA-256 of a file's bytes (read in blocks) and of ``extra`` (the options that shape the
    data), so a changed file or option gives a different dataset name."""
    h = hashlib.sha256(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def spec_name(prefix: str, target: str, digest: str) -> str:
    """A short dataset name: the prefix, the target's last component and a content digest
    (reference models are cached by dataset name, so it must change with the content)."""
    leaf = Path(target).name or target
    return f"{prefix}:{leaf}@{digest[:12]}"


def to_nchw(prefix: str, x: torch.Tensor, layout: str | None) -> torch.Tensor:
    """Images as ``(N, C, H, W)``: ``(N, H, W)`` gains a channel; ``(N, H, W, C)`` with C in
    1, 3 or 4 is permuted (``layout`` = ``nchw`` or ``nhwc`` decides when ambiguous);
    ``(N, D)`` feature vectors pass unchanged."""
    if x.dim() == 2:
        return x
    if x.dim() == 3:
        return x.unsqueeze(1)
    if x.dim() != 4:
        raise DataError(f"{prefix}: inputs must have 2 to 4 dimensions, got shape {tuple(x.shape)}")
    if layout is None:
        channels_last = x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4)
        layout = "nhwc" if channels_last else "nchw"
    if layout not in ("nchw", "nhwc"):
        raise DataError(f"{prefix}: layout must be 'nchw' or 'nhwc', got {layout!r}")
    return x.permute(0, 3, 1, 2) if layout == "nhwc" else x


def resize_transform(size: int | None):
    """A batch transform resizing images to ``size`` x ``size`` (bilinear), or None."""
    if size is None:
        return None

    def resize(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )

    return resize


def array_splits(
    prefix: str,
    name: str,
    arrays: dict[str, torch.Tensor],
    *,
    layout: str | None = None,
    channels: int | None = None,
    size: int | None = None,
    normalize: bool = True,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    num_classes: int | None = None,
    seed: int = 0,
    description: str = "",
) -> DataSplits:
    """DataSplits from arrays named ``x``/``y`` (split here) or ``x_train``/``y_train`` with
    optional ``x_val``/``y_val`` and ``x_test``/``y_test`` (carved from train when missing)."""
    keys = sorted(arrays)
    if {"x_train", "y_train"} <= set(arrays):
        given = {
            s: (arrays[f"x_{s}"], arrays[f"y_{s}"])
            for s in ("train", "val", "test")
            if f"x_{s}" in arrays and f"y_{s}" in arrays
        }
    elif {"x", "y"} <= set(arrays):
        given = {"train": (arrays["x"], arrays["y"])}
    else:
        raise DataError(
            f"{prefix}: expected arrays 'x' and 'y', or 'x_train', 'y_train' (with optional "
            f"'x_val', 'y_val', 'x_test', 'y_test'); found {keys}"
        )
    for split, (x, y) in given.items():
        if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise DataError(
                f"{prefix}: y_{split} must be a 1-D array of integer class indices, got "
                f"{y.dtype} {tuple(y.shape)}"
            )
        if len(x) != len(y):
            raise DataError(f"{prefix}: x_{split} has {len(x)} rows but y_{split} {len(y)}")
        if len(y) and int(y.min()) < 0:
            raise DataError(f"{prefix}: y_{split} has negative labels")
    x_train, y_train = given["train"]
    if len(y_train) == 0:
        raise DataError(f"{prefix}: the training arrays are empty")
    labels = y_train.numpy()
    keep = np.arange(len(labels))
    for split, fraction in (("test", test_fraction), ("val", val_fraction)):
        if split not in given:
            rest, part = carve(labels[keep], fraction, seed + (split == "val"))
            given[split] = (x_train[keep[part]], y_train[keep[part]])
            keep = keep[rest]
    given["train"] = (x_train[keep], y_train[keep])

    prepared = {}
    for split, (x, y) in given.items():
        x = to_nchw(prefix, x, layout)
        if x.dtype == torch.bool or not (x.dtype.is_floating_point or x.dtype == torch.uint8):
            x = x.to(torch.float32)
        if channels is not None and x.dim() == 4 and x.shape[1] != channels:
            if x.shape[1] == 1:
                x = x.expand(-1, channels, -1, -1)  # a view: no copy of the pixels
            else:
                raise DataError(
                    f"{prefix}: cannot turn {x.shape[1]}-channel images into {channels} channels"
                )
        prepared[split] = (x, y.long())
    shapes = {tuple(x.shape[1:]) for x, _ in prepared.values()}
    if len(shapes) > 1:
        raise DataError(f"{prefix}: the splits have different input shapes {sorted(shapes)}")
    mean = std = None
    if normalize:
        mean, std = ArrayDataset.channel_stats(prepared["train"][0])
    classes = num_classes or 1 + max(int(y.max()) for _, y in prepared.values() if len(y))
    for split, (_, y) in prepared.items():
        if len(y) and int(y.max()) >= classes:
            raise DataError(
                f"{prefix}: y_{split} has label {int(y.max())} >= num_classes {classes}"
            )
    transform = resize_transform(size)
    splits = {
        split: ArrayDataset(x, y, mean=mean, std=std, transform=transform)
        for split, (x, y) in prepared.items()
    }
    return DataSplits(
        name=name,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        num_classes=classes,
        description=description,
        extra={"mean": mean, "std": std},
    )
