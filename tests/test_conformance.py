"""netshrink.testing: every registered compressor passes the conformance suite, and the suite
catches compressors that break the contract."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Annotated

import pytest
import torch
from pydantic import Field, PlainSerializer

import netshrink as ns
from netshrink.encodings import Quantized, Sparse
from netshrink.registry import DEFAULT_PLUGINS, compressors
from netshrink.testing import (
    ALL_CHECKS,
    BUILTIN_FAST_CONFIGS,
    ConformanceError,
    check_compressor,
    conformance_cases,
    invalid_values,
    tiny_model,
)

# Collected from the registry, so every compressor a built-in plugin (or, without the
# conftest's NETSHRINK_PLUGINS="", an installed plugin) registers is covered automatically.
# Built-ins whose defaults are slow run with their netshrink.testing.BUILTIN_FAST_CONFIGS entry.
CASES = [case for _, entry in sorted(compressors().items())
         for case in conformance_cases(entry.obj)]
# Linear and Conv2d (the layer types every method targets) run in the default suite; the other
# declared types (Conv1d, Conv3d, ConvTranspose2d, BatchNorm2d, Embedding) with -m slow.
FAST_TYPES = (None, "Linear", "Conv2d")


@pytest.mark.parametrize("case", [
    pytest.param(case, id=case.id,
                 marks=() if case.layer_type in FAST_TYPES else (pytest.mark.slow,))
    for case in CASES])
def test_registered_compressor_conforms(case):
    case.run()


def test_every_builtin_compressor_is_covered():
    covered = {case.compressor.name for case in CASES}
    builtin = {name for name, entry in compressors().items()
               if entry.plugin in {m.rsplit(".", 1)[-1] for m in DEFAULT_PLUGINS}}
    assert "magnitude" in builtin
    assert builtin <= covered
    # Each covered compressor gets the class checks and at least one per-type run.
    for name in covered:
        checks = {case.check for case in CASES if case.compressor.name == name}
        assert {"class", "config-json", "config-invalid", "compress", "save-load", "size",
                "layer-bytes", "encodes-values", "deterministic"} <= checks, name


def test_fast_configs_live_on_the_test_side():
    # A test setting is not part of the production class.
    assert not hasattr(ns.Compressor, "conformance_config")
    for name, entry in compressors().items():
        assert "conformance_config" not in dir(entry.obj), name
    for name, fast in BUILTIN_FAST_CONFIGS.items():
        if name in compressors():
            cls = compressors()[name].obj
            assert conformance_cases(cls, checks=("class",))[0].config == fast
            # config= overrides the built-in settings key by key.
            key = next(iter(fast))
            cases = conformance_cases(cls, config={key: fast[key]}, checks=("class",))
            assert cases[0].config == fast


# -- the suite can fail: compressors that break one rule each ---------------------------------


class _PruneHalf(ns.Compressor):
    """Zero every other weight of each selected layer, stored sparse (a correct compressor)."""

    name = "conftest-prune-half"
    capabilities = ns.Capabilities(handles=("Linear", "Conv2d"))

    class Config(ns.CompressorConfig):
        """Configuration."""

        fraction: float = Field(0.5, ge=0, lt=1, description="Fraction removed.")

    def compress(self, model, layers, ctx):
        records = []
        for lname, module in layers:
            mask = torch.ones(module.weight.numel(), dtype=torch.bool)
            mask[: round(self.config.fraction * mask.numel())] = False
            mask = mask.reshape(module.weight.shape)
            ctx.encode(model, f"{lname}.weight", Sparse.from_dense(module.weight * mask, mask=mask))
            records.append(ns.LayerRecord(lname))
        return ns.StepResult(model, records)


def test_a_correct_compressor_passes():
    passed = check_compressor(_PruneHalf)
    assert set(passed) == {c.id for c in conformance_cases(_PruneHalf)}
    assert "conftest-prune-half-refuses-undeclared" in passed
    assert "conftest-prune-half-save-load[Conv2d]" in passed
    assert "conftest-prune-half" not in compressors()  # the throwaway registration is gone


class _Hooked(_PruneHalf):
    """Doubles outputs with a forward hook: the artifact cannot reproduce that."""

    name = "conftest-hooked"

    def compress(self, model, layers, ctx):
        out = super().compress(model, layers, ctx)
        layers[0][1].register_forward_hook(lambda module, args, output: output * 2)
        return out


class _Noisy(_PruneHalf):
    """Perturbs weights with an unseeded generator: not reproducible."""

    name = "conftest-noisy"

    def compress(self, model, layers, ctx):
        gen = torch.Generator().manual_seed(time.perf_counter_ns())
        with torch.no_grad():
            for _, module in layers:
                module.weight.add_(torch.randn(module.weight.shape, generator=gen) * 1e-3)
        return super().compress(model, layers, ctx)


class _NoOp(_PruneHalf):
    """Does nothing at all."""

    name = "conftest-noop"

    def compress(self, model, layers, ctx):
        return ns.StepResult(model, [])


class _Stray(_PruneHalf):
    """Records a layer it was not given."""

    name = "conftest-stray"

    def compress(self, model, layers, ctx):
        out = super().compress(model, layers, ctx)
        out.records.append(ns.LayerRecord("head"))
        return out


class _LaxConfig(_PruneHalf):
    """Advertises a bound in its schema that validation does not enforce."""

    name = "conftest-lax"

    class Config(ns.CompressorConfig):
        """Configuration."""

        fraction: float = Field(0.5, description="Fraction removed.",
                                json_schema_extra={"maximum": 0.99})


class _LossyConfig(_PruneHalf):
    """Serialises its config with a loss of precision."""

    name = "conftest-lossy"

    class Config(ns.CompressorConfig):
        """Configuration."""

        fraction: Annotated[float, PlainSerializer(lambda v: round(v, 1))] = Field(
            0.5, ge=0, lt=1, description="Fraction removed.")


class _Undocumented(_PruneHalf):
    """Has a config field without a description."""

    name = "conftest-undocumented"

    class Config(ns.CompressorConfig):
        """Configuration."""

        fraction: float = Field(0.5, ge=0, lt=1)


class _ValuesOnlySparse(Sparse):
    """Counts the stored values but forgets the index bytes (the bitmask or relative indices)
    that ``to_record`` still writes: the layer looks smaller than it is."""

    @property
    def payload_bytes(self) -> int:
        return self.values.payload_bytes


class _UnderReported(_PruneHalf):
    """Stores each layer sparse through an encoding whose payload_bytes under-counts it."""

    name = "conftest-under-reported"

    def compress(self, model, layers, ctx):
        records = []
        for lname, module in layers:
            mask = torch.ones(module.weight.numel(), dtype=torch.bool)
            mask[: module.weight.numel() // 2] = False
            mask = mask.reshape(module.weight.shape)
            ctx.encode(model, f"{lname}.weight",
                       _ValuesOnlySparse.from_dense(module.weight * mask, mask=mask))
            records.append(ns.LayerRecord(lname))
        return ns.StepResult(model, records)


class _Misattributed(_PruneHalf):
    """Prunes every selected layer but records only the first: the others' sparse bytes are
    reported under '(other tensors)'."""

    name = "conftest-misattributed"

    def compress(self, model, layers, ctx):
        out = super().compress(model, layers, ctx)
        return ns.StepResult(model, out.records[:1])


class _FakeQuant(_PruneHalf):
    """Declares encodes_values and rounds weights to a 4-bit grid, but records no encoding:
    the rounded values are stored as full fp32."""

    name = "conftest-fake-quant"
    capabilities = ns.Capabilities(handles=("Linear", "Conv2d"), encodes_values=True)

    def compress(self, model, layers, ctx):
        with torch.no_grad():
            for _, module in layers:
                module.weight.copy_(Quantized.quantize(module.weight, 4).decode())
        return ns.StepResult(model, [ns.LayerRecord(lname) for lname, _ in layers])


class _UndeclaredQuant(_PruneHalf):
    """Quantizes (recording it) without declaring encodes_values."""

    name = "conftest-undeclared-quant"

    def compress(self, model, layers, ctx):
        for lname, module in layers:
            ctx.encode(model, f"{lname}.weight", Quantized.quantize(module.weight, 4))
        return ns.StepResult(model, [ns.LayerRecord(lname) for lname, _ in layers])


class _Quant(_UndeclaredQuant):
    """Quantizes to 4 bits and says so (a correct compressor)."""

    name = "conftest-quant"
    capabilities = ns.Capabilities(handles=("Linear", "Conv2d"), encodes_values=True)


BROKEN = [
    (_Hooked, ("save-load",), r"save-load\[Linear\].*outputs differ", None),
    (_Noisy, ("deterministic",), r"deterministic\[Linear\].*different artifacts", None),
    (_NoOp, ("compress",), r"compress\[Linear\].*did nothing", None),
    (_Stray, ("compress",), r"compress\[Linear\].*not selected: \['head'\]", None),
    (_LaxConfig, ("config-invalid",), r"fraction=0\.99.*was accepted", None),
    (_LossyConfig, ("config-json",), r"does not round-trip", {"fraction": 0.55}),
    (_Undocumented, ("class",), r"without a description: \['fraction'\]", None),
    (_UnderReported, ("layer-bytes",),
     r"(?s)layer-bytes\[Linear\].*row 'fc1' reports \d+ bytes but the artifact stores \d+"
     r".*row '\(header \+ manifest\)' reports", None),
    (_Misattributed, ("layer-bytes",),
     r"(?s)layer-bytes\[Linear\].*outside every recorded layer \['fc1'\].*fc2\.weight", None),
    (_FakeQuant, ("encodes-values",),
     r"(?s)encodes-values\[Linear\].*encodes_values=True.*layers \['fc1', 'fc2'\]", None),
    (_UndeclaredQuant, ("encodes-values",),
     r"(?s)encodes-values\[Linear\].*value-encoded tensors \['fc1\.weight'", None),
]


@pytest.mark.parametrize(("cls", "checks", "message", "config"),
                         [pytest.param(*b, id=b[0].name) for b in BROKEN])
def test_the_suite_catches(cls, checks, message, config):
    with pytest.raises(ConformanceError, match=message):
        check_compressor(cls, checks=checks, config=config)


@pytest.mark.parametrize("cls", [_UnderReported, _FakeQuant], ids=lambda c: c.name)
def test_the_lies_pass_the_other_checks(cls):
    # Total size, save/load and the rest hold: only the new checks catch these two.
    checks = tuple(c for c in ALL_CHECKS if c not in ("layer-bytes", "encodes-values"))
    check_compressor(cls, checks=checks)


def test_a_correct_quantizer_passes():
    check_compressor(_Quant, checks=("layer-bytes", "encodes-values", "save-load", "size"))


class _OldStyle(_PruneHalf):
    """Still sets the removed class attribute."""

    name = "conftest-old-style"
    conformance_config = {"fraction": 0.25}  # noqa: RUF012 (the removed attribute, on purpose)


def test_the_old_class_attribute_is_refused():
    with pytest.raises(ConformanceError, match="no longer reads"):
        check_compressor(_OldStyle, checks=("class",))


def test_invalid_values_come_from_the_schema():
    values = {(v.field, v.value) for v in invalid_values(_PruneHalf.Config)}
    assert ("fraction", 1) in values          # exclusive maximum
    assert ("fraction", -1e-6) in values      # just below the minimum
    assert ("fraction", "not-a-number") in values
    assert ("__not_a_field__", 1) in values


def test_config_override_and_unknown_check():
    cases = conformance_cases(_PruneHalf, config={"fraction": 0.25}, checks=("class",))
    assert [c.id for c in cases] == ["conftest-prune-half-class"]
    assert cases[0].config == {"fraction": 0.25}
    with pytest.raises(ValueError, match="unknown conformance check"):
        conformance_cases(_PruneHalf, checks=("nope",))
    assert set(ALL_CHECKS) >= {"class", "refuses-undeclared"}


def test_model_spec_replaces_the_tiny_models():
    cases = conformance_cases(_PruneHalf, model_spec="zoo:lenet300", checks=("compress",))
    assert [c.id for c in cases] == ["conftest-prune-half-compress[Linear]"]
    cases[0].run()


def test_tiny_models_cover_every_layer_type():
    from netshrink.selector import LAYER_TYPES
    from netshrink.testing import model_for_type

    for layer_type, torch_cls in LAYER_TYPES.items():
        spec = model_for_type(layer_type)
        assert spec is not None, layer_type
        model = tiny_model(spec, trained=False)
        assert any(isinstance(m, torch_cls) for m in model.modules()), layer_type
        assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_pytest_option_runs_the_suite(tmp_path):
    env = {**os.environ, "NETSHRINK_PLUGINS": "", "NETSHRINK_PROGRESS": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "--netshrink-conformance", "magnitude", "-k", "class or config",
         "--netshrink-conformance-config", 'magnitude={"sparsity": 0.3}'],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 passed" in proc.stdout


def test_pytest_config_option_values():
    from netshrink.testing.pytest_plugin import _configs

    assert _configs(['snip={"batch_size": 64}', "other={}"]) == {
        "snip": {"batch_size": 64}, "other": {}}
    for bad in ("snip=3", "snip", '={"a": 1}', "snip={oops"):
        with pytest.raises(pytest.UsageError, match="netshrink-conformance-config"):
            _configs([bad])


class _DataPlugin:
    @ns.hookimpl
    def register_datasets(self, register):
        register("conftest-data", lambda: ns.datasets.load("digits"), description="digits again")


def test_pytest_plugin_fixtures(netshrink_plugin, netshrink_tiny_model):
    assert netshrink_plugin(_DataPlugin(), name="conftest-data-plugin") == "conftest-data-plugin"
    assert ns.datasets.available()["conftest-data"] == "digits again"
    model = netshrink_tiny_model("Conv2d")
    assert isinstance(model.conv1, torch.nn.Conv2d) and ns.model_info(model).head == "head"


def test_pytest_plugin_fixture_unregistered_afterwards():
    assert "conftest-data" not in ns.datasets.available()


def test_layer_options_with_wrong_bytes_are_caught():
    """The ``layer-options`` check fails a compressor whose declared option bytes are not what
    it stores (magnitude's own options, each declared one byte too many)."""
    from netshrink.plugins.magnitude import Magnitude

    class Overstated(Magnitude):
        name = "conftest-overstated"

        @classmethod
        def layer_options(cls, module, name):
            return [cls.option(o.config, bytes=o.bytes + 1)
                    for o in Magnitude.layer_options.__func__(cls, module, name)]

    with pytest.raises(ConformanceError, match=r"declares .* bytes but the compressor stores"):
        check_compressor(Overstated, checks=("layer-options",))
    assert check_compressor(Magnitude, checks=("layer-options",))
