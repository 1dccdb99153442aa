"""``timm:<name>`` model adapter: any timm architecture, ``pretrained=False`` unless local weights
are given (``checkpoint=<path to .safetensors>``; nothing is downloaded).

``input_size`` other than the architecture's default is passed on as ``img_size`` to models
that take it (ViT, DeiT, Swin, ...: their position embeddings and windows follow); CNNs run at
any size as built. Either way one forward pass at that size is tried when the model is built,
so a model that cannot run at it fails here, naming the sizes it accepts, not deep inside a
compression step.
"""

from __future__ import annotations

from typing import Any

import torch
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


def _default_size(timm: Any, name: str) -> tuple[int, bool]:
    """The architecture's default input side and whether timm marks it fixed
    (``pretrained_cfg``'s ``input_size`` and ``fixed_input_size``)."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # no default config for this name: timm's usual size
        cfg = None
    size = getattr(cfg, "input_size", None) or (3, 224, 224)
    return int(size[-1]), bool(getattr(cfg, "fixed_input_size", False))


def _create(timm: Any, name: str, opts: dict[str, Any], img_size: int | None) -> nn.Module:
    """``timm.create_model`` with ``img_size`` when given and the architecture takes it."""
    kwargs = {"pretrained": False, "checkpoint_path": "", **opts}
    if img_size is not None and "img_size" not in opts:
        try:
            return timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise ModelSpecError(f"timm:{name}: {exc}") from None
            # The architecture has no img_size: it is built as usual and checked at that size.
        except Exception as exc:  # e.g. a size that does not fit the patch or window grid
            raise ModelSpecError(
                f"timm:{name} cannot be built for input_size={img_size}: {_first_line(exc)}"
            ) from None
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as exc:
        raise ModelSpecError(f"timm:{name}: {exc}") from None


def _check_runs(
    model: nn.Module, name: str, in_chans: int, size: int, default: int, fixed: bool
) -> None:
    """One forward pass at ``size`` (eval mode, no gradients); a failure is a
    :class:`ModelSpecError` naming the model and the sizes it accepts."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, size, size))
    except (MemoryError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as exc:
        accepts = (
            f"it accepts only {default}x{default} inputs (a fixed input size)"
            if fixed
            else f"its default is {default}x{default}"
        )
        raise ModelSpecError(
            f"timm:{name} does not run at input_size={size} ({_first_line(exc)}); {accepts}; "
            f"use input_size={default} and data of that size"
        ) from exc
    finally:
        for module, training in modes:
            module.training = training


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


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
        default_size, fixed = _default_size(timm, name)
        input_size = int(opts.pop("input_size", opts.get("img_size", default_size)))
        checkpoint = opts.pop("checkpoint", None)
        opts.setdefault("in_chans", 3)
        opts.setdefault("num_classes", 1000)
        model = _create(timm, name, opts, input_size if input_size != default_size else None)
        if input_size != default_size:
            _check_runs(model, name, int(opts["in_chans"]), input_size, default_size, fixed)
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
