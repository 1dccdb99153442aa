"""Static int8 activations for ``quantize`` (W8A8 / W4A8; Jacob et al. 2018,
https://arxiv.org/abs/1712.05877, section 3; observers as in Nagel et al. 2021, "A White Paper
on Neural Network Quantization", https://arxiv.org/abs/2106.08295, section 3.5).

Each layer whose input is quantized gets one uint8 scale and zero point for its input tensor
and one for its output tensor (so an int8 runtime can keep the result in int8: onnxruntime
fuses ``DequantizeLinear -> Conv -> QuantizeLinear`` into ``QLinearConv``), calibrated in one
pass over the validation split by an observer:

- ``minmax``: the smallest and largest input seen (always widened to include 0);
- ``percentile``: the ``100 - p`` and ``p`` percentiles of a deterministic subsample;
- ``mse``: the min/max range shrunk by the ratio in 0.5..1.0 (step 0.025) whose fake-quantized
  subsample has the smallest squared error.

The output grid of a layer whose output feeds only a ReLU (directly, or through a folded
BatchNorm's ``nn.Identity``; found by ``torch.fx``) is calibrated on the ReLU's output: its zero
point is 0, so rounding onto it *is* the ReLU, and the export drops the then redundant ``Relu``
(:func:`netshrink.export.drop_clamped_relus`) so onnxruntime keeps the result in int8.

Before calibration, a BatchNorm that directly follows a selected layer (found by ``torch.fx``, or,
for a model fx cannot trace, as the next child of the same ``nn.Sequential``) is folded into it
and replaced by ``nn.Identity``, as an int8 kernel computes it. The layer is then replaced by its
``Int8Input*`` counterpart (same tensors plus the scalar buffers ``act_scale``,
``act_zero_point``, ``out_scale`` and ``out_zero_point``: 10 bytes per layer, stored in the
artifact like any tensor and counted in its bytes) whose forward quantizes the input and the
output: the in-memory model simulates exactly what :func:`netshrink.load` and the ONNX export
run.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import torch
from torch import nn

from netshrink import (
    INT8_INPUT_TYPES,  # layer types the artifact format allow-lists
    ConfigError,
    DataError,
)

#: Values of each layer's input kept per calibration batch for the percentile and MSE observers.
SAMPLE = 1 << 16
#: Values of each layer's input the percentile and MSE observers use at most (strided).
MAX_SAMPLES = 1 << 22
#: Clipping ratios the ``mse`` observer tries (the same grid as the weights' ``clip: mse``).
MSE_RATIOS = tuple(1.0 - 0.025 * i for i in range(21))
_QMAX = 255
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class RangeObserver:
    """Collects one layer's input range (and a subsample) over calibration batches."""

    def __init__(self) -> None:
        self.lo, self.hi = math.inf, -math.inf
        self.samples: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        """Record a batch of the layer's input."""
        flat = x.detach().reshape(-1).float()
        if flat.numel() == 0:
            return
        self.lo = min(self.lo, float(flat.min()))
        self.hi = max(self.hi, float(flat.max()))
        step = -(-flat.numel() // SAMPLE)  # deterministic: every step-th value
        self.samples.append(flat[::step].cpu())

    def range(self, observer: str, percentile: float) -> tuple[float, float]:
        """The calibrated ``(lo, hi)`` with ``lo <= 0 <= hi``."""
        if not self.samples:
            raise ConfigError("quantize: a layer saw no calibration inputs")
        lo, hi = self.lo, self.hi
        if observer == "minmax":
            return min(lo, 0.0), max(hi, 0.0)
        values = torch.cat(self.samples)
        values = values[:: -(-values.numel() // MAX_SAMPLES)]  # torch.quantile's size limit
        if observer == "percentile":
            qs = torch.tensor([1 - percentile / 100, percentile / 100], dtype=values.dtype)
            lo, hi = (float(v) for v in torch.quantile(values, qs))
        elif observer == "mse":
            lo, hi = _mse_range(values, lo, hi)
        return min(lo, 0.0), max(hi, 0.0)


def scale_zero_point(lo: float, hi: float) -> tuple[float, int]:
    """The uint8 grid covering ``[lo, hi]`` (``lo <= 0 <= hi``): ``(scale, zero_point)``."""
    scale = (hi - lo) / _QMAX
    if not scale > 0 or not math.isfinite(scale):
        return 1.0, 0
    scale = float(torch.tensor(scale, dtype=torch.float32))
    return scale, int(min(max(round(-lo / scale), 0), _QMAX))


def fake_quant(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """``x`` on the uint8 grid ``(scale, zero_point)`` (as the Int8Input layers compute it)."""
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, _QMAX)
    return (q - zero_point) * scale


def _mse_range(values: torch.Tensor, lo: float, hi: float) -> tuple[float, float]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)

    def error(ratio: float) -> float:
        scale, zp = scale_zero_point(lo * ratio, hi * ratio)
        return float((fake_quant(values, scale, zp) - values).pow(2).mean())

    best = min(MSE_RATIOS, key=error)
    return lo * best, hi * best


def calibrate(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Iterable,
    limit: int,
    device: torch.device,
    observer: str,
    percentile: float,
    relu_outputs: Iterable[str] = (),
) -> dict[str, tuple[tuple[float, int], tuple[float, int]]]:
    """The input and output grids ``((scale, zero_point), (scale, zero_point))`` of each
    layer, observed on the first ``limit`` batches of ``batches`` (one forward pass each).

    The output grid of a layer named in ``relu_outputs`` (its output feeds only a ReLU) is
    calibrated on the ReLU's output, so its zero point is 0: quantizing onto it is the ReLU
    itself, and no code is spent on values the ReLU discards."""
    seen_in = {name: RangeObserver() for name in layers}
    seen_out = {name: RangeObserver() for name in layers}
    relu = set(relu_outputs)
    handles = []
    for name, module in layers.items():
        handles.append(module.register_forward_pre_hook(
            lambda _m, args, o=seen_in[name]: o.update(args[0])))
        handles.append(module.register_forward_hook(
            lambda _m, _args, out, o=seen_out[name], r=name in relu:
            o.update(out.clamp_min(0) if r else out)))
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with torch.no_grad():
            for x, _ in batches:
                if seen >= limit:
                    break
                model(x.to(device))
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if seen == 0:
        raise DataError("quantize: activations 'int8' needs validation batches; the split is empty")
    missing = [name for name, o in seen_in.items() if not o.samples]
    if missing:
        raise ConfigError(
            f"quantize: activations 'int8' saw no calibration inputs for layer(s) {missing[:5]}: "
            "they did not run in the forward pass; select only layers the model uses"
        )
    return {
        name: (scale_zero_point(*seen_in[name].range(observer, percentile)),
               scale_zero_point(*seen_out[name].range(observer, percentile)))
        for name in layers
    }


def following_batchnorms(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """``{layer: batchnorm}`` for each of ``names`` whose output feeds only a BatchNorm."""
    wanted = set(names)
    modules = dict(model.named_modules())
    pairs: dict[str, str] = {}
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # fx cannot trace every model: fall back to nn.Sequential neighbours
        for parent_name, parent in modules.items():
            if not isinstance(parent, nn.Sequential):
                continue
            children = list(parent.named_children())
            for (a, _), (b, m) in itertools.pairwise(children):
                full = f"{parent_name}.{a}" if parent_name else a
                if full in wanted and isinstance(m, _BN):
                    pairs[full] = f"{parent_name}.{b}" if parent_name else b
        return pairs
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in wanted or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.op == "call_module" and isinstance(modules.get(user.target), _BN):
            pairs[node.target] = user.target
    return pairs


#: What a layer's output may pass through on its way to a ReLU without changing its values.
_PASS_THROUGH = (nn.Identity, nn.Dropout)
_RELU_FUNCTIONS = (torch.relu, torch.nn.functional.relu, torch.relu_)


def _is_relu(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def following_relus(model: nn.Module, names: Iterable[str]) -> set[str]:
    """The layers of ``names`` whose output feeds only a ReLU (through ``nn.Identity`` or
    ``nn.Dropout`` at most, as a folded BatchNorm leaves), found by ``torch.fx``; none for a
    model fx cannot trace."""
    wanted = set(names)
    modules = dict(model.named_modules())
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # the grids then cover negative outputs too, which is still exact
        return set()
    found = set()
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in wanted:
            continue
        user = node
        while len(user.users) == 1:
            user = next(iter(user.users))
            if user.op == "call_module" and isinstance(modules.get(user.target), _PASS_THROUGH):
                continue
            if _is_relu(user, modules):
                found.add(node.target)
            break
    return found


def fold_batchnorm(model: nn.Module, layer_name: str, bn_name: str) -> nn.Module:
    """Fold BatchNorm ``bn_name`` into the layer before it (in place; the layer gains a bias
    if it had none) and replace the BatchNorm by ``nn.Identity``. Returns the layer."""
    layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
    if bn.running_mean is None or bn.running_var is None:
        raise ConfigError(
            f"quantize: cannot fold BatchNorm {bn_name} into {layer_name} for activations "
            "'int8': it keeps no running statistics (track_running_stats=False); exclude "
            f"{layer_name} from the step's select"
        )
    weight = layer.weight.detach()
    with torch.no_grad():
        factor = torch.rsqrt(bn.running_var.float() + bn.eps)
        shift = -bn.running_mean.float() * factor
        if bn.affine:
            factor, shift = factor * bn.weight.float(), shift * bn.weight.float() + bn.bias.float()
        if factor.numel() != weight.shape[0]:
            raise ConfigError(
                f"quantize: BatchNorm {bn_name} has {factor.numel()} features but {layer_name} "
                f"has {weight.shape[0]} outputs; exclude {layer_name} from the step's select"
            )
        view = (-1,) + (1,) * (weight.dim() - 1)
        layer.weight.copy_(weight * factor.reshape(view).to(weight.dtype))
        old_bias = layer.bias.detach() if layer.bias is not None else torch.zeros_like(factor)
        bias = (old_bias.float() * factor + shift).to(weight.dtype)
        layer.bias = nn.Parameter(bias, requires_grad=layer.weight.requires_grad)
    _replace(model, bn_name, nn.Identity())
    return layer


def with_int8_input(
    model: nn.Module, name: str, grid_in: tuple[float, int], grid_out: tuple[float, int]
) -> nn.Module:
    """Replace layer ``name`` by its ``Int8Input*`` counterpart holding the same parameters
    and the input and output grids ``(scale, zero_point)``. Returns the new layer."""
    old = model.get_submodule(name)
    cls = INT8_INPUT_TYPES[type(old)]
    with torch.device("meta"):
        new = cls(**_constructor_args(old))
    new.weight, new.bias = old.weight, old.bias
    device = old.weight.device
    for side, (scale, zero_point) in (("act", grid_in), ("out", grid_out)):
        setattr(new, f"{side}_scale", torch.tensor(scale, dtype=torch.float32, device=device))
        setattr(new, f"{side}_zero_point",
                torch.tensor(zero_point, dtype=torch.uint8, device=device))
    new.train(old.training)
    _replace(model, name, new)
    return new


def quantizable(module: nn.Module) -> str | None:
    """Why ``module``'s input cannot be quantized (``None`` if it can)."""
    if type(module) not in INT8_INPUT_TYPES:
        return f"a {type(module).__name__} (int8 activations: Linear and Conv1d/2d/3d)"
    if module.weight.dtype != torch.float32:
        return f"a {module.weight.dtype} layer (int8 activations need fp32 layers)"
    return None


def _constructor_args(module: nn.Module) -> dict:
    if isinstance(module, nn.Linear):
        return {"in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    names = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
             "groups", "padding_mode")
    return {**{k: getattr(module, k) for k in names}, "bias": module.bias is not None}


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    if not name:
        raise ConfigError("quantize: activations 'int8' cannot replace the root module")
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)
