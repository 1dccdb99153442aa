"""``torchvision:<name>`` model adapter (``weights=None``: nothing is downloaded)."""

from __future__ import annotations

from typing import Any

from torch import nn

from netshrink import ModelAdapter, ModelInfo, ModelSpecError, hookimpl, last_linear


class TorchvisionAdapter(ModelAdapter):
    """torchvision classification models: ``torchvision:resnet18?num_classes=10&input_size=32``."""

    prefix = "torchvision"
    description = "torchvision classification models (random init)"

    def load(self, name: str, **options: Any) -> tuple[nn.Module, ModelInfo]:
        import torchvision

        available = torchvision.models.list_models(module=torchvision.models)
        if name not in available:
            raise ModelSpecError(f"torchvision has no classification model {name!r}")
        opts = dict(options)
        input_size = int(opts.pop("input_size", 224))
        in_chans = int(opts.pop("in_chans", 3))
        if in_chans != 3:
            raise ModelSpecError(
                f"torchvision:{name} takes 3-channel input (in_chans={in_chans}); "
                "use timm:<name>?in_chans=1 for other channel counts"
            )
        opts.setdefault("num_classes", 1000)
        try:
            model = torchvision.models.get_model(name, weights=None, **opts)
        except (TypeError, ValueError) as exc:
            raise ModelSpecError(f"torchvision:{name}: {exc}") from None
        info = ModelInfo(
            spec=f"torchvision:{name}",
            options={"input_size": input_size, **opts},
            input_shape=(3, input_size, input_size),
            num_classes=int(opts["num_classes"]),
            head=classifier_head(model, int(opts["num_classes"])),
        )
        return model, info

    def names(self) -> list[str]:
        import torchvision

        return list(torchvision.models.list_models(module=torchvision.models))


def classifier_head(model: nn.Module, num_classes: int) -> str | None:
    """The classifier layer: the last ``nn.Linear``, or where a model has none (SqueezeNet's
    ``classifier.1``), the last ``nn.Conv2d`` with ``num_classes`` output channels. Selectors
    protect it, so no structural method cuts the model's classes."""
    head = last_linear(model)
    if head is not None:
        return head
    convs = [n for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and m.out_channels == num_classes]
    return convs[-1] if convs else None


@hookimpl
def register_model_adapters(register):
    register(TorchvisionAdapter())
