"""The conformance suite: the contract every compressor, built-in or third-party, must meet.

Checks (one :class:`ConformanceCase` each, per declared layer type where it applies):

``class``
    The class is a well-formed plugin: kebab-case name, a one-line docstring, declared layer
    types, every config field described, the suite's config valid.
``config-json``
    ``Config.model_validate_json(cfg.model_dump_json()) == cfg`` (defaults and the suite's
    config), and the JSON schema serialises.
``config-invalid``
    Values built from the JSON schema (past a bound, outside an enum, wrong type, unknown key)
    raise ``pydantic.ValidationError`` naming the field, and the pipeline refuses them before
    any work with an error naming the step and ``config.<field>``.
``compress[T]``
    ``netshrink.compress`` runs on a tiny model of layer type ``T`` (see
    :mod:`netshrink.testing.models`), the output is finite and the step did something.
``save-load[T]``
    ``result.save`` → ``netshrink.load`` gives a model with the same outputs.
``size[T]``
    The artifact file is ``report.storage_bytes`` long (within ``SIZE_TOLERANCE_BYTES``).
``layer-bytes[T]``
    Every report row's ``storage_bytes`` equals the bytes the saved artifact's manifest
    references for that row's tensors (recomputed from the file, not from the encodings the
    report summed), and no new or encoded tensor sits outside every recorded layer.
``encodes-values[T]``
    A compressor whose capabilities declare ``encodes_values`` stores a value encoding
    (quantized, codebook, possibly inside sparse) in every layer it changed; one that does not
    declare it stores none.
``deterministic[T]``
    A second run with the same seed gives identical artifact bytes and outputs.
``refuses-undeclared``
    A selector that picks a layer type the compressor does not declare raises
    :class:`netshrink.SelectionError` before any work.

Each compress run is shared by the checks of its layer type (cached per process), so a
compressor costs two compressions per declared type.

The suite runs a compressor with its defaults unless given ``config=``: fast settings are a
test concern, passed where the suite is called (the built-ins' live in
:mod:`netshrink.testing.fast_configs`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from netshrink.compressor import Compressor
from netshrink.errors import RecipeError, SelectionError
from netshrink.selector import LAYER_TYPES
from netshrink.testing.accounting import (
    byte_mismatches,
    decode_record,
    owner,
    read_artifact,
    stored_tensors,
    unattributed,
)
from netshrink.testing.configs import (
    check_invalid,
    check_roundtrip,
    invalid_values,
    undocumented_fields,
)
from netshrink.testing.fast_configs import builtin_fast_config
from netshrink.testing.models import ensure_registered, model_for_type, tiny_model

#: The artifact file may differ from ``report.storage_bytes`` by at most this many bytes. The
#: artifact is built from the same bytes the report counts, so today the difference is 0.
SIZE_TOLERANCE_BYTES = 64
#: Outputs of the loaded model must match the compressed model's within this tolerance.
OUTPUT_ATOL = 1e-5
DEFAULT_DATA = "digits"
SEED = 0

PER_TYPE_CHECKS = ("compress", "save-load", "packed-runtime", "size", "layer-bytes",
                   "encodes-values", "deterministic", "layer-options")
CLASS_CHECKS = ("class", "config-json", "config-invalid")
ALL_CHECKS = (*CLASS_CHECKS, *PER_TYPE_CHECKS, "refuses-undeclared")


class ConformanceError(AssertionError):
    """A compressor broke the conformance contract (the message says which check and why)."""


@dataclass
class ConformanceCase:
    """One check of one compressor; ``run()`` raises :class:`ConformanceError` on failure.

    Use with pytest: ``@pytest.mark.parametrize("case", conformance_cases(MyComp), ids=str)``.
    """

    compressor: type[Compressor]
    check: str
    layer_type: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    model_spec: str | None = None
    data: str = DEFAULT_DATA

    @property
    def id(self) -> str:
        """E.g. ``magnitude-save-load[Conv2d]``."""
        suffix = f"[{self.layer_type}]" if self.layer_type else ""
        return f"{self.compressor.name}-{self.check}{suffix}"

    def __str__(self) -> str:
        return self.id

    def run(self) -> None:
        """Run the check."""
        _CHECKS[self.check](self)


def effective_config(cls: type[Compressor], config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config the suite uses: ``config`` (the class's defaults for the keys it omits); for
    a built-in compressor, on top of its entry in
    :data:`~netshrink.testing.fast_configs.BUILTIN_FAST_CONFIGS`."""
    return {**builtin_fast_config(cls), **(config or {})}


def _model_types(spec: str, data: str) -> list[str]:
    """Declared-able layer types present in the model built from ``spec``."""
    model = _base_model(spec, data)
    present = {name for name, cls in LAYER_TYPES.items()
               if any(isinstance(m, cls) for n, m in model.named_modules() if n)}
    return [t for t in LAYER_TYPES if t in present]


def conformance_cases(cls: type[Compressor], *, config: dict[str, Any] | None = None,
                      model_spec: str | None = None, data: str = DEFAULT_DATA,
                      checks: tuple[str, ...] | None = None) -> list[ConformanceCase]:
    """Every conformance case for ``cls``, to parametrize a pytest test with.

    ``config`` is the compressor config the suite runs with (keep runs short: a few epochs or
    candidates; a built-in compressor's fast settings apply by default, key by key under
    ``config``). ``model_spec`` replaces the tiny models by one model of yours (e.g.
    ``"zoo:lenet300"``, trained on ``data`` and cached): then the per-type checks cover the
    declared types that model has. ``checks`` restricts the checks run (names in
    :data:`ALL_CHECKS`).
    """
    wanted = checks or ALL_CHECKS
    unknown = [c for c in wanted if c not in ALL_CHECKS]
    if unknown:
        raise ValueError(f"unknown conformance check(s) {unknown}; known: {list(ALL_CHECKS)}")
    cfg = effective_config(cls, config)
    common = {"config": cfg, "model_spec": model_spec, "data": data}
    cases = [ConformanceCase(cls, check, **common) for check in CLASS_CHECKS if check in wanted]
    declared = list(cls.capabilities.handles)
    if model_spec is not None:
        types = [t for t in declared if t in _model_types(model_spec, data)]
    else:
        types = [t for t in declared if model_for_type(t) is not None]
    for layer_type in types:
        cases += [ConformanceCase(cls, check, layer_type, **common)
                  for check in PER_TYPE_CHECKS if check in wanted]
    if "refuses-undeclared" in wanted and _undeclared_type(cls, model_spec, data) is not None:
        cases.append(ConformanceCase(cls, "refuses-undeclared", **common))
    return cases


def check_compressor(cls: type[Compressor], *, config: dict[str, Any] | None = None,
                     model_spec: str | None = None, data: str = DEFAULT_DATA,
                     checks: tuple[str, ...] | None = None) -> list[str]:
    """Run every conformance case for ``cls``; return the ids that passed, or raise one
    :class:`ConformanceError` listing every failure."""
    passed, failures = [], []
    for case in conformance_cases(cls, config=config, model_spec=model_spec, data=data,
                                  checks=checks):
        try:
            case.run()
        except Exception as exc:  # collect them all: one report beats fix-one-rerun loops
            failures.append(f"{case.id}: {type(exc).__name__}: {exc}")
        else:
            passed.append(case.id)
    if failures:
        raise ConformanceError(f"{cls.name}: {len(failures)} conformance check(s) failed:\n  "
                               + "\n  ".join(failures))
    return passed


# -- running compressions (shared by the per-type checks) ------------------------------------


@dataclass
class Run:
    """One compression of a tiny model, as the per-type checks see it."""

    original: nn.Module
    result: Any
    inputs: torch.Tensor
    path: Path

    @property
    def artifact(self) -> bytes:
        """The artifact bytes the pipeline built (``result.save`` wrote them to ``path``)."""
        return self.result.artifact


_RUNS: dict[str, Run] = {}
_TMP: list[tempfile.TemporaryDirectory[str]] = []


def _tmp_dir() -> Path:
    """A directory for the artifacts of this process's runs (removed at exit)."""
    if not _TMP:
        _TMP.append(tempfile.TemporaryDirectory(prefix="netshrink-conformance-"))
    return Path(_TMP[0].name)


@contextlib.contextmanager
def registered(cls: type[Compressor]) -> Iterator[None]:
    """Make ``cls`` reachable by name for :func:`netshrink.compress`: a class that is not
    registered yet (a plugin under development) is registered by a throwaway plugin."""
    from netshrink.registry import compressors, register_plugin, unregister_plugin
    from netshrink.registry.hookspecs import hookimpl

    entry = compressors().get(cls.name)
    if entry is not None:
        if entry.obj is not cls:
            raise ConformanceError(
                f"another class ({entry.obj.__module__}.{entry.obj.__qualname__}, plugin "
                f"{entry.plugin!r}) is registered as {cls.name!r}; test the registered one, or "
                f"block that plugin with NETSHRINK_DISABLE_PLUGINS={entry.plugin}")
        yield
        return

    class _Plugin:
        @hookimpl
        def register_compressors(self, register: Callable[[type], None]) -> None:
            register(cls)

    plugin = _Plugin()
    register_plugin(plugin, name=f"conformance-{cls.name}")
    try:
        yield
    finally:
        unregister_plugin(plugin)


def _base_model(spec: str, data: str) -> nn.Module:
    """A trained model: a tiny ``conformance:`` model, or ``reference_model(spec, data)``."""
    if spec.startswith("conformance:"):
        return tiny_model(spec)
    from netshrink.models import reference_model

    return reference_model(spec, data)


def _spec_for(case: ConformanceCase, layer_type: str) -> str:
    if case.model_spec is not None:
        return case.model_spec
    spec = model_for_type(layer_type)
    if spec is None:
        raise ConformanceError(f"no tiny model for layer type {layer_type!r}")
    return spec


def _compress(case: ConformanceCase, layer_type: str, model: nn.Module) -> Any:
    import netshrink as ns

    with registered(case.compressor):  # step() checks the name and config against the registry
        step = ns.step(case.compressor.name, select={"types": [layer_type]}, **case.config)
        return ns.compress(model, [step], data=case.data, seed=SEED, latency=False)


def _run(case: ConformanceCase, index: int = 0) -> Run:
    """The ``index``-th compression for the case's compressor, config and layer type (cached)."""
    assert case.layer_type is not None
    key = json.dumps([case.compressor.__module__, case.compressor.__qualname__, case.config,
                      case.model_spec, case.layer_type, case.data, index], sort_keys=True,
                     default=str)
    if key in _RUNS:
        return _RUNS[key]
    from netshrink.datasets import load as load_data

    ensure_registered()
    spec = _spec_for(case, case.layer_type)
    original = _base_model(spec, case.data)
    inputs = load_data(case.data).test.tensors[0][:64]
    result = _compress(case, case.layer_type, copy.deepcopy(original))
    path = _tmp_dir() / f"{len(_RUNS)}-{case.compressor.name}.nsk"
    result.save(path, report=False)
    run = Run(original, result, inputs, path)
    _RUNS[key] = run
    return run


@torch.no_grad()
def _outputs(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(inputs)


# -- the checks ------------------------------------------------------------------------------


def _check_class(case: ConformanceCase) -> None:
    cls = case.compressor
    cls.validate_class()
    problems = []
    if not cls.summary():
        problems.append("the class has no docstring (its first line is the one-line summary "
                        "`netshrink methods` shows)")
    missing = undocumented_fields(cls.Config)
    if missing:
        problems.append(f"config fields without a description: {missing} "
                        "(use Field(..., description=...))")
    if "conformance_config" in dir(cls):
        problems.append("the class sets conformance_config, which netshrink no longer reads: "
                        "delete it and pass the fast settings to the suite "
                        "(conformance_cases(cls, config={...}), see docs/plugins/testing.md)")
    try:
        cls.Config.model_validate(case.config)
    except ValidationError as exc:
        problems.append(f"the conformance config {case.config} is invalid: {exc}")
    if problems:
        raise ConformanceError("; ".join(problems))


def _check_config_json(case: ConformanceCase) -> None:
    check_roundtrip(case.compressor.Config)
    check_roundtrip(case.compressor.Config, case.config)


def _check_config_invalid(case: ConformanceCase) -> None:
    import netshrink as ns

    cls = case.compressor
    failures = check_invalid(cls.Config, case.config)
    if failures:
        raise ConformanceError("invalid config values were not refused properly:\n    "
                               + "\n    ".join(failures))
    # Through the pipeline too: refused before any work, the error naming step and field.
    bad = next(v for v in invalid_values(cls.Config))  # the unknown key always exists
    bounded = [v for v in invalid_values(cls.Config) if v.field != bad.field]
    if bounded:
        bad = bounded[0]
    layer_type = next((t for t in cls.capabilities.handles if model_for_type(t)), None)
    if layer_type is None:
        return
    ensure_registered()
    model = tiny_model(_spec_for(case, layer_type), trained=False)
    try:
        with registered(cls):
            # ns.Step, not ns.step: step() would refuse it on its own line, before the pipeline.
            step = ns.Step(compressor=cls.name, config={**case.config, bad.field: bad.value})
            ns.compress(model, [step], data=case.data, seed=SEED, latency=False)
    except RecipeError as exc:
        if f"config.{bad.field}" not in str(exc) or "step 0" not in str(exc):
            raise ConformanceError(f"the pipeline refused {bad.field}={bad.value!r} but its "
                                   f"error does not name 'step 0' and 'config.{bad.field}': "
                                   f"{exc}") from None
    else:
        raise ConformanceError(f"the pipeline accepted {bad.field}={bad.value!r} ({bad.reason})")


def _check_compress(case: ConformanceCase) -> None:
    run = _run(case)
    out = _outputs(run.result.model, run.inputs)
    if out.shape != _outputs(run.original, run.inputs).shape:
        raise ConformanceError(f"output shape changed: {tuple(out.shape)}")
    if not torch.isfinite(out).all():
        raise ConformanceError("the compressed model produces NaN or inf")
    selected = {rec.name for rec in run.result.records}
    from netshrink.selector import LayerSelector

    allowed = {n for n, _ in LayerSelector(types=[case.layer_type]).filter(
        run.original, head=run.result.info.head)}
    stray = sorted(selected - allowed)
    if stray:
        raise ConformanceError(f"records name layers that were not selected: {stray} "
                               f"(selected: {sorted(allowed)})")
    before = run.original.state_dict()
    after = run.result.model.state_dict()
    changed = (set(before) != set(after)
               or any(before[k].shape != after[k].shape or not torch.equal(before[k], after[k])
                      for k in before))
    if not changed and not len(run.result.encodings):
        raise ConformanceError(
            "the step left every tensor unchanged and recorded no encoding: it did nothing "
            f"with config {case.config} (pass the suite a config that compresses: "
            "conformance_cases(cls, config={...}))")


def _check_save_load(case: ConformanceCase) -> None:
    import netshrink as ns

    run = _run(case)
    ensure_registered()
    loaded = ns.load(run.path)
    expected = _outputs(run.result.model, run.inputs)
    got = _outputs(loaded, run.inputs)
    if got.shape != expected.shape:
        raise ConformanceError(f"the loaded model's outputs have shape {tuple(got.shape)}, "
                               f"expected {tuple(expected.shape)}")
    diff = float((got - expected).abs().max())
    if not math.isfinite(diff) or diff > OUTPUT_ATOL:
        raise ConformanceError(f"the loaded model's outputs differ by up to {diff:.3g} "
                               f"(allowed {OUTPUT_ATOL}): the in-memory model is not what the "
                               "artifact stores (record every change with ctx.encode)")


def _check_packed_runtime(case: ConformanceCase) -> None:
    import netshrink as ns
    from netshrink.runtime import PACKED_RTOL, resident_bytes

    run = _run(case)
    ensure_registered()
    dense = ns.load(run.path)
    packed = ns.load(run.path, runtime="packed")
    expected = _outputs(dense, run.inputs)
    got = _outputs(packed, run.inputs)
    if got.shape != expected.shape:
        raise ConformanceError(f"the packed model's outputs have shape {tuple(got.shape)}, "
                               f"expected {tuple(expected.shape)}")
    allowed = PACKED_RTOL * float(expected.abs().max()) + OUTPUT_ATOL
    diff = float((got - expected).abs().max())
    if not math.isfinite(diff) or diff > allowed:
        raise ConformanceError(f"load(runtime='packed') outputs differ from the dense decode by "
                               f"up to {diff:.3g} (allowed {allowed:.3g}): an encoding kind "
                               "decodes differently from its stored arrays")
    if resident_bytes(packed) > resident_bytes(dense):
        raise ConformanceError(f"the packed model holds {resident_bytes(packed)} bytes, more "
                               f"than the dense decode's {resident_bytes(dense)}")


#: Layers the ``layer-options`` check asks a compressor about, by type.
_OPTION_LAYERS: dict[str, Callable[[], nn.Module]] = {
    "Linear": lambda: nn.Linear(48, 32),
    "Conv2d": lambda: nn.Conv2d(8, 16, 3),
}


def _check_layer_options(case: ConformanceCase) -> None:
    """A compressor that offers per-layer options to the search declares the exact bytes it
    stores for each (a search that trusted a wrong figure would miss its budget)."""
    from netshrink.compressor import Compressor
    from netshrink.layer_search import check_layer_options

    cls = case.compressor
    declared = getattr(cls.layer_options, "__func__", None)
    if declared is Compressor.layer_options.__func__ or case.layer_type not in _OPTION_LAYERS:
        return  # offers no options (or no stock layer of this type to ask about)
    torch.manual_seed(SEED)
    with registered(cls):
        problems = check_layer_options(cls, _OPTION_LAYERS[case.layer_type]())
    if problems:
        raise ConformanceError("declared option bytes are wrong:\n    " + "\n    ".join(problems))


def _check_size(case: ConformanceCase) -> None:
    run = _run(case)
    on_disk = run.path.stat().st_size
    reported = run.result.report.storage_bytes
    if abs(on_disk - reported) > SIZE_TOLERANCE_BYTES:
        raise ConformanceError(f"report.storage_bytes is {reported} but the artifact file has "
                               f"{on_disk} bytes (allowed difference {SIZE_TOLERANCE_BYTES})")


def _layers(run: Run) -> list[str]:
    """The layers the step returned records for (each should have its own report row)."""
    return list(dict.fromkeys(rec.name for rec in run.result.records))


def _check_layer_bytes(case: ConformanceCase) -> None:
    run = _run(case)
    manifest, blob = read_artifact(run.path)
    tensors = stored_tensors(manifest, len(blob))
    layers = _layers(run)
    reported = {row.name: row.storage_bytes for row in run.result.report.rows}
    problems = byte_mismatches(reported, layers, tensors, run.path.stat().st_size)
    if problems:
        raise ConformanceError(
            "the report's per-layer bytes are not what the artifact stores for those layers:\n"
            "    " + "\n    ".join(problems) + "\n  The total can still be right: bytes a layer "
            "under-reports end up in '(header + manifest)'. An Encoding's payload_bytes must "
            "count every array its to_record writes (keep the inherited payload_bytes).")
    stray = unattributed(layers, tensors, run.original.state_dict())
    if stray:
        raise ConformanceError(
            f"tensors written by the step are outside every recorded layer {layers}: "
            f"{stray[:6]}; their bytes are reported under '(other tensors)'. Return a "
            "LayerRecord for the layer that owns each tensor you encode or add, and keep a "
            "layer's new tensors under its module name.")


def _changed_layers(run: Run, layers: list[str]) -> list[str]:
    """Recorded layers with a tensor the step added, removed, reshaped or rewrote."""
    before, after = run.original.state_dict(), run.result.model.state_dict()
    changed = set()
    for name in set(before) | set(after):
        if (name not in before or name not in after or before[name].shape != after[name].shape
                or not torch.equal(before[name], after[name])):
            changed.add(owner(name, layers))
    return [layer for layer in layers if layer in changed]


def _check_encodes_values(case: ConformanceCase) -> None:
    run = _run(case)
    cls = case.compressor
    declared = cls.capabilities_for(cls.Config.model_validate(case.config)).encodes_values
    manifest, blob = read_artifact(run.path)
    layers = _layers(run)
    encoded: dict[str, list[str]] = {}  # layer -> its value-encoded tensors
    for name, record in manifest["t"].items():
        if decode_record(record, blob).is_value_encoded:
            encoded.setdefault(owner(name, layers) or "(no recorded layer)", []).append(name)
    if declared:
        changed = _changed_layers(run, layers)
        missing = [layer for layer in changed if layer not in encoded]
        if missing or not encoded:
            what = (f"layers {missing}, which the step changed, without a value encoding"
                    if missing else "no value-encoded tensor")
            raise ConformanceError(
                f"capabilities declare encodes_values=True but the artifact stores {what} "
                "(Quantized or Codebook, possibly as the values of Sparse): rounded values "
                "stored as plain floats cost full size and later steps may rewrite them. Record "
                "them with ctx.encode(model, name, Quantized.quantize(...)) or "
                "netshrink.encode_values.")
    elif encoded:
        tensors = sorted(n for names in encoded.values() for n in names)
        raise ConformanceError(
            f"the artifact stores value-encoded tensors {tensors[:6]} (quantized or codebook) "
            "but capabilities declare encodes_values=False: the pipeline cannot refuse a later "
            "step that would rewrite those values. Set Capabilities(encodes_values=True) (or "
            "return it from capabilities_for for the configs that quantize).")


def _artifact_content(data: bytes) -> tuple[Any, bytes]:
    """The manifest (parsed) and the blob of artifact bytes: what the file stores, independent
    of the order safetensors writes its header keys in."""
    import zlib

    from safetensors.torch import load as st_load

    tensors = st_load(data)
    raw = tensors["manifest"].numpy().tobytes()
    with contextlib.suppress(zlib.error):
        raw = zlib.decompress(raw)
    return json.loads(raw), tensors["blob"].numpy().tobytes()


def _check_deterministic(case: ConformanceCase) -> None:
    first, second = _run(case, 0), _run(case, 1)
    if _artifact_content(first.artifact) == _artifact_content(second.artifact):
        return
    a, b = first.result.model.state_dict(), second.result.model.state_dict()
    differing = sorted(k for k in set(a) | set(b)
                       if k not in a or k not in b or a[k].shape != b[k].shape
                       or not torch.equal(a[k], b[k]))
    raise ConformanceError(
        "two runs with seed 0 gave different artifacts"
        + (f"; tensors that differ: {differing[:6]}" if differing else
           " (same tensors: the encodings or records differ)")
        + ". Draw randomness from ctx.generator() or torch's global RNG (seeded per step).")


def _undeclared_type(cls: type[Compressor], model_spec: str | None, data: str) -> str | None:
    declared = set(cls.capabilities.handles)
    if model_spec is not None:
        candidates = _model_types(model_spec, data)
    else:
        candidates = [t for t in LAYER_TYPES if model_for_type(t) is not None]
    return next((t for t in candidates if t not in declared), None)


def _check_refuses_undeclared(case: ConformanceCase) -> None:
    import netshrink as ns

    cls = case.compressor
    layer_type = _undeclared_type(cls, case.model_spec, case.data)
    assert layer_type is not None
    ensure_registered()
    spec = case.model_spec or model_for_type(layer_type)
    assert spec is not None
    model = (tiny_model(spec, trained=False) if spec.startswith("conformance:")
             else _base_model(spec, case.data))
    try:
        with registered(cls):
            ns.compress(model, [ns.step(cls.name, select={"types": [layer_type]}, **case.config)],
                        data=case.data, seed=SEED, latency=False)
    except SelectionError as exc:
        if layer_type not in str(exc):
            raise ConformanceError(f"refused {layer_type} layers but the error does not say "
                                   f"which type: {exc}") from None
    else:
        raise ConformanceError(
            f"compressed {layer_type} layers although capabilities.handles is "
            f"{list(cls.capabilities.handles)}")


_CHECKS: dict[str, Callable[[ConformanceCase], None]] = {
    "class": _check_class,
    "config-json": _check_config_json,
    "config-invalid": _check_config_invalid,
    "compress": _check_compress,
    "save-load": _check_save_load,
    "packed-runtime": _check_packed_runtime,
    "layer-options": _check_layer_options,
    "size": _check_size,
    "layer-bytes": _check_layer_bytes,
    "encodes-values": _check_encodes_values,
    "deterministic": _check_deterministic,
    "refuses-undeclared": _check_refuses_undeclared,
}
