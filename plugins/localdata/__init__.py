"""Built-in dataset plugin for local data, addressed by spec like models are: ``imagefolder:PATH``
(a tree of class folders), ``torchvision:NAME?root=PATH`` (torchvision's dataset classes over
files on disk), ``npz:PATH`` and ``safetensors:PATH`` (labelled arrays). Nothing is downloaded,
nothing is unpickled; every failure is a :class:`netshrink.DataError` saying what was expected.
"""

from __future__ import annotations

from netshrink import hookimpl
from netshrink.plugins.localdata.arrays import load_npz, load_safetensors
from netshrink.plugins.localdata.imagefolder import load_imagefolder
from netshrink.plugins.localdata.tvdata import load_torchvision

__all__ = ["load_imagefolder", "load_npz", "load_safetensors", "load_torchvision"]


@hookimpl
def register_datasets(register):
    register(
        "imagefolder:",
        load_imagefolder,
        description="imagefolder:PATH[?size=N&channels=1|3] - local class folders "
        "(PATH/CLASS/*.png, or PATH/train|val|test/CLASS/...)",
    )
    register(
        "torchvision:",
        load_torchvision,
        description="torchvision:NAME?root=PATH - torchvision.datasets.NAME from local files "
        "(never downloads), e.g. torchvision:CIFAR10?root=/data",
    )
    register(
        "npz:",
        load_npz,
        description="npz:PATH - arrays x/y or x_train/y_train/x_val/.../y_test (no pickle)",
    )
    register(
        "safetensors:",
        load_safetensors,
        description="safetensors:PATH - tensors x/y or x_train/y_train/x_val/.../y_test",
    )
