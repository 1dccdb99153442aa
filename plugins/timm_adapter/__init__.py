"""``timm:<name>`` model adapter: any timm architecture, ``pretrained=False`` unless local weights
are given (``checkpoint=<path to .safetensors>``; nothing is downloaded)."""

from __future__ import annotations

from typing import Any

from torch import nn

from netshrink import ModelAdapter, ModelInfo, ModelSpecError, hookimpl, last_linear


def _head_name(model: nn.Module) -> str | None:
    """The classifier's module name from timm's own metadata (``pretrained_cfg['classifier']``)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    classifier = cfg.get("classifier")
    if isinstance(classifier, (list, tuple)):
        classifier = classifier[-1]
    modules = dict(model.named_modules())
    if classifier in modules and not isinstance(modules[classifier], nn.Identity):
        return classifier
    return last_linear(model)


class TimmAdapter(ModelAdapter):
    """timm models: ``timm:resnet18?in_chans=1&num_classes=10&input_size=32``; other options
    go to ``timm.create_model``; ``checkpoint`` loads a local safetensors state dict."""

    prefix = "timm"
    description = "any timm architecture (random init unless a local checkpoint is given)"

    def load(self, name: str, **options: Any) -> tuple[nn.Module, ModelInfo]:
        try:
            import timm
        except ImportError:
            raise ModelSpecError("timm is not installed: pip install 'netshrink[timm]'") from None
        if name not in timm.list_models():
            close = timm.list_models(f"*{name}*")[:5]
            raise ModelSpecError(
                f"timm has no model {name!r}" + (f"; similar: {close}" if close else "")
            )
        opts = dict(options)
        input_size = int(opts.pop("input_size", 224))
        checkpoint = opts.pop("checkpoint", None)
        opts.setdefault("in_chans", 3)
        opts.setdefault("num_classes", 1000)
        try:
            model = timm.create_model(name, pretrained=False, checkpoint_path="", **opts)
        except TypeError as exc:
            raise ModelSpecError(f"timm:{name}: {exc}") from None
        if checkpoint:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(checkpoint))
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        info = ModelInfo(
            spec=f"timm:{name}",
            options={"input_size": input_size, **opts},
            input_shape=(int(opts["in_chans"]), input_size, input_size),
            num_classes=int(opts["num_classes"]),
            head=_head_name(model),
            mean=tuple(cfg["mean"]) if "mean" in cfg and opts["in_chans"] == 3 else None,
            std=tuple(cfg["std"]) if "std" in cfg and opts["in_chans"] == 3 else None,
        )
        return model, info


@hookimpl
def register_model_adapters(register):
    register(TimmAdapter())
