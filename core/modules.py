"""Describe and rebuild modules as data (no code, no pickle): the architecture half of an artifact.

Only allow-listed ``torch.nn`` classes can be described; plugins that create other plain module
types add a builder with :func:`register_module_type`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from netshrink.errors import ArtifactError

_SIMPLE = (int, float, bool, str, type(None))

#: class name -> (class, constructor argument names read from the instance)
MODULE_TYPES: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {}


def register_module_type(cls: type[nn.Module], args: tuple[str, ...]) -> None:
    """Allow ``cls`` in artifacts; ``args`` are constructor arguments stored from attributes
    of the same name (``bias`` is stored as a bool)."""
    MODULE_TYPES[cls.__name__] = (cls, args)


_CONV = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "bias",
    "padding_mode",
)
for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_module_type(_cls, _CONV)
register_module_type(nn.Linear, ("in_features", "out_features", "bias"))
for _cls in (nn.BatchNorm1d, nn.BatchNorm2d):
    register_module_type(_cls, ("num_features", "eps", "momentum", "affine", "track_running_stats"))
register_module_type(nn.LayerNorm, ("normalized_shape", "eps", "elementwise_affine"))
for _cls in (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish):
    register_module_type(_cls, ("inplace",))
for _cls in (nn.GELU,):
    register_module_type(_cls, ("approximate",))
for _cls in (nn.Identity, nn.Sigmoid, nn.Tanh, nn.Sequential):
    register_module_type(_cls, ())
register_module_type(nn.Flatten, ("start_dim", "end_dim"))
register_module_type(nn.Dropout, ("p",))
register_module_type(nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode"))
register_module_type(nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode"))
register_module_type(nn.AdaptiveAvgPool2d, ("output_size",))


def _jsonable(value: Any) -> Any:
    if isinstance(value, _SIMPLE):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, _SIMPLE) for v in value):
        return list(value)
    raise TypeError(f"not a simple value: {value!r}")


def describe(module: nn.Module) -> dict[str, Any]:
    """A JSON description of ``module`` and its children (raises if a class is not allowed)."""
    name = type(module).__name__
    entry = MODULE_TYPES.get(name)
    if entry is None or type(module) is not entry[0]:
        raise ArtifactError(
            f"cannot store a {type(module).__module__}.{name} as data; plain torch.nn modules "
            f"({', '.join(sorted(MODULE_TYPES))}) or a model built from a spec "
            "(netshrink.load_model) "
            "can be saved"
        )
    args: dict[str, Any] = {}
    for arg in entry[1]:
        value = getattr(module, arg)
        if arg == "bias" and not isinstance(value, bool):
            value = value is not None
        if arg == "affine" and not isinstance(value, bool):
            value = bool(value)
        args[arg] = _jsonable(value)
    spec: dict[str, Any] = {"type": name}
    if args:
        spec["args"] = args
    children = list(module.named_children())
    if children:
        if not isinstance(module, nn.Sequential):
            raise ArtifactError(f"cannot store children of a {name}")
        spec["children"] = [[child_name, describe(child)] for child_name, child in children]
    return spec


def build(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a module from :func:`describe`'s output (only allow-listed classes)."""
    try:
        cls, allowed = MODULE_TYPES[spec["type"]]
    except (KeyError, TypeError):
        raise ArtifactError(
            f"module type {spec.get('type') if isinstance(spec, dict) else spec!r} "
            "is not allowed in artifacts"
        ) from None
    args = dict(spec.get("args", {}))
    if set(args) - set(allowed):
        raise ArtifactError(
            f"unexpected arguments {sorted(set(args) - set(allowed))} for {cls.__name__}"
        )
    for key, value in args.items():
        if isinstance(value, list):
            args[key] = tuple(value)
        elif not isinstance(value, _SIMPLE):
            raise ArtifactError(f"argument {key} of {cls.__name__} is not a simple value")
    if cls is nn.Sequential:
        module = nn.Sequential()
        for child_name, child in spec.get("children", []):
            module.add_module(str(child_name), build(child))
        return module
    try:
        return cls(**args)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"cannot build {cls.__name__}({args}): {exc}") from None


def simple_attrs(module: nn.Module) -> dict[str, Any]:
    """The module's own simple attributes (ints, floats, strings, tuples of them)."""
    out = {}
    for key, value in vars(module).items():
        if key.startswith("_") or key == "training":
            continue
        try:
            out[key] = _jsonable(value)
        except TypeError:
            continue
    return out


def diff(base: nn.Module, model: nn.Module) -> list[dict[str, Any]]:
    """Edits that turn ``base`` (rebuilt from its spec) into ``model``'s architecture:
    ``{"op": "set", "path", "attrs"}`` for changed simple attributes (e.g. ``out_channels``
    after channel pruning) and ``{"op": "replace", "path", "module"}`` for swapped modules."""
    base_modules = dict(base.named_modules())
    edits: list[dict[str, Any]] = []
    replaced: list[str] = []
    seen = set()
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in replaced):
            continue
        seen.add(name)
        old = base_modules.get(name)
        if old is None or type(old) is not type(module):
            if name == "":
                raise ArtifactError("the model's root module was replaced; cannot describe it")
            edits.append({"op": "replace", "path": name, "module": describe(module)})
            replaced.append(name)
            continue
        before, after = simple_attrs(old), simple_attrs(module)
        changed = {k: v for k, v in after.items() if k in before and before[k] != v}
        if changed:
            edits.append({"op": "set", "path": name, "attrs": changed})
    missing = [
        n
        for n in base_modules
        if n not in seen and not any(n.startswith(p + ".") for p in replaced)
    ]
    if missing:
        raise ArtifactError(
            f"modules were removed from the model ({', '.join(missing[:4])}); "
            "removing modules is not supported by the artifact format"
        )
    return edits


def apply_edits(model: nn.Module, edits: list[dict[str, Any]]) -> None:
    """Apply :func:`diff`'s edits to a freshly built base model."""
    for edit in edits:
        path = edit.get("path")
        if not isinstance(path, str):
            raise ArtifactError(f"malformed edit {edit!r}")
        if edit.get("op") == "replace":
            parent_name, _, child = path.rpartition(".")
            try:
                parent = model.get_submodule(parent_name)
            except AttributeError:
                raise ArtifactError(f"edit refers to a missing module {parent_name!r}") from None
            setattr(parent, child, build(edit["module"]))
        elif edit.get("op") == "set":
            try:
                module = model.get_submodule(path)
            except AttributeError:
                raise ArtifactError(f"edit refers to a missing module {path!r}") from None
            for key, value in edit["attrs"].items():
                if key not in vars(module) or key.startswith("_"):
                    raise ArtifactError(f"edit sets unknown attribute {key!r} of {path!r}")
                current = vars(module)[key]
                if isinstance(value, list):
                    value = tuple(value) if isinstance(current, tuple) else list(value)
                elif not isinstance(value, _SIMPLE):
                    raise ArtifactError(f"edit sets {key!r} of {path!r} to a non-simple value")
                setattr(module, key, value)
        else:
            raise ArtifactError(f"unknown edit operation {edit.get('op')!r}")


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` of ``model`` with ``value`` (any shape)."""
    owner_name, _, attr = name.rpartition(".")
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        raise ArtifactError(f"tensor {name!r} belongs to a missing module") from None
    if attr in owner._parameters:
        old = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(
            value, requires_grad=old.requires_grad if old is not None else True
        )
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        raise ArtifactError(f"model has no parameter or buffer {name!r}")
