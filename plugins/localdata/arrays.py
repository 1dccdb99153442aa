"""``npz:PATH`` and ``safetensors:PATH``: labelled arrays in a local file, never unpickled."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from netshrink import DataError, DataSplits
from netshrink.plugins.localdata.common import (
    array_splits,
    as_fraction,
    as_int,
    check_options,
    file_digest,
    spec_name,
)

OPTIONS = (
    "layout",
    "channels",
    "size",
    "normalize",
    "val_fraction",
    "test_fraction",
    "num_classes",
    "seed",
)


def _existing_file(prefix: str, target: str) -> Path:
    path = Path(target).expanduser()
    if not target:
        raise DataError(f"{prefix}: no file given; use {prefix}:PATH")
    if not path.is_file():
        raise DataError(
            f"{prefix}: no such file {str(path)!r}; expected a file holding arrays 'x' and 'y' "
            "(or 'x_train', 'y_train', 'x_val', 'y_val', 'x_test', 'y_test')"
        )
    return path


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    if not zipfile.is_zipfile(path):  # np.load would read anything else as .npy or pickle
        raise DataError(
            f"npz: cannot read {str(path)!r}: not an .npz archive (numpy.savez writes a zip of "
            ".npy files)"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except ValueError as exc:  # numpy: "Object arrays cannot be loaded when allow_pickle=False"
        raise DataError(
            f"npz: {str(path)!r} holds pickled (object) arrays, which netshrink never loads; "
            f"save plain numeric arrays instead ({exc})"
        ) from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"npz: cannot read {str(path)!r} as an .npz archive: {exc}") from None
    if not isinstance(arrays, dict) or not arrays:
        raise DataError(f"npz: {str(path)!r} holds no arrays")
    out = {}
    for key, value in arrays.items():
        if value.dtype.kind not in "biuf":
            raise DataError(
                f"npz: array {key!r} has dtype {value.dtype}; only numeric arrays are accepted"
            )
        out[key] = torch.from_numpy(np.ascontiguousarray(value))
    return out


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"safetensors: cannot read {str(path)!r}: {exc}") from None


def _options(prefix: str, options: dict[str, Any]) -> dict[str, Any]:
    check_options(prefix, options, OPTIONS)
    out: dict[str, Any] = {}
    for key in ("channels", "size", "num_classes"):
        if options.get(key) is not None:
            out[key] = as_int(prefix, key, options[key])
    for key in ("val_fraction", "test_fraction"):
        if key in options:
            out[key] = as_fraction(prefix, key, options[key])
    if "seed" in options:
        out["seed"] = as_int(prefix, "seed", options["seed"], low=0)
    if "layout" in options:
        out["layout"] = str(options["layout"]).lower()
    if "normalize" in options:
        value = options["normalize"]
        if not isinstance(value, bool):
            raise DataError(f"{prefix}: normalize must be true or false, got {value!r}")
        out["normalize"] = value
    return out


def load_npz(target: str, **options: Any) -> DataSplits:
    """Arrays from an ``.npz`` file (``numpy.savez``), read with ``allow_pickle=False``."""
    opts = _options("npz", options)
    path = _existing_file("npz", target)
    name = spec_name("npz", target, file_digest(path, opts))
    return array_splits("npz", name, _read_npz(path), **opts, description=f"arrays from {path}")


def load_safetensors(target: str, **options: Any) -> DataSplits:
    """Arrays from a ``.safetensors`` file."""
    opts = _options("safetensors", options)
    path = _existing_file("safetensors", target)
    name = spec_name("safetensors", target, file_digest(path, opts))
    return array_splits(
        "safetensors", name, _read_safetensors(path), **opts, description=f"arrays from {path}"
    )
