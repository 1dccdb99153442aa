"""Describe and rebuild modules as data (no code, no pickle): the architecture half of an artifact.

Only allow-listed ``torch.nn`` classes can be described; plugins that create other plain module
types add a builder with :func:`register_module_type`.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module_hooks

from netshrink.errors import ArtifactError, NetshrinkError

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


#: The uint8 grid of quantized activations (asymmetric, one scale and zero point per tensor).
ACT_QMIN, ACT_QMAX = 0, 255


def quantize_input(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the uint8 grid ``(q - zero_point) * scale`` (static activation
    quantization, simulated in float).

    Computes exactly what ONNX's ``QuantizeLinear`` then ``DequantizeLinear`` compute
    (``x / scale`` rounded half to even, plus the zero point, saturated to 0..255); while
    torch exports to ONNX it is written as that pair, so onnxruntime sees a Q/DQ graph.
    """
    if torch.onnx.is_in_onnx_export():
        return torch.fake_quantize_per_tensor_affine(
            x, scale.float(), zero_point.to(torch.int32), ACT_QMIN, ACT_QMAX
        )
    zp = zero_point.to(x.dtype)
    q = torch.clamp(torch.round(x / scale.to(x.dtype)) + zp, ACT_QMIN, ACT_QMAX)
    return (q - zp) * scale.to(x.dtype)


class _Int8Input:
    """Mixin of the ``Int8Input*`` layers: uint8 grids (scalar buffers, fp32 scale and uint8
    zero point) for the layer's input (``act_scale``, ``act_zero_point``) and output
    (``out_scale``, ``out_zero_point``), and a forward that puts both on their grids.

    The output grid is what lets an int8 runtime keep the result in int8 (onnxruntime fuses
    ``DequantizeLinear -> Conv -> QuantizeLinear`` into ``QLinearConv``)."""

    def _init_act(self, device: Any) -> None:
        for side in ("act", "out"):
            self.register_buffer(f"{side}_scale", torch.ones((), dtype=torch.float32,
                                                             device=device))
            self.register_buffer(f"{side}_zero_point", torch.zeros((), dtype=torch.uint8,
                                                                   device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(quantize_input(x, self.act_scale, self.act_zero_point))
        return quantize_input(y, self.out_scale, self.out_zero_point)


class Int8InputLinear(_Int8Input, nn.Linear):
    """``nn.Linear`` whose input is statically quantized to uint8 (W8A8 / W4A8)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_act(device)


def _int8_input_conv(base: type[nn.Module]) -> type[nn.Module]:
    def __init__(self, *args: Any, device: Any = None, **kwargs: Any) -> None:
        base.__init__(self, *args, device=device, **kwargs)
        self._init_act(device)

    doc = f"``nn.{base.__name__}`` whose input is statically quantized to uint8 (W8A8 / W4A8)."
    return type(f"Int8Input{base.__name__}", (_Int8Input, base),
                {"__init__": __init__, "__doc__": doc, "__module__": __name__})


Int8InputConv1d = _int8_input_conv(nn.Conv1d)
Int8InputConv2d = _int8_input_conv(nn.Conv2d)
Int8InputConv3d = _int8_input_conv(nn.Conv3d)

#: Float layer class -> its ``Int8Input`` counterpart (same constructor, same tensors plus
#: ``act_scale`` and ``act_zero_point``).
INT8_INPUT_TYPES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: Int8InputLinear,
    nn.Conv1d: Int8InputConv1d,
    nn.Conv2d: Int8InputConv2d,
    nn.Conv3d: Int8InputConv3d,
}
register_module_type(Int8InputLinear, ("in_features", "out_features", "bias"))
for _cls in (Int8InputConv1d, Int8InputConv2d, Int8InputConv3d):
    register_module_type(_cls, _CONV)


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


def build(spec: dict[str, Any], where: str = "") -> nn.Module:
    """Rebuild a module from :func:`describe`'s output (only allow-listed classes); errors name
    the module's place as ``where`` (e.g. ``arch.tree.children[0][1]``)."""
    prefix = f"{where}: " if where else ""
    if not isinstance(spec, dict):
        raise ArtifactError(
            f"{prefix}a module description must be a JSON object, got {type(spec).__name__}"
        )
    try:
        cls, allowed = MODULE_TYPES[spec["type"]]
    except (KeyError, TypeError):
        raise ArtifactError(
            f"{prefix}module type {str(spec.get('type'))[:80]!r} is not allowed in artifacts"
        ) from None
    args = spec.get("args", {})
    if not isinstance(args, dict):
        raise ArtifactError(f"{prefix}arguments of {cls.__name__} must be a JSON object")
    args = dict(args)
    if set(args) - set(allowed):
        raise ArtifactError(
            f"{prefix}unexpected arguments {sorted(set(args) - set(allowed))} for {cls.__name__}"
        )
    for key, value in args.items():
        if isinstance(value, list):
            args[key] = tuple(value)
        elif not isinstance(value, _SIMPLE):
            raise ArtifactError(f"{prefix}argument {key} of {cls.__name__} is not a simple value")
    if cls is nn.Sequential:
        module = nn.Sequential()
        children = spec.get("children", [])
        if not isinstance(children, list):
            raise ArtifactError(f"{prefix}children must be a list of [name, module]")
        for i, pair in enumerate(children):
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
                raise ArtifactError(f"{prefix}children must be a list of [name, module]")
            child = build(pair[1], f"{where or 'module'}.children[{i}][1]")
            try:
                module.add_module(pair[0], child)
            except KeyError as exc:  # add_module refuses empty names, dots, existing attributes
                raise ArtifactError(f"{prefix}bad child name {pair[0][:80]!r}: {exc}") from None
        return module
    try:
        return cls(**args)
    except ArtifactError:
        raise
    except Exception as exc:  # torch raises TypeError, ValueError, RuntimeError, OverflowError
        raise ArtifactError(
            f"{prefix}cannot build {cls.__name__}({str(args)[:200]}): {str(exc)[:200]}"
        ) from None


def rebuilt_shapes(module: nn.Module) -> dict[str, tuple[int, ...]] | None:
    """The shapes of ``module``'s own parameters and persistent buffers as its constructor
    arguments imply (an allow-listed leaf rebuilt with :func:`build`), or None for a class that
    is not allow-listed. Call it under ``torch.device("meta")`` to allocate nothing."""
    entry = MODULE_TYPES.get(type(module).__name__)
    if entry is None or type(module) is not entry[0] or isinstance(module, nn.Sequential):
        return None
    fresh = build(describe(module))
    tensors = {**fresh._parameters, **fresh._buffers}
    return {
        name: tuple(t.shape)
        for name, t in tensors.items()
        if t is not None and name not in fresh._non_persistent_buffers_set
    }


@dataclass
class Allocation:
    """What an :func:`allocation_guard` counted."""

    bytes: int = 0
    modules: int = 0
    error: ArtifactError | None = None


@contextmanager
def allocation_guard(max_bytes: int, max_modules: int, what: str) -> Iterator[Allocation]:
    """Count the parameters, buffers and modules registered in this thread while active, and
    refuse (``ArtifactError``) once they pass ``max_bytes`` or ``max_modules``.

    A registration hook sees a parameter after its storage exists but before a constructor
    initialises it, so a model that would need gigabytes stops at its first oversized layer;
    build under ``torch.device("meta")`` first to count without allocating. Code that swallows
    the error (an adapter wrapping ``ValueError``) does not hide it: it is in ``.error`` and
    every later registration raises it again.
    """
    count = Allocation()
    thread = threading.get_ident()

    def refuse() -> None:
        if count.error is None:
            count.error = ArtifactError(
                f"{what} needs more than {max_bytes:,} bytes of parameters and buffers or "
                f"more than {max_modules:,} modules (counted so far: {count.bytes:,} bytes, "
                f"{count.modules:,} modules)"
            )
        raise count.error

    def tensor_hook(module: nn.Module, name: str, tensor: torch.Tensor | None) -> None:
        if threading.get_ident() != thread:
            return
        if tensor is not None:
            count.bytes += tensor.numel() * tensor.element_size()
        if count.error is not None or count.bytes > max_bytes:
            refuse()

    def module_hook(module: nn.Module, name: str, child: nn.Module | None) -> None:
        if threading.get_ident() != thread:
            return
        count.modules += 1
        if count.error is not None or count.modules > max_modules:
            refuse()

    handles = [
        _module_hooks.register_module_parameter_registration_hook(tensor_hook),
        _module_hooks.register_module_buffer_registration_hook(tensor_hook),
        _module_hooks.register_module_module_registration_hook(module_hook),
    ]
    try:
        yield count
    finally:
        for handle in handles:
            handle.remove()


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


def _own(module: nn.Module) -> set[str]:
    """Names of a module's own parameters and buffers (a layer that gained a bias differs)."""
    return {n for n, _ in module.named_parameters(recurse=False)} | {
        n for n, _ in module.named_buffers(recurse=False)}


def diff(base: nn.Module, model: nn.Module) -> list[dict[str, Any]]:
    """Edits that turn ``base`` (rebuilt from its spec) into ``model``'s architecture:
    ``{"op": "set", "path", "attrs"}`` for changed simple attributes (e.g. ``out_channels``
    after channel pruning) and ``{"op": "replace", "path", "module"}`` for swapped modules and
    for modules whose own parameters changed (a BatchNorm folded into a layer without bias)."""
    base_modules = dict(base.named_modules())
    edits: list[dict[str, Any]] = []
    replaced: list[str] = []
    seen = set()
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in replaced):
            continue
        seen.add(name)
        old = base_modules.get(name)
        if old is None or type(old) is not type(module) or _own(old) != _own(module):
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


def _same_kind(current: Any, value: Any) -> bool:
    """Whether an edit may store ``value`` where the base model holds ``current``."""
    if current is None or value is None:
        return True
    if isinstance(current, bool) or isinstance(value, bool):
        return isinstance(current, bool) and isinstance(value, bool)
    if isinstance(current, (int, float)):
        return isinstance(value, (int, float))
    if isinstance(current, (tuple, list)):
        return isinstance(value, list)
    return isinstance(current, str) and isinstance(value, str)


def apply_edits(model: nn.Module, edits: list[dict[str, Any]]) -> None:
    """Apply :func:`diff`'s edits to a freshly built base model."""
    if not isinstance(edits, list):
        raise ArtifactError("edits must be a list")
    for edit in edits:
        path = edit.get("path") if isinstance(edit, dict) else None
        if not isinstance(path, str):
            raise ArtifactError(f"malformed edit {str(edit)[:120]}")
        if edit.get("op") == "replace":
            parent_name, _, child = path.rpartition(".")
            try:
                parent = model.get_submodule(parent_name)
            except AttributeError:
                raise ArtifactError(f"edit refers to a missing module {parent_name!r}") from None
            if not child or (child not in parent._modules and hasattr(parent, child)):
                raise ArtifactError(
                    f"edit replaces {path!r}, which is an attribute of its parent, not a module"
                )
            setattr(parent, child, build(edit.get("module"), "module"))
        elif edit.get("op") == "set":
            try:
                module = model.get_submodule(path)
            except AttributeError:
                raise ArtifactError(f"edit refers to a missing module {path!r}") from None
            attrs = edit.get("attrs")
            if not isinstance(attrs, dict):
                raise ArtifactError(f"edit of {path!r}: attrs must be a JSON object")
            for key, value in attrs.items():
                if key not in vars(module) or key.startswith("_"):
                    raise ArtifactError(f"edit sets unknown attribute {key!r} of {path!r}")
                current = vars(module)[key]
                if not isinstance(value, _SIMPLE) and not (
                    isinstance(value, list) and all(isinstance(v, _SIMPLE) for v in value)
                ):
                    raise ArtifactError(f"edit sets {key!r} of {path!r} to a non-simple value")
                try:
                    _jsonable(current)
                except TypeError:
                    raise ArtifactError(
                        f"edit sets {key!r} of {path!r}, which does not hold a simple value"
                    ) from None
                if not _same_kind(current, value):
                    raise ArtifactError(
                        f"edit sets {key!r} of {path!r} to {str(value)[:40]} "
                        f"({type(value).__name__}) where the model holds a "
                        f"{type(current).__name__}"
                    )
                if isinstance(value, list):
                    value = tuple(value) if isinstance(current, tuple) else list(value)
                setattr(module, key, value)
        else:
            raise ArtifactError(f"unknown edit operation {str(edit.get('op'))[:40]!r}")


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


def failing_module(
    model: nn.Module, example: torch.Tensor
) -> tuple[str, BaseException] | None:
    """Run ``model`` on ``example`` (eval mode, no gradients); if it raises, the name of the
    innermost module whose forward was running (``"(top level)"`` if none) and the error."""
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[str] = []

    def enter(module: nn.Module, args: object) -> None:
        stack.append(names.get(id(module), "?"))

    def leave(module: nn.Module, args: object, out: object) -> None:
        if stack:
            stack.pop()

    handles = [h for m in model.modules()
               for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
        return None
    except Exception as exc:
        return (stack[-1] if stack and stack[-1] else "(top level)"), exc
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def _where(model: nn.Module, found: tuple[str, BaseException]) -> str:
    """``"module <name> (<Type>) (<Error>: <first line>)"`` for :func:`failing_module`'s result."""
    name, exc = found
    try:
        where = f"{name} ({type(model.get_submodule(name)).__name__})"
    except AttributeError:  # "(top level)"
        where = name
    line = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"module {where} ({type(exc).__name__}: {line})"


def why_broken(model: nn.Module, example: torch.Tensor, what: str) -> str | None:
    """Why ``model`` no longer runs on ``example`` after ``what`` (e.g. ``"pruning it"``):
    ``"<what> broke module <name> (<Type>) (<Error>: <first line>): Torch-Pruning missed a
    dependency there"``, or None when it runs (:func:`failing_module`)."""
    found = failing_module(model, example)
    if found is None:
        return None
    return f"{what} broke {_where(model, found)}: Torch-Pruning missed a dependency there"


def replace_or_put_back(model: nn.Module, replacements: dict[str, nn.Module],
                        example: torch.Tensor | None) -> dict[str, str]:
    """Put each of ``replacements`` (module name → new module) where that module was, then check
    that ``model`` still runs on ``example``. If it does not, the replacements are tried one at a
    time and each one that breaks the model is put back; returns {name: why} for those (empty
    when every replacement stays). A model can depend on a layer being what it was, e.g. timm's
    EdgeNeXt reads ``token_projection.weight.device`` in its forward, which a factorised layer
    no longer has. When the model does not run on ``example`` even as it was, nothing can be
    judged: every replacement stays and a warning is logged; with no ``example`` (no data and no
    known input shape) every replacement stays unchecked."""
    originals = {name: model.get_submodule(name) for name in replacements}

    def put(name: str, module: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)

    for name, module in replacements.items():
        put(name, module)
    if example is None or failing_module(model, example) is None:
        return {}
    for name, module in originals.items():
        put(name, module)
    found = failing_module(model, example)
    if found is not None:  # the example does not fit the model: nothing can be judged by it
        for name, module in replacements.items():
            put(name, module)
        logging.getLogger("netshrink").warning(
            "could not check the replaced layers: the model does not run on its example input "
            "even as it was (%s)", _where(model, found))
        return {}
    refused: dict[str, str] = {}
    for name, module in replacements.items():
        put(name, module)
        found = failing_module(model, example)
        if found is not None:
            put(name, originals[name])
            refused[name] = (f"left as it was: replacing it broke {_where(model, found)} (the "
                             "model depends on this layer's type or attributes)")
    return refused


def prune_or_put_back(group: Any, check: Callable[[], str | None], *,
                      also: Sequence[nn.Module] = (),
                      before: Callable[[], None] | None = None,
                      then: Callable[[], None] | None = None) -> str | None:
    """Prune a Torch-Pruning ``group`` (after ``before``, e.g. folding what the removed units
    contributed into the next layers' biases; then ``then``, e.g. updating an attention's head
    count) and ``check`` the model (``check()``: why it no longer runs, or None). If any of it
    raises or the check fails, every module the group changed, and those in ``also``, is put
    back in place and the reason is returned; None when the group is pruned and the model
    checks. Torch-Pruning can miss a dependency (a split whose sizes live in an attribute, a
    partial residual add) and leave a model that fails; this keeps the rest of the surgery going.

    Modules are restored in place (their own parameters, buffers and attributes; submodules stay
    the same objects), so a dependency graph holding them stays valid."""
    changed = [dep.target.module for dep, _ in group] + list(also)
    saved = [(m, _own_state(m)) for m in {id(m): m for m in changed}.values()]
    try:
        if before is not None:
            before()
        group.prune()
        if then is not None:
            then()
        why = check()
    except (TimeoutError, NetshrinkError):
        raise
    except Exception as exc:  # Torch-Pruning failing inside this group's surgery
        why = f"Torch-Pruning failed pruning the group ({type(exc).__name__}: " \
              f"{(str(exc).strip().splitlines() or [''])[0][:300]})"
    if why is None:
        return None
    for module, state in saved:
        children = vars(module).get("_modules")
        module.__dict__.clear()
        module.__dict__.update(state)
        if children is not None:
            module.__dict__["_modules"] = children
    still = check()
    if still is not None:
        raise NetshrinkError(f"{why}; putting the group back did not repair the model: {still}")
    return why


def _own_state(module: nn.Module) -> dict[str, Any]:
    """A copy of ``module``'s own attributes (not its submodules)."""
    return {key: _copy_or_keep(value) for key, value in vars(module).items() if key != "_modules"}


def _copy_or_keep(value: Any) -> Any:
    """``copy.deepcopy(value)``; where that fails (an autograd node that Torch-Pruning's op nodes
    keep, a cache holding a tensor with a graph), containers are copied item by item, a tensor
    with a graph is copied detached and anything else is kept by reference."""
    try:
        return copy.deepcopy(value)
    except (TypeError, RuntimeError):
        if isinstance(value, torch.Tensor):
            return value.detach().clone()
        if isinstance(value, dict):
            return type(value)((k, _copy_or_keep(v)) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return type(value)(_copy_or_keep(v) for v in value)
        return value
