"""``torchvision:NAME?root=PATH``: torchvision's dataset classes over files already on disk.

Nothing is downloaded (``download=False`` always); a missing or incomplete root is a
:class:`netshrink.DataError` naming the files the class expects. The test split is the class's
own (``train=False`` or ``split="test"``); validation is carved from the training split. Datasets
that keep their images in one array (CIFAR, the MNIST family, SVHN, STL10, USPS) are held as
``uint8`` tensors and normalised per batch; others are decoded item by item through transforms
(as ``imagefolder:``).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from netshrink import DataError, DataSplits
from netshrink.plugins.localdata.common import (
    array_splits,
    as_fraction,
    as_int,
    carve,
    check_options,
    spec_name,
)
from netshrink.plugins.localdata.imagefolder import _fingerprint, _stats, _transform

OPTIONS = (
    "root",
    "size",
    "channels",
    "val_fraction",
    "seed",
    "train_split",
    "test_split",
    "split",
    "stats_samples",
)


def _dataset_class(name: str) -> type:
    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.utils.data.Dataset)):
        known = sorted(
            n
            for n in dir(tvd)
            if n[:1].isupper()
            and n not in ("VisionDataset", "DatasetFolder", "ImageFolder", "FakeData")
        )
        raise DataError(
            f"torchvision: no dataset class {name!r} in torchvision.datasets; "
            f"e.g. {', '.join(known[:25])}, ..."
        )
    return cls


def expected_files(cls: type, root: Path) -> list[str]:
    """The files ``cls`` reads under ``root``, as far as its class attributes tell."""
    files: list[str] = []
    base = getattr(cls, "base_folder", "")
    for attr in ("train_list", "test_list"):
        files += [str(root / base / entry[0]) for entry in getattr(cls, attr, []) or []]
    resources = getattr(cls, "resources", None)
    if resources:  # the MNIST family: ROOT/<ClassName>/raw/<file without .gz>
        for entry in resources:
            leaf = os.path.basename(entry[0] if isinstance(entry, tuple | list) else entry)
            files.append(str(root / cls.__name__ / "raw" / leaf.removesuffix(".gz")))
    split_list = getattr(cls, "split_list", None)
    if isinstance(split_list, dict):  # SVHN, USPS: {split: [url, filename, md5]}
        files += [str(root / entry[1]) for entry in split_list.values()]
    return files


def _not_found(name: str, cls: type, root: Path, exc: Exception) -> DataError:
    files = expected_files(cls, root)
    where = (
        "expected files: " + ", ".join(files)
        if files
        else f"expected the files torchvision.datasets.{name} reads under {root} "
        "(see its documentation)"
    )
    return DataError(
        f"torchvision:{name}: the data is not under root={str(root)!r} and netshrink never "
        f"downloads; {where}. Fetch it on a machine with a network (e.g. "
        f"torchvision.datasets.{name}(root, download=True)) and copy the folder here. "
        f"({type(exc).__name__}: {exc})"
    )


def _construct(
    name: str,
    cls: type,
    root: Path,
    train: bool,
    split_names: dict[str, str],
    extra: dict[str, Any],
) -> Any:
    params = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = dict(extra)
    mnist_like = hasattr(cls, "resources")  # EMNIST, QMNIST pass train= through **kwargs
    if "train" in params or mnist_like:
        kwargs["train"] = train
    elif "split" in params:
        kwargs["split"] = split_names["train" if train else "test"]
    else:
        raise DataError(
            f"torchvision:{name} has neither a train= nor a split= argument; netshrink cannot "
            "tell its training from its test data: use imagefolder: or npz: instead"
        )
    if "download" in params or mnist_like:
        kwargs["download"] = False
    try:
        return cls(str(root), **kwargs)
    except (RuntimeError, FileNotFoundError, OSError) as exc:
        raise _not_found(name, cls, root, exc) from None
    except (TypeError, ValueError) as exc:
        raise DataError(f"torchvision:{name}: {exc}") from None


def _arrays(ds: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The images and labels of a dataset that holds them as one uint8 array, else None."""
    data = getattr(ds, "data", None)
    targets = getattr(ds, "targets", None)
    if targets is None:
        targets = getattr(ds, "labels", None)
    if data is None or targets is None:
        return None
    x = torch.as_tensor(np.asarray(data))
    if x.dtype != torch.uint8 or x.dim() not in (3, 4):
        return None
    y = torch.as_tensor(np.asarray(targets)).long().flatten()
    return (x, y) if len(y) == len(x) else None


def load_torchvision(target: str, **options: Any) -> DataSplits:
    """DataSplits over ``torchvision.datasets.<target>`` read from ``root`` (never downloaded)."""
    check_options(f"torchvision:{target}", options, OPTIONS)
    name = target
    cls = _dataset_class(name)
    if not options.get("root"):
        files = expected_files(cls, Path("ROOT"))
        raise DataError(
            f"torchvision:{name} needs root=PATH, the folder holding its files"
            + (f" ({', '.join(files)})" if files else "")
            + f"; e.g. torchvision:{name}?root=/data/torchvision"
        )
    root = Path(str(options["root"])).expanduser()
    if not root.is_dir():
        raise _not_found(name, cls, root, FileNotFoundError(f"no folder {root}"))
    seed = as_int(f"torchvision:{name}", "seed", options.get("seed", 0), low=0)
    val_fraction = as_fraction(
        f"torchvision:{name}", "val_fraction", options.get("val_fraction", 0.1)
    )
    size = options.get("size")
    size = None if size is None else as_int(f"torchvision:{name}", "size", size)
    channels = options.get("channels")
    channels = None if channels is None else as_int(f"torchvision:{name}", "channels", channels)
    split_names = {
        "train": str(options.get("train_split", "train")),
        "test": str(options.get("test_split", "test")),
    }
    extra = {"split": options["split"]} if "split" in options else {}  # EMNIST's variant
    train = _construct(name, cls, root, True, split_names, extra)
    test = _construct(name, cls, root, False, split_names, extra)
    effective = {
        "size": size,
        "channels": channels,
        "seed": seed,
        "val_fraction": val_fraction,
        **split_names,
        **extra,
    }
    dataset_name = spec_name("torchvision", name, _fingerprint({"root": root}, effective))
    description = f"torchvision.datasets.{name} from {root}"

    arrays = (_arrays(train), _arrays(test))
    if arrays[0] is not None and arrays[1] is not None:
        (x_train, y_train), (x_test, y_test) = arrays
        return array_splits(
            f"torchvision:{name}",
            dataset_name,
            {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test},
            channels=channels,
            size=size,
            val_fraction=val_fraction,
            seed=seed,
            description=description,
        )
    # Item by item: PIL images through transforms.
    labels = (
        np.asarray([int(train[i][1]) for i in range(len(train))])
        if not hasattr(train, "targets")
        else np.asarray(train.targets)
    )
    first = train[0][0]
    if not hasattr(first, "mode"):
        raise DataError(f"torchvision:{name}: items are {type(first).__name__}, not PIL images")
    channels = channels or (1 if first.mode in ("1", "L", "I", "F") else 3)
    size = size or min(first.size)
    keep, val_idx = carve(labels, val_fraction, seed + 1)
    train.transform = _transform(size, channels, None, None)
    mean, std = _stats(
        train,
        keep,
        as_int(f"torchvision:{name}", "stats_samples", options.get("stats_samples", 500)),
    )
    train.transform = test.transform = _transform(size, channels, mean, std)
    return DataSplits(
        name=dataset_name,
        train=Subset(train, keep.tolist()),
        val=Subset(train, val_idx.tolist()),
        test=test,
        num_classes=len(getattr(train, "classes", [])) or int(labels.max()) + 1,
        description=description,
        extra={"mean": mean, "std": std, "root": str(root), "input_shape": (channels, size, size)},
    )
