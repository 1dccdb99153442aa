"""One test per hook (``test_hook_<name>``): a throwaway class-based plugin registers something
through the hook, and netshrink uses it. tests/test_hooks_documented.py checks that every hook
has such a test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import click
import pytest
import torch
from click.testing import CliRunner
from pydantic import Field
from torch import nn
from torch.utils.data import TensorDataset

import netshrink as ns
from netshrink import registry
from netshrink.datasets import DataSplits
from netshrink.encodings import Sparse


def _registered(plugin: object, name: str) -> Iterator[object]:
    """Register ``plugin`` for one test and always unregister it."""
    registry.register_plugin(plugin, name=name)
    try:
        yield plugin
    finally:
        registry.unregister_plugin(plugin)


# -- register_compressors ---------------------------------------------------------------------


class HalveConfig(ns.CompressorConfig):
    """Configuration of :class:`Halve`."""

    keep_every: int = Field(2, ge=2, le=16, description="Keep one weight in this many.")


class Halve(ns.Compressor):
    """Keep every n-th weight (a test compressor)."""

    name = "hooktest-halve"
    Config = HalveConfig
    capabilities = ns.Capabilities(handles=("Linear",))

    def compress(self, model, layers, ctx):
        records = []
        for lname, module in layers:
            mask = torch.zeros(module.weight.numel(), dtype=torch.bool)
            mask[:: self.config.keep_every] = True
            mask = mask.reshape(module.weight.shape)
            ctx.encode(model, f"{lname}.weight", Sparse.from_dense(module.weight * mask, mask=mask))
            records.append(ns.LayerRecord(lname))
        return ns.StepResult(model, records)


class CompressorPlugin:
    """Registers :class:`Halve`."""

    @ns.hookimpl
    def register_compressors(self, register: Callable[[type], None]) -> None:
        register(Halve)


@pytest.fixture
def compressor_plugin() -> Iterator[object]:
    yield from _registered(CompressorPlugin(), "hooktest-compressors")


def test_hook_register_compressors(compressor_plugin, lenet300):
    entry = registry.compressors()["hooktest-halve"]
    assert entry.obj is Halve and entry.plugin == "hooktest-compressors"
    assert entry.description == "Keep every n-th weight (a test compressor)."
    info = next(i for i in registry.list_plugins() if i.name == "hooktest-compressors")
    assert info.registered == {"compressors": ["hooktest-halve"]}
    assert info.hooks == ["register_compressors"] and not info.builtin
    result = ns.compress(lenet300, [ns.step("hooktest-halve", keep_every=4)], latency=False)
    assert float((result.model.fc1.weight != 0).float().mean()) <= 0.25
    assert result.report.storage_bytes < result.report.dense_bytes


def test_hook_register_compressors_gone_after_unregister(compressor_plugin):
    assert "hooktest-halve" in registry.compressors()
    registry.unregister_plugin(compressor_plugin)
    try:
        assert "hooktest-halve" not in registry.compressors()
    finally:
        registry.register_plugin(compressor_plugin, name="hooktest-compressors")


# -- register_layer_selectors -----------------------------------------------------------------


class SelectorPlugin:
    """Registers two selector presets, one as a LayerSelector and one as a plain dict."""

    @ns.hookimpl
    def register_layer_selectors(self, register: Callable[..., None]) -> None:
        register("hooktest-first-linear", ns.LayerSelector(types=["Linear"], skip_last=2),
                 description="the first of three Linear layers")
        register("hooktest-fc2", {"names": ["fc2"]}, description="fc2 only")


@pytest.fixture
def selector_plugin() -> Iterator[object]:
    yield from _registered(SelectorPlugin(), "hooktest-selectors")


def test_hook_register_layer_selectors(selector_plugin, lenet300):
    presets = registry.selector_presets()
    assert presets["hooktest-fc2"].obj == ns.LayerSelector(names=["fc2"])
    assert presets["hooktest-first-linear"].description == "the first of three Linear layers"
    assert presets["hooktest-fc2"].plugin == "hooktest-selectors"
    result = ns.compress(lenet300, [ns.step("magnitude", select="hooktest-fc2", sparsity=0.5)],
                         latency=False)
    assert [r.name for r in result.records] == ["fc2"]
    result = ns.compress(lenet300, [ns.step("magnitude", select="hooktest-first-linear",
                                            sparsity=0.5)], latency=False)
    assert [r.name for r in result.records] == ["fc1"]


# -- register_model_adapters ------------------------------------------------------------------


class Pair(nn.Module):
    """Two linear layers."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Linear(8, width)
        self.out = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.body(x)))


class PairAdapter(ns.ModelAdapter):
    """``hooktest:pair?width=N``."""

    prefix = "hooktest"
    description = "a test adapter"

    def load(self, name: str, **options: Any) -> tuple[nn.Module, ns.ModelInfo]:
        if name != "pair":
            raise ns.ModelSpecError(f"hooktest has no model {name!r}")
        width = int(options.get("width", 16))
        return Pair(width), ns.ModelInfo(spec="hooktest:pair", options={"width": width},
                                         input_shape=(8,), num_classes=3, head="out")

    def names(self) -> list[str]:
        return ["pair"]


class AdapterPlugin:
    """Registers :class:`PairAdapter`."""

    @ns.hookimpl
    def register_model_adapters(self, register: Callable[[Any], None]) -> None:
        register(PairAdapter())


@pytest.fixture
def adapter_plugin() -> Iterator[object]:
    yield from _registered(AdapterPlugin(), "hooktest-adapters")


def test_hook_register_model_adapters(adapter_plugin, tmp_path):
    assert registry.model_adapters()["hooktest"].plugin == "hooktest-adapters"
    model = ns.load_model("hooktest:pair?width=12")
    assert model.body.out_features == 12
    assert ns.model_info(model).head == "out"
    # The artifact rebuilds the architecture through the adapter.
    result = ns.compress(model, [ns.step("magnitude", sparsity=0.5)], latency=False)
    path = result.save(tmp_path / "pair.nsk", report=False)
    loaded = ns.load(path)
    x = torch.randn(5, 8)
    assert torch.allclose(loaded(x), result.model(x), atol=1e-6)
    with pytest.raises(ns.ModelSpecError, match="no model 'nope'"):
        ns.load_model("hooktest:nope")


# -- register_datasets ------------------------------------------------------------------------


def _tiny_data() -> DataSplits:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()

    def split(a: int, b: int) -> TensorDataset:
        return TensorDataset(x[a:b], y[a:b])

    return DataSplits("hooktest-blobs", split(0, 40), split(40, 50), split(50, 60), num_classes=3)


class DatasetPlugin:
    """Registers a synthetic dataset."""

    @ns.hookimpl
    def register_datasets(self, register: Callable[..., None]) -> None:
        register("hooktest-blobs", _tiny_data, description="synthetic 8-feature blobs")


@pytest.fixture
def dataset_plugin() -> Iterator[object]:
    yield from _registered(DatasetPlugin(), "hooktest-datasets")


def test_hook_register_datasets(dataset_plugin, adapter_plugin):
    assert ns.datasets.available()["hooktest-blobs"] == "synthetic 8-feature blobs"
    data = ns.datasets.load("hooktest-blobs")
    assert data.input_shape == (8,) and len(data.train) == 40
    model = ns.load_model("hooktest:pair")
    result = ns.compress(model, [ns.step("magnitude", sparsity=0.5)], data="hooktest-blobs",
                         latency=False)
    assert result.report.data == "hooktest-blobs"
    assert result.report.accuracy_after is not None


# -- register_commands ------------------------------------------------------------------------


class CommandPlugin:
    """Adds ``netshrink hooktest-hello``."""

    @ns.hookimpl
    def register_commands(self, cli: click.Group) -> None:
        @cli.command(name="hooktest-hello")
        @click.argument("who")
        def hello(who: str) -> None:
            """Say hello (a test command)."""
            click.echo(f"hello {who}")


@pytest.fixture
def command_plugin() -> Iterator[object]:
    from netshrink import cli as cli_module

    try:
        yield from _registered(CommandPlugin(), "hooktest-commands")
    finally:
        cli_module.cli.commands.pop("hooktest-hello", None)  # click keeps added commands


def test_hook_register_commands(command_plugin):
    from netshrink import cli as cli_module

    cli_module._load_plugin_commands()  # what the console script does before parsing
    runner = CliRunner()
    result = runner.invoke(cli_module.cli, ["hooktest-hello", "world"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "hello world"
    listing = runner.invoke(cli_module.cli, ["--help"])
    assert "hooktest-hello" in listing.output
