"""``zoo:`` model adapter: the small reference models netshrink ships (no download)."""

from __future__ import annotations

from typing import Any

from torch import nn

from netshrink import ModelAdapter, ModelInfo, ModelSpecError, UnknownNameError, hookimpl
from netshrink.plugins.zoo.models import ZOO

_OPTIONS = ("in_chans", "input_size", "num_classes")


class ZooAdapter(ModelAdapter):
    """``zoo:<name>`` with options ``in_chans`` (1), ``input_size`` (28, 32 for vgg/resnet),
    ``num_classes`` (10)."""

    prefix = "zoo"
    description = "netshrink reference models: " + ", ".join(ZOO)

    def load(self, name: str, **options: Any) -> tuple[nn.Module, ModelInfo]:
        if name not in ZOO:
            raise UnknownNameError("zoo model", name, ZOO)
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise ModelSpecError(
                f"zoo:{name}: unknown option(s) {unknown}; valid: {list(_OPTIONS)}"
            )
        cls, _, head = ZOO[name]
        default_size = 28 if name.startswith("lenet") else 32
        opts = {"in_chans": 1, "input_size": default_size, "num_classes": 10, **options}
        try:
            opts = {k: int(v) for k, v in opts.items()}
            model = cls(**opts)
        except (TypeError, ValueError) as exc:
            raise ModelSpecError(f"zoo:{name}: {exc}") from None
        info = ModelInfo(
            spec=f"zoo:{name}",
            options=opts,
            input_shape=(opts["in_chans"], opts["input_size"], opts["input_size"]),
            num_classes=opts["num_classes"],
            head=head,
        )
        return model, info

    def names(self) -> list[str]:
        return list(ZOO)


@hookimpl
def register_model_adapters(register):
    register(ZooAdapter())
