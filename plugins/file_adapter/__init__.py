"""``file:<path>`` model adapter: a netshrink artifact (``.nsk``) or a safetensors state dict
plus an architecture spec (``file:weights.safetensors?arch=zoo:lenet5``). Never unpickles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from netshrink import (
    ModelAdapter,
    ModelInfo,
    ModelSpecError,
    hookimpl,
    load,
    load_model,
    model_info,
)


class FileAdapter(ModelAdapter):
    """Models from local files: netshrink artifacts, or safetensors weights + ``arch`` spec."""

    prefix = "file"
    description = "a netshrink artifact, or safetensors weights with ?arch=<spec>"

    def load(self, name: str, **options: Any) -> tuple[nn.Module, ModelInfo]:
        path = Path(name)
        if not path.is_file():
            raise ModelSpecError(f"file:{name}: no such file")
        arch = options.pop("arch", None)
        if arch is None:
            model = load(path)
            info = model_info(model)
            assert info is not None
            return model, info
        from safetensors.torch import load_file

        model = load_model(str(arch), **options)
        try:
            model.load_state_dict(load_file(str(path)))
        except Exception as exc:  # safetensors' own errors are not a common base class
            raise ModelSpecError(f"file:{name}: cannot load weights into {arch}: {exc}") from None
        info = model_info(model)
        assert info is not None
        return model, info


@hookimpl
def register_model_adapters(register):
    register(FileAdapter())
