"""``imagefolder:PATH``: a local tree of images in class folders (torchvision's ImageFolder).

``PATH`` either holds ``train/`` (and optionally ``val/``, ``test/``), each with one folder per
class, or holds the class folders directly; missing splits are carved from the training images
(stratified, seeded). Images are decoded on demand, so the tree need not fit in memory. Each
image is converted to RGB (or to luminance with ``channels=1``), resized so its shorter side is
``size`` and centre-cropped to ``size`` x ``size`` (default: the shorter side of the first
training image), turned into a tensor and normalised with per-channel statistics of up to
``stats_samples`` training images (or ``mean``/``std`` given as JSON lists).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from netshrink import DataError, DataSplits
from netshrink.plugins.localdata.common import (
    as_fraction,
    as_int,
    carve,
    check_options,
    spec_name,
)

OPTIONS = (
    "size",
    "channels",
    "mean",
    "std",
    "val_fraction",
    "test_fraction",
    "seed",
    "stats_samples",
)
SPLIT_DIRS = ("train", "val", "test")
_LAYOUT = (
    "expected PATH/CLASS/IMAGE files (e.g. PATH/cat/1.png, PATH/dog/2.jpg), or PATH/train, "
    "PATH/val and PATH/test each laid out that way"
)


def _image_folder_class():
    from torchvision.datasets import ImageFolder

    class FixedClassesImageFolder(ImageFolder):
        """An ImageFolder whose classes are given (those of the training folder), so every
        split maps class names to the same indices."""

        def __init__(self, root: str, classes: list[str], **kwargs: Any) -> None:
            self._given = classes
            super().__init__(root, **kwargs)

        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            present = sorted(e.name for e in Path(directory).iterdir() if e.is_dir())
            unknown = sorted(set(present) - set(self._given))
            if unknown:
                raise DataError(
                    f"imagefolder: {directory} has class folders {unknown} that the training "
                    f"folder lacks (training classes: {self._given})"
                )
            return self._given, {c: i for i, c in enumerate(self._given)}

    return FixedClassesImageFolder


def _classes(root: Path) -> list[str]:
    classes = sorted(e.name for e in root.iterdir() if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"imagefolder: {str(root)!r} has no class folders; {_LAYOUT}")
    return classes


def _fingerprint(roots: dict[str, Path], options: dict[str, Any]) -> str:
    """Names, sizes and modification times of every file under the split folders, and the
    options: cheap to compute, and changes whenever an image is added, removed or rewritten."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for split, root in sorted(roots.items()):
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            stat = path.stat()
            h.update(
                f"{split}/{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode()
            )
    return h.hexdigest()


class _Mode:
    """Convert a PIL image to ``L`` or ``RGB`` (a class, not a lambda: transforms must pickle
    for DataLoader workers)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image: Any) -> Any:
        return image if image.mode == self.mode else image.convert(self.mode)


def _transform(size: int, channels: int, mean: list[float] | None, std: list[float] | None):
    from torchvision import transforms as T

    steps: list[Any] = [_Mode("L" if channels == 1 else "RGB")]
    steps += [T.Resize(size), T.CenterCrop(size), T.ToTensor()]
    if mean is not None and std is not None:
        steps.append(T.Normalize(mean, std))
    return T.Compose(steps)


def _stats(dataset: Any, indices: np.ndarray, samples: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over up to ``samples`` evenly spaced images of ``indices``."""
    pick = indices[np.linspace(0, len(indices) - 1, min(samples, len(indices))).astype(int)]
    total = squares = None
    count = 0
    for i in pick:
        x = dataset[int(i)][0].to(torch.float64).flatten(1)
        total = x.sum(1) if total is None else total + x.sum(1)
        squares = x.square().sum(1) if squares is None else squares + x.square().sum(1)
        count += x.shape[1]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.tolist(), std.tolist()


def _floats(key: str, value: Any, channels: int) -> list[float] | None:
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise DataError(f"imagefolder: {key} must be a number or a list, got {value!r}") from None
    if len(out) == 1:
        out = out * channels
    if len(out) != channels:
        raise DataError(f"imagefolder: {key} needs {channels} values, got {value!r}")
    return out


def load_imagefolder(target: str, **options: Any) -> DataSplits:
    """DataSplits over a local ImageFolder tree (see the module docstring)."""
    check_options("imagefolder", options, OPTIONS)
    if not target:
        raise DataError(f"imagefolder: no folder given; use imagefolder:PATH ({_LAYOUT})")
    root = Path(target).expanduser()
    if not root.is_dir():
        raise DataError(f"imagefolder: no such folder {str(root)!r}; {_LAYOUT}")
    if (root / "train").is_dir():
        roots = {s: root / s for s in SPLIT_DIRS if (root / s).is_dir()}
    else:
        roots = {"train": root}
    classes = _classes(roots["train"])
    folder_cls = _image_folder_class()

    def make(split: str, transform: Any) -> Any:
        # Every training class needs images; val/test folders may lack a class, not all images.
        try:
            folder = folder_cls(
                str(roots[split]), classes, transform=transform, allow_empty=split != "train"
            )
        except FileNotFoundError as exc:  # torchvision: no class folder, or no image in one
            raise DataError(f"imagefolder: {exc}; {_LAYOUT}") from None
        if len(folder) == 0:
            raise DataError(f"imagefolder: {roots[split]} holds no images; {_LAYOUT}")
        return folder

    raw = make("train", None)
    from PIL import Image

    try:
        with Image.open(raw.samples[0][0]) as first:
            mode, first_size = first.mode, first.size
    except OSError as exc:
        raise DataError(f"imagefolder: cannot read {raw.samples[0][0]}: {exc}") from None
    gray = mode in ("1", "L", "LA", "I", "I;16", "F")
    channels = as_int("imagefolder", "channels", options.get("channels", 1 if gray else 3))
    if channels not in (1, 3):
        raise DataError(f"imagefolder: channels must be 1 or 3, got {channels}")
    size = as_int("imagefolder", "size", options.get("size", min(first_size)))
    seed = as_int("imagefolder", "seed", options.get("seed", 0), low=0)
    val_fraction = as_fraction("imagefolder", "val_fraction", options.get("val_fraction", 0.1))
    test_fraction = as_fraction("imagefolder", "test_fraction", options.get("test_fraction", 0.1))
    samples = as_int("imagefolder", "stats_samples", options.get("stats_samples", 500))
    mean = _floats("mean", options.get("mean"), channels)
    std = _floats("std", options.get("std"), channels)

    labels = np.asarray(raw.targets)
    keep = np.arange(len(labels))
    carved: dict[str, np.ndarray] = {}
    for split, fraction in (("test", test_fraction), ("val", val_fraction)):
        if split not in roots:
            rest, part = carve(labels[keep], fraction, seed + (split == "val"))
            carved[split] = keep[part]
            keep = keep[rest]
    if len(keep) == 0:
        raise DataError(f"imagefolder: {str(root)!r} leaves no training images after the split")
    if mean is None or std is None:
        stats_set = make("train", _transform(size, channels, None, None))
        mean, std = _stats(stats_set, keep, samples)
    transform = _transform(size, channels, mean, std)
    train_set = make("train", transform)
    splits = {"train": Subset(train_set, keep.tolist()) if len(carved) else train_set}
    for split in ("val", "test"):
        splits[split] = (
            Subset(train_set, carved[split].tolist()) if split in carved else make(split, transform)
        )
    effective = {
        "size": size,
        "channels": channels,
        "mean": mean,
        "std": std,
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
    }
    name = spec_name("imagefolder", target, _fingerprint(roots, effective))
    return DataSplits(
        name=name,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        num_classes=len(classes),
        description=f"images from {root}, {len(classes)} classes, {size}x{size}, "
        f"{'RGB' if channels == 3 else 'grayscale'}",
        extra={
            "mean": mean,
            "std": std,
            "classes": classes,
            "root": str(root),
            "input_shape": (channels, size, size),
        },
    )
