"""Export an artifact to ONNX, with its weights kept low-bit where ONNX can say so, or to pt2.

``export(path, out, format="onnx")`` loads the artifact (:func:`netshrink.load`, never pickle),
exports the dense decode with torch's ONNX exporter (batch axis dynamic), then rewrites the graph
so each encoded weight is stored as its encoding stores it:

- **quantized** weights become INT-coded initializers (UINT4 for 1–4 bits at opset 21 or later,
  UINT8 otherwise) feeding ``DequantizeLinear`` with a per-tensor, per-channel (axis 0) or
  blocked (``block_size``, opset 21) scale and zero point: exactly the artifact's
  ``(code - zero_point) * scale``;
- **codebook** weights become an index initializer (UINT4 / UINT8 / UINT16) cast to int64 and a
  ``Gather`` from an fp32 centroid table;
- **sparse** weights take the smallest of the forms that run in onnxruntime, measured per tensor
  in initializer bytes: the kept values (dense, quantized or codebook) scattered with
  ``ScatterElements`` at positions stored as a bit mask or as 8/16-bit gaps, a full low-bit
  tensor (codes whose pruned entries hold the zero point, or indices into a table with an extra
  0 centroid), or the dense fp32 tensor when that is smaller;
- **perturbed codebooks** (noise regenerated from a seed by torch's generator, which ONNX cannot
  reproduce) and tensors the exporter folded into other constants stay dense fp32 with an
  :class:`ExportWarning`, or are refused with :class:`~netshrink.errors.ExportError` when
  ``strict=True``.

Each weight is matched to the exported initializer by name, else by value, and only when the
initializer equals the decoded tensor exactly (``numpy.array_equal``), so the rewrite cannot
change what the model computes. The result is checked with ``onnx.checker`` and, by default,
run once in onnxruntime against :func:`netshrink.load`'s output before it is written
(atomically).

Layers with **int8 activations** (``quantize`` with ``activations: int8``) export their input
and output grids as ``QuantizeLinear`` -> ``DequantizeLinear`` pairs (uint8, per tensor, the
artifact's stored scale and zero point) around the layer, so onnxruntime's graph optimizer fuses
``DequantizeLinear -> Conv/Gemm -> QuantizeLinear`` into its int8 kernels (``QLinearConv``,
``QGemm``); those requantize in integers, so the check against netshrink allows
:data:`QDQ_RTOL` instead of :data:`PACKED_RTOL`.

``format="pt2"`` saves a ``torch.export`` program instead. onnx and onnxruntime come with the
optional extra ``netshrink[onnx]``.
"""

from __future__ import annotations

import importlib
import io
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from netshrink.adapters import model_info
from netshrink.artifact import _read_blob, _reader, load, read_manifest
from netshrink.encodings import Codebook, Dense, Encoding, Quantized, Sparse
from netshrink.errors import ArtifactError, ConfigError, ExportError, NetshrinkError
from netshrink.fileio import atomic_write
from netshrink.modules import INT8_INPUT_TYPES
from netshrink.runtime import PACKED_RTOL

#: Formats :func:`export` writes.
FORMATS = ("onnx", "pt2")
#: The ONNX opset used unless one is given: the first with INT4/UINT4 tensors.
DEFAULT_OPSET = 21
#: The lowest opset accepted: per-axis ``DequantizeLinear`` needs 13.
MIN_OPSET = 13
#: ONNX exporter paths: ``auto`` tries torch's TorchScript exporter (fast; opsets up to 20,
#: converted up with ``onnx.version_converter``) and then the ``torch.export`` one (dynamo).
EXPORTERS = ("auto", "torchscript", "dynamo")
#: The optional dependency group that brings onnx and onnxruntime.
EXTRA = "onnx"
#: Tolerance of the check against onnxruntime for a model with int8 activations (``quantize``
#: with ``activations: int8``): onnxruntime runs ``QLinearConv`` / ``QGemm`` and requantizes
#: their int32 sums with its own rounding, so an activation on a rounding boundary of its grid
#: moves one step (measured: at most 1e-3 of the output's magnitude on LeNet-5 / digits, with
#: the same top-1 on every example).
QDQ_RTOL = 1e-2
#: ... plus this many steps of the widest activation grid: on a model whose outputs are small
#: (an untrained one) one requantization step at the last int8 layer is more than 1% of them.
QDQ_STEPS = 4
#: onnxruntime session settings for exact outputs: by default onnxruntime fuses a 4-bit
#: ``DequantizeLinear`` feeding ``MatMul`` into ``MatMulNBits`` at accuracy level 4, which
#: rounds the activations to int8 (outputs then differ by about 1%); level 1 computes in fp32.
ORT_EXACT_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}

#: onnxruntime graph optimizers :func:`ort_session` turns off. QDQ propagation moves the
#: ``QuantizeLinear`` of an int8 layer's input up across a ``MaxPool`` that follows a float
#: layer, and onnxruntime's uint8 NCHW ``MaxPool`` is slower than the fp32 one it replaces
#: (7.8 ms against 1.2 ms at batch 64 on LeNet-5 / digits28, one thread); it changes nothing
#: for weight-only files, whose ``DequantizeLinear`` nodes feed the layers directly.
ORT_DISABLED_OPTIMIZERS = ("QDQPropagationTransformer",)

# What happens to a tensor that cannot stay low-bit. docs/export.md quotes these texts and a
# test checks that it does; a warning adds "; exported dense fp32 (pass strict=True to refuse)"
# and a strict refusal "; pass strict=False to export it dense fp32".
MSG_PERTURBED = (
    "a perturbed codebook's noise is regenerated from a seed by torch's random generator, "
    "which ONNX cannot reproduce"
)
MSG_UNMATCHED = (
    "no initializer of the exported graph equals the decoded tensor (the exporter folded it "
    "into another constant, or the forward pass does not use it)"
)
MSG_UNKNOWN_KIND = "this encoding kind has no low-bit ONNX form"
MSG_BLOCKED_OPSET = (
    "blocked (per-group) scales need DequantizeLinear's block_size: opset 21 or later"
)
MSG_NOT_FLOAT = "only fp32 tensors are rewritten"


class ExportWarning(UserWarning):
    """An encoded tensor was exported dense fp32 because ONNX cannot express its encoding."""


class _NoLowBit(Exception):
    """The tensor keeps its dense initializer; the argument says why."""


def export(
    artifact_path: str | Path,
    out: str | Path,
    *,
    format: str = "onnx",
    opset: int | None = None,
    strict: bool = False,
    input_shape: tuple[int, ...] | None = None,
    exporter: str = "auto",
    verify: bool = True,
) -> Path:
    """Export the artifact at ``artifact_path`` to ``out`` as ``format`` (``onnx`` or ``pt2``).

    Args:
        artifact_path: a netshrink artifact (``.nsk``); loaded with :func:`netshrink.load`.
        out: the file to write (atomically; parent folders are created).
        format: ``"onnx"`` (see :func:`export_onnx`) or ``"pt2"`` (see :func:`export_pt2`).
        opset: the ONNX opset (default :data:`DEFAULT_OPSET`; at least :data:`MIN_OPSET`).
        strict: refuse (:class:`~netshrink.errors.ExportError`) instead of exporting a tensor
            dense when ONNX cannot keep its encoding.
        input_shape: one example's input shape without the batch axis (default: the shape the
            artifact records).
        exporter: which torch ONNX exporter to use (:data:`EXPORTERS`).
        verify: run the ONNX file once in onnxruntime and compare with netshrink's output.

    Returns the path written. Raises :class:`~netshrink.errors.ConfigError` for a bad argument,
    :class:`~netshrink.errors.ArtifactError` for a bad artifact and
    :class:`~netshrink.errors.ExportError` when the model cannot be exported.
    """
    if format not in FORMATS:
        raise ConfigError(f"export: field 'format': {format!r} is not one of {list(FORMATS)}")
    if format == "pt2":
        if opset is not None:
            raise ConfigError("export: field 'opset': only the onnx format has an opset")
        return export_pt2(artifact_path, out, input_shape=input_shape)
    return export_onnx(
        artifact_path, out, opset=opset, strict=strict, input_shape=input_shape,
        exporter=exporter, verify=verify,
    )


def export_onnx(
    artifact_path: str | Path,
    out: str | Path,
    *,
    opset: int | None = None,
    strict: bool = False,
    input_shape: tuple[int, ...] | None = None,
    exporter: str = "auto",
    verify: bool = True,
) -> Path:
    """Write the artifact as an ONNX model whose weights stay low-bit (module docstring).

    Arguments as for :func:`export`. Returns the path written.
    """
    onnx = _require("onnx")
    opset = _check_opset(opset)
    if exporter not in EXPORTERS:
        raise ConfigError(f"export: field 'exporter': {exporter!r} is not one of {list(EXPORTERS)}")
    model = load(artifact_path)
    encodings = read_encodings(artifact_path)
    x = _example_input(model, input_shape)
    proto = _to_onnx(model, x, opset, exporter)
    lower_weights(proto, encodings, opset=opset, strict=strict, signed=int8_weights(model))
    drop_clamped_relus(proto)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # onnx raises its own ValidationError / InferenceError types
        raise ExportError(
            f"export onnx: the rewritten graph fails onnx.checker ({str(exc)[:300]}); "
            "retry with strict=False or another opset, and please report it"
        ) from None
    if verify:
        _verify(proto, model, x)
    return atomic_write(out, proto.SerializeToString())


def export_pt2(
    artifact_path: str | Path, out: str | Path, *, input_shape: tuple[int, ...] | None = None
) -> Path:
    """Write the artifact's model as a ``torch.export`` program (``torch.export.save``).

    The packed model (:func:`netshrink.load` with ``runtime="packed"``) is exported when torch
    can trace it, so int8 / int4 kernel layouts and stored arrays stay as they are; otherwise the
    dense decode, with an :class:`ExportWarning`. Raises :class:`~netshrink.errors.ExportError`
    when neither traces.
    """
    packed = load(artifact_path, runtime="packed")
    x = _example_input(packed, input_shape)
    errors: list[str] = []
    for model in (packed, None):
        model = model or load(artifact_path)
        try:
            buffer = _pt2_bytes(model, x)
        except Exception as exc:  # torch.export raises many unrelated types
            errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            continue
        if errors:
            warnings.warn(
                f"export pt2: torch.export cannot trace the packed model ({errors[0]}); "
                "exported the dense decode (fp32 weights) instead", ExportWarning, stacklevel=3)
        return atomic_write(out, buffer)
    raise ExportError(
        f"export pt2: torch.export cannot trace this model (packed: {errors[0]}; dense: "
        f"{errors[-1]}); use --format onnx instead"
    )


def _pt2_bytes(model: nn.Module, x: torch.Tensor) -> bytes:
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def read_encodings(artifact_path: str | Path) -> dict[str, Encoding]:
    """Every tensor's :class:`~netshrink.Encoding` from the artifact's manifest and blob."""
    manifest = read_manifest(artifact_path)
    read = _reader(_read_blob(Path(artifact_path)))
    out = {}
    for name, record in manifest["t"].items():
        try:
            out[name] = Encoding.from_record(record, read)
        except NetshrinkError as exc:
            raise ArtifactError(f"{artifact_path}: t[{name!r}]: {exc}") from None
    return out


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(
            f"export onnx needs {module!r}, which is not installed: "
            f"pip install 'netshrink[{EXTRA}]'"
        ) from None


def _check_opset(opset: int | None) -> int:
    opset = DEFAULT_OPSET if opset is None else opset
    if type(opset) is not int or opset < MIN_OPSET:
        raise ConfigError(
            f"export: field 'opset': {opset!r} is not an integer >= {MIN_OPSET} "
            "(per-channel DequantizeLinear needs opset 13; INT4 weights need 21)"
        )
    return opset


def _example_input(model: nn.Module, input_shape: tuple[int, ...] | None) -> torch.Tensor:
    shape = input_shape or (model_info(model).input_shape if model_info(model) else None)
    if not shape:
        raise ExportError(
            "export: the artifact records no input shape; pass input_shape= (one example's "
            "shape without the batch axis, e.g. (3, 32, 32))"
        )
    info = model_info(model)
    if info is not None and info.input_dtype and not info.input_dtype.startswith("float"):
        return info.example_input(2)  # token ids: zeros (padding) of the input shape
    torch.manual_seed(0)
    return torch.randn(2, *tuple(int(s) for s in shape))


# -- torch -> ONNX ----------------------------------------------------------------------------


def _to_onnx(model: nn.Module, x: torch.Tensor, opset: int, exporter: str) -> Any:
    failures = []
    paths = ("torchscript", "dynamo") if exporter == "auto" else (exporter,)
    for path in paths:
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                return _torchscript(model, x, opset) if path == "torchscript" else _dynamo(
                    model, x, opset)
        except Exception as exc:  # each exporter raises its own error types
            failures.append(f"{path}: {type(exc).__name__}: {str(exc)[:200]}")
    raise ExportError(
        f"export onnx: torch's ONNX exporter cannot export this model ({'; '.join(failures)}); "
        "try another exporter= or opset="
    )


def _torchscript(model: nn.Module, x: torch.Tensor, opset: int) -> Any:
    import onnx
    from onnx import version_converter

    buffer = io.BytesIO()
    # PRESERVE (the model is in eval mode) skips the eval peephole pass, which folds BatchNorm
    # into the convolution before it and so would replace the low-bit weight by a dense one.
    torch.onnx.export(
        model, (x,), buffer, dynamo=False, opset_version=min(opset, 20),
        training=torch.onnx.TrainingMode.PRESERVE,
        input_names=["input"], output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
    )
    proto = onnx.load_from_string(buffer.getvalue())
    return version_converter.convert_version(proto, opset) if opset > 20 else proto


def _dynamo(model: nn.Module, x: torch.Tensor, opset: int) -> Any:
    program = torch.onnx.export(
        model, (x,), dynamo=True, opset_version=opset, verbose=False,
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
    )
    return program.model_proto


def ort_session(model: str | Path | bytes) -> Any:
    """An onnxruntime CPU session for an exported model, with :data:`ORT_EXACT_CONFIG` and
    without :data:`ORT_DISABLED_OPTIMIZERS`."""
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    for key, value in ORT_EXACT_CONFIG.items():
        options.add_session_config_entry(key, value)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(ORT_DISABLED_OPTIMIZERS))


def _verify(proto: Any, model: nn.Module, x: torch.Tensor) -> None:
    session = ort_session(proto.SerializeToString())
    with torch.no_grad():
        expected = model(x)
    expected = (expected[0] if isinstance(expected, tuple | list) else expected).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    if has_int8_activations(model):
        allowed = QDQ_RTOL * float(np.abs(expected).max()) + QDQ_STEPS * _largest_step(model)
    else:
        allowed = PACKED_RTOL * float(np.abs(expected).max())
    allowed += 1e-5
    err = float(np.abs(got - expected).max()) if got.shape == expected.shape else math.inf
    if not err <= allowed:
        raise ExportError(
            f"export onnx: onnxruntime's output differs from netshrink.load's by {err:.3g} "
            f"(allowed {allowed:.3g}); please report this with the artifact"
        )


def _largest_step(model: nn.Module) -> float:
    """The widest step of any int8 activation grid (input or output) in ``model``."""
    kinds = tuple(INT8_INPUT_TYPES.values())
    return max((float(getattr(m, f"{side}_scale")) for m in model.modules()
                if isinstance(m, kinds) for side in ("act", "out")), default=0.0)


def drop_clamped_relus(proto: Any) -> int:
    """Remove each ``Relu`` whose input comes from a uint8 ``DequantizeLinear`` with zero point
    0 (an int8 layer's output grid calibrated on a ReLU, see ``quantize``): its input is never
    negative, so the ``Relu`` is the identity, and without it onnxruntime keeps the layer's
    result in int8 up to the next layer. Returns how many were removed."""
    from onnx import TensorProto, numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    outputs = {o.name for o in graph.output}

    def non_negative(name: str) -> bool:
        node = producer.get(name)
        if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 3:
            return False
        zp_name = node.input[2]
        while zp_name not in inits and zp_name in producer \
                and producer[zp_name].op_type == "Identity":  # torch's exporter shares constants
            zp_name = producer[zp_name].input[0]
        zp = inits.get(zp_name)
        return (zp is not None and zp.data_type == TensorProto.UINT8
                and not numpy_helper.to_array(zp).any())

    drop = [n for n in graph.node
            if n.op_type == "Relu" and non_negative(n.input[0]) and n.output[0] not in outputs]
    for relu in drop:
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name == relu.output[0]:
                    node.input[i] = relu.input[0]
        graph.node.remove(relu)
    return len(drop)


def int8_weights(model: nn.Module) -> frozenset[str]:
    """Names of the weights of ``model``'s layers with int8 activations."""
    kinds = tuple(INT8_INPUT_TYPES.values())
    return frozenset(f"{n}.weight" for n, m in model.named_modules() if isinstance(m, kinds))


def has_int8_activations(model: nn.Module) -> bool:
    """Whether ``model`` has layers with int8 activations (exported as Q/DQ pairs)."""
    kinds = tuple(INT8_INPUT_TYPES.values())
    return any(isinstance(m, kinds) for m in model.modules())


# -- the rewrite --------------------------------------------------------------------------------


def lower_weights(
    proto: Any, encodings: Mapping[str, Encoding], *, opset: int = DEFAULT_OPSET,
    strict: bool = False, signed: frozenset[str] = frozenset(),
) -> dict[str, str]:
    """Replace each encoded tensor's dense initializer in ``proto`` by its low-bit form.

    Tensors named in ``signed`` (see :func:`int8_weights`) write 8-bit codes as INT8 when
    every zero point is 128: ``code - 128`` with zero point 0, the same values.

    Returns, per encoded tensor, the form it took (e.g. ``"DequantizeLinear(UINT4)"``,
    ``"Gather(UINT8)"``, ``"ScatterElements(mask)+DequantizeLinear(UINT8)"``, ``"dense"``).
    """
    from onnx import numpy_helper

    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    cache: dict[str, np.ndarray] = {}

    def value_of(name: str) -> np.ndarray:
        if name not in cache:
            cache[name] = numpy_helper.to_array(inits[name])
        return cache[name]

    forms: dict[str, str] = {}
    used: set[str] = set()
    new_nodes: list[Any] = []
    for name, enc in encodings.items():
        if isinstance(enc, Dense) and enc.data.dtype == torch.float32:
            continue
        decoded = enc.decode().detach()
        if decoded.dtype != torch.float32:  # integer buffers, bf16 models: left as exported
            forms[name] = "dense"
            continue
        dense = decoded.numpy()
        hit = _find(name, dense, inits, value_of, used)
        try:
            if hit is None:
                raise _NoLowBit(MSG_UNMATCHED)
            target, transposed = hit
            builder = _best_form(enc, target, transposed, opset, dense.nbytes, name in signed)
        except _NoLowBit as reason:
            forms[name] = "dense"
            if str(reason) != MSG_NOT_FLOAT:
                _fallback(name, enc, str(reason), strict)
            continue
        used.add(target)
        forms[name] = builder.form if builder else "dense"
        if builder is None:
            continue
        graph.initializer.remove(inits.pop(target))
        graph.initializer.extend(builder.inits)
        new_nodes.extend(builder.nodes)
        for i, graph_input in enumerate(graph.input):
            if graph_input.name == target:
                del graph.input[i]
                break
    if new_nodes:
        nodes = [*new_nodes, *graph.node]
        del graph.node[:]
        graph.node.extend(nodes)
    return forms


def _fallback(name: str, enc: Encoding, reason: str, strict: bool) -> None:
    what = f"export onnx: tensor {name!r} ({enc.describe()}): {reason}"
    if strict:
        raise ExportError(f"{what}; pass strict=False to export it dense fp32")
    warnings.warn(f"{what}; exported dense fp32 (pass strict=True to refuse)", ExportWarning,
                  stacklevel=4)


def _find(name, dense, inits, value_of, used) -> tuple[str, bool] | None:
    """The initializer equal to ``dense`` (by name first, then by value), and whether it holds
    the transpose (exporters may store a Linear weight transposed for MatMul)."""
    order = ([name] if name in inits else []) + [n for n in inits if n != name]
    for transposed in (False, True):
        want = dense.T if transposed else dense
        if transposed and dense.ndim != 2:
            return None
        for candidate in order:
            if candidate in used or tuple(inits[candidate].dims) != want.shape:
                continue
            if np.array_equal(value_of(candidate), want):
                return candidate, transposed
    return None


class _Builder:
    """Nodes and initializers that compute one tensor (named ``target``)."""

    def __init__(self, target: str, opset: int) -> None:
        self.target, self.opset = target, opset
        self.signed = False  # 8-bit symmetric codes as INT8 (see lower_weights)
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.form = ""

    def const(self, role: str, array: np.ndarray, elem_type: int | None = None) -> str:
        self.inits.append(_tensor(f"{self.target}/{role}", np.asarray(array), elem_type))
        return self.inits[-1].name

    def op(self, op_type: str, inputs: list[str], role: str, final: bool = False,
           **attrs: Any) -> str:
        from onnx import helper

        out = self.target if final else f"{self.target}/{role}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    @property
    def nbytes(self) -> int:
        return sum(len(t.raw_data) for t in self.inits)


def _tensor(name: str, array: np.ndarray, elem_type: int | None) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    if elem_type in (TensorProto.UINT4, TensorProto.INT4):
        flat = array.reshape(-1).astype(np.uint8) & 0xF
        if flat.size % 2:
            flat = np.append(flat, np.uint8(0))
        raw = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
        return helper.make_tensor(name, elem_type, array.shape, raw, raw=True)
    if elem_type is not None:
        array = array.astype(helper.tensor_dtype_to_np_dtype(elem_type))
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def _code_type(bits: int, opset: int) -> int:
    from onnx import TensorProto

    if bits <= 4 and opset >= 21:
        return TensorProto.UINT4
    return TensorProto.UINT8 if bits <= 8 else TensorProto.UINT16


def _type_name(elem_type: int) -> str:
    from onnx import TensorProto

    return TensorProto.DataType.Name(elem_type)


def _best_form(enc: Encoding, target: str, transposed: bool, opset: int,
               dense_bytes: int, signed: bool = False) -> _Builder | None:
    """The smallest low-bit builder for ``enc``, or None when the dense fp32 tensor is smaller."""
    candidates, reasons = [], []
    for make in _FORMS.get(type(enc), ()):
        builder = _Builder(target, opset)
        builder.signed = signed
        try:
            make(builder, enc, transposed)
        except _NoLowBit as reason:
            reasons.append(str(reason))
            continue
        candidates.append(builder)
    if not candidates:  # the most specific reason: a form that applied but could not be built
        specific = [reason for reason in reasons if reason != MSG_UNKNOWN_KIND]
        raise _NoLowBit(specific[0] if specific else MSG_UNKNOWN_KIND)
    best = min(candidates, key=lambda b: b.nbytes)
    return best if best.nbytes < dense_bytes else None


# -- forms, one function per (encoding, layout) ------------------------------------------------


def _cast(b: _Builder, enc: Dense, transposed: bool) -> None:
    """A dense tensor stored in fp16 or bf16 stays so, cast to fp32 in the graph."""
    from onnx import TensorProto, helper

    data = enc.data.reshape(enc.shape)
    data = data.T.contiguous() if transposed else data
    if enc.data.dtype == torch.float16:
        stored = b.const("fp16", data.numpy())
    elif enc.data.dtype == torch.bfloat16:  # numpy has no bfloat16: the raw 16-bit words
        b.inits.append(helper.make_tensor(f"{b.target}/bf16", TensorProto.BFLOAT16, data.shape,
                                          data.view(torch.int16).numpy().tobytes(), raw=True))
        stored = b.inits[-1].name
    else:
        raise _NoLowBit(MSG_NOT_FLOAT)
    b.op("Cast", [stored], "cast", final=True, to=TensorProto.FLOAT)
    b.form = f"Cast({_type_name(b.inits[-1].data_type)})"


def _dequantize(b: _Builder, enc: Quantized, transposed: bool) -> None:
    from onnx import TensorProto

    if _group_size(enc):
        _dequantize_blocked(b, enc, transposed)
        return
    codes = enc.codes.numpy().reshape(enc.shape)
    codes = codes.T if transposed else codes
    dtype = _code_type(enc.bits, b.opset)
    if enc.per_channel:
        scale, zp, attrs = enc.scale.numpy(), enc.zero_point.numpy(), {"axis": int(transposed)}
    else:
        scale, zp, attrs = enc.scale.numpy()[0], enc.zero_point.numpy()[0], {}
    if b.signed and dtype == TensorProto.UINT8 and bool((np.asarray(zp) == 128).all()):
        # The same values, as onnxruntime's fast u8s8 int8 kernels want them.
        codes, zp, dtype = codes.astype(np.int16) - 128, np.zeros_like(zp), TensorProto.INT8
    inputs = [b.const("codes", codes, dtype), b.const("scale", np.asarray(scale, np.float32)),
              b.const("zero_point", np.asarray(zp), dtype)]
    b.op("DequantizeLinear", inputs, "dq", final=True, **attrs)
    b.form = f"DequantizeLinear({_type_name(dtype)})"


def _group_size(enc: Quantized) -> int | None:
    return getattr(enc, "group_size", None)


def _dequantize_blocked(b: _Builder, enc: Quantized, transposed: bool) -> None:
    """Scales per row and group of columns (the tensor seen as ``(out, K)``): ONNX's blocked
    ``DequantizeLinear`` (opset 21) along the column axis, then a reshape to the tensor's shape."""
    if b.opset < 21:
        raise _NoLowBit(MSG_BLOCKED_OPSET)
    group = int(_group_size(enc))
    rows = enc.shape[0]
    codes = enc.codes.numpy().reshape(rows, -1)
    scale = enc.scale.numpy().reshape(rows, -1)
    zp = enc.zero_point.numpy().reshape(rows, -1)
    if transposed:
        codes, scale, zp = codes.T, scale.T, zp.T
    dtype = _code_type(enc.bits, b.opset)
    inputs = [b.const("codes", codes, dtype), b.const("scale", np.ascontiguousarray(scale)),
              b.const("zero_point", zp, dtype)]
    attrs = {"axis": 0 if transposed else 1, "block_size": group}
    if len(enc.shape) == 2:
        b.op("DequantizeLinear", inputs, "dq", final=True, **attrs)
    else:
        flat = b.op("DequantizeLinear", inputs, "dq", **attrs)
        b.op("Reshape", [flat, b.const("shape", np.array(enc.shape, np.int64))], "reshape",
             final=True)
    b.form = f"DequantizeLinear({_type_name(dtype)}, block_size={group})"


def _gather(b: _Builder, enc: Codebook, transposed: bool) -> None:
    from onnx import TensorProto

    if enc.perturbed:
        raise _NoLowBit(MSG_PERTURBED)
    index = enc.indices.numpy().reshape(enc.shape)
    index = index.T if transposed else index
    dtype = _code_type(enc.bits, b.opset)
    stored = b.const("indices", index, dtype)
    as_int = b.op("Cast", [stored], "indices_i64", to=TensorProto.INT64)
    b.op("Gather", [b.const("centroids", enc.centroids.numpy()), as_int], "gather", final=True,
         axis=0)
    b.form = f"Gather({_type_name(dtype)})"


def _full_codes(b: _Builder, enc: Sparse, transposed: bool) -> None:
    """A sparse tensor with quantized values as one code tensor: pruned entries hold their
    channel's (group's) zero point, so they dequantize to exactly 0."""
    values = enc.values
    if not isinstance(values, Quantized):
        raise _NoLowBit(MSG_UNKNOWN_KIND)
    everywhere = torch.arange(enc.numel)
    index = _scale_index_of(values, everywhere)
    codes = values.zero_point.numpy()[index.numpy()]
    codes[enc.positions.numpy()] = values.codes.numpy()
    extra = {"group_size": _group_size(values)} if _group_size(values) else {}
    full = Quantized(torch.from_numpy(codes).reshape(enc.shape), values.bits, values.scale,
                     values.zero_point, **extra)
    _dequantize(b, full, transposed)
    b.form = f"dense-codes+{b.form}"


def _scale_index_of(values: Quantized, positions: torch.Tensor) -> torch.Tensor:
    """Which scale each flat position of the full tensor uses (as the encoding decodes)."""
    if values.scale.numel() == 1:
        return torch.zeros(positions.numel(), dtype=torch.int64)
    k = int(np.prod(values.full_shape[1:]))
    row = torch.div(positions, k, rounding_mode="floor")
    group = _group_size(values)
    if not group:
        return row
    return row * -(-k // group) + torch.div(positions - row * k, group, rounding_mode="floor")


def _full_indices(b: _Builder, enc: Sparse, transposed: bool) -> None:
    """A sparse tensor with codebook values as one index tensor into the table plus a 0."""
    values = enc.values
    if not isinstance(values, Codebook) or values.perturbed:
        raise _NoLowBit(MSG_UNKNOWN_KIND)
    k = values.centroids.numel()
    index = np.full(enc.numel, k, dtype=np.int64)
    index[enc.positions.numpy()] = values.indices.numpy()
    table = torch.cat([values.centroids, torch.zeros(1)])
    _gather(b, Codebook(torch.from_numpy(index).reshape(enc.shape), table), transposed)
    b.form = f"dense-indices+{b.form}"


def _scatter(b: _Builder, enc: Sparse, transposed: bool) -> None:
    """The kept values scattered into zeros at stored positions."""
    from onnx import TensorProto, helper

    positions, index_form = _positions(b, enc)
    values, value_form = _values(b, enc, positions)
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    zeros = b.op("ConstantOfShape", [b.const("numel", np.array([enc.numel], np.int64))],
                 "zeros", value=zero)
    flat = b.op("ScatterElements", [zeros, positions, values], "scatter", axis=0)
    shape = b.const("shape", np.array(enc.shape, np.int64))
    if transposed:
        full = b.op("Reshape", [flat, shape], "reshape")
        b.op("Transpose", [full], "transpose", final=True, perm=[1, 0])
    else:
        b.op("Reshape", [flat, shape], "reshape", final=True)
    b.form = f"ScatterElements({index_form})+{value_form}"


def _positions(b: _Builder, enc: Sparse) -> tuple[str, str]:
    """int64 flat positions, from whichever stored index is smallest: a bit mask (opset 18+ for
    BitwiseAnd), 8- or 16-bit gaps summed with CumSum, or int32 positions."""
    from onnx import TensorProto

    positions = enc.positions.numpy()
    gaps = np.diff(positions, prepend=-1)
    biggest = int(gaps.max()) if gaps.size else 0
    options = {"int32": 4 * positions.size}
    if biggest < 1 << 16:
        options["gap16"] = 2 * positions.size
    if biggest < 1 << 8:
        options["gap8"] = positions.size
    if b.opset >= 18:
        options["mask"] = (enc.numel + 7) // 8
    choice = min(options, key=options.__getitem__)
    if choice == "mask":
        mask = np.packbits(enc.mask().reshape(-1).numpy())
        column = b.op("Unsqueeze", [b.const("mask", mask),
                                    b.const("axis1", np.array([1], np.int64))], "mask_column")
        shifts = b.const("shifts", np.arange(7, -1, -1, dtype=np.uint8))  # MSB first
        shifted = b.op("BitShift", [column, shifts], "mask_shifted", direction="RIGHT")
        bits = b.op("BitwiseAnd", [shifted, b.const("one_u8", np.array([1], np.uint8))], "bits")
        flat = b.op("Reshape", [bits, b.const("minus1", np.array([-1], np.int64))], "bits_flat")
        cut = b.op("Slice", [flat, b.const("start", np.array([0], np.int64)),
                             b.const("stop", np.array([enc.numel], np.int64))], "bits_cut")
        keep = b.op("Cast", [cut], "keep", to=TensorProto.BOOL)
        found = b.op("NonZero", [keep], "nonzero")
        return b.op("Reshape", [found, b.const("minus1b", np.array([-1], np.int64))],
                    "positions"), "mask"
    if choice == "int32":
        stored = b.const("positions_i32", positions.astype(np.int32))
        return b.op("Cast", [stored], "positions", to=TensorProto.INT64), "int32"
    stored = b.const("gaps", gaps.astype(np.uint8 if choice == "gap8" else np.uint16))
    wide = b.op("Cast", [stored], "gaps_i64", to=TensorProto.INT64)
    summed = b.op("CumSum", [wide, b.const("axis0", np.array(0, np.int64))], "cumsum")
    return b.op("Sub", [summed, b.const("one_i64", np.array(1, np.int64))], "positions"), choice


def _values(b: _Builder, enc: Sparse, positions: str) -> tuple[str, str]:
    """The kept values as a flat fp32 tensor."""
    from onnx import TensorProto

    values = enc.values
    if isinstance(values, Dense) and values.data.dtype in (torch.float32, torch.float16):
        stored = b.const("values", values.data.reshape(-1).numpy())
        if values.data.dtype == torch.float32:
            return stored, "FLOAT"
        return b.op("Cast", [stored], "values_f32", to=TensorProto.FLOAT), "FLOAT16"
    if isinstance(values, Codebook) and not values.perturbed:
        dtype = _code_type(values.bits, b.opset)
        index = b.op("Cast", [b.const("indices", values.indices.numpy(), dtype)],
                     "indices_i64", to=TensorProto.INT64)
        table = b.const("centroids", values.centroids.numpy())
        return b.op("Gather", [table, index], "values", axis=0), f"Gather({_type_name(dtype)})"
    if not isinstance(values, Quantized):
        raise _NoLowBit(MSG_PERTURBED if isinstance(values, Codebook) else MSG_UNKNOWN_KIND)
    dtype = _code_type(values.bits, b.opset)
    codes = b.const("codes", values.codes.numpy(), dtype)
    form = f"DequantizeLinear({_type_name(dtype)})"
    if not values.per_channel:
        scale = b.const("scale", np.asarray(values.scale.numpy()[0], np.float32))
        zp = b.const("zero_point", np.asarray(values.zero_point.numpy()[0]), dtype)
        return b.op("DequantizeLinear", [codes, scale, zp], "values"), form
    # Per channel (group): each value's scale index comes from its position, as in
    # _scale_index_of: row = position // K, index = row (* groups + column // group_size).
    one = b.const("unit_scale", np.asarray(1.0, np.float32))
    zero = b.const("zero_code", np.asarray(0), dtype)
    as_float = b.op("DequantizeLinear", [codes, one, zero], "codes_f32")
    k = int(np.prod(values.full_shape[1:]))
    width = b.const("k", np.array(k, np.int64))
    row = b.op("Div", [positions, width], "row")
    index = row
    group = _group_size(values)
    if group:
        column = b.op("Sub", [positions, b.op("Mul", [row, width], "row_start")], "column")
        in_row = b.op("Div", [column, b.const("group", np.array(group, np.int64))], "group_in_row")
        first = b.op("Mul", [row, b.const("groups", np.array(-(-k // group), np.int64))], "first")
        index = b.op("Add", [first, in_row], "scale_index")
    zps = b.op("Cast", [b.const("zero_points", values.zero_point.numpy().astype(np.uint8))],
               "zero_points_f32", to=TensorProto.FLOAT)
    zp = b.op("Gather", [zps, index], "zp_of_value", axis=0)
    scale = b.op("Gather", [b.const("scales", values.scale.numpy()), index], "scale_of_value",
                 axis=0)
    centred = b.op("Sub", [as_float, zp], "centred")
    return b.op("Mul", [centred, scale], "values"), form + ("/g" if group else "/ch")


_FORMS = {
    Dense: (_cast,),
    Quantized: (_dequantize,),
    Codebook: (_gather,),
    Sparse: (_scatter, _full_codes, _full_indices),
}

__all__ = [
    "DEFAULT_OPSET",
    "EXPORTERS",
    "EXTRA",
    "FORMATS",
    "MIN_OPSET",
    "MSG_BLOCKED_OPSET",
    "MSG_PERTURBED",
    "MSG_UNKNOWN_KIND",
    "MSG_UNMATCHED",
    "ORT_DISABLED_OPTIMIZERS",
    "ORT_EXACT_CONFIG",
    "QDQ_RTOL",
    "QDQ_STEPS",
    "ExportWarning",
    "drop_clamped_relus",
    "export",
    "export_onnx",
    "export_pt2",
    "has_int8_activations",
    "int8_weights",
    "lower_weights",
    "ort_session",
    "read_encodings",
]
