"""Plugin discovery: entry points, built-ins as plugins, blocking, NETSHRINK_PLUGINS, clashes."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

import netshrink as ns
from netshrink.cli import cli
from netshrink.errors import DuplicateNameError, UnknownNameError

PLUGIN_SOURCE = '''
import netshrink as ns
from pydantic import Field
from netshrink.encodings import Sparse


class HalfConfig(ns.CompressorConfig):
    """Config of the throwaway plugin."""
    keep_every: int = Field(2, ge=1, description="Keep one weight in this many.")


class Half(ns.Compressor):
    """Keep every n-th weight (a throwaway test method)."""
    name = "{name}"
    Config = HalfConfig
    capabilities = ns.Capabilities(handles=("Linear",))

    def compress(self, model, layers, ctx):
        records = []
        for lname, module in layers:
            mask = torch.zeros_like(module.weight, dtype=torch.bool).reshape(-1)
            mask[:: self.config.keep_every] = True
            mask = mask.reshape(module.weight.shape)
            w = module.weight.detach() * mask
            ctx.encode(model, lname + ".weight", Sparse.from_dense(w, mask=mask))
            records.append(ns.LayerRecord(lname))
        return ns.StepResult(model, records)


@ns.hookimpl
def register_compressors(register):
    register(Half)
'''


@pytest.fixture
def fake_distribution(tmp_path, monkeypatch):
    """Install a throwaway plugin distribution (module + dist-info with an entry point)."""

    def make(
        dist: str = "netshrink-half",
        module: str = "netshrink_half",
        name: str = "half",
        entry: str = "half",
    ):
        (tmp_path / f"{module}.py").write_text("import torch\n" + PLUGIN_SOURCE.format(name=name))
        info = tmp_path / f"{dist.replace('-', '_')}-1.2.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
        (info / "entry_points.txt").write_text(f"[netshrink]\n{entry} = {module}\n")
        return module

    monkeypatch.syspath_prepend(str(tmp_path))
    yield make
    for mod in [m for m in sys.modules if m.startswith("netshrink_")]:
        del sys.modules[mod]


def test_builtins_are_plugins(fresh_registry):
    infos = {i.name: i for i in fresh_registry.list_plugins()}
    assert infos["magnitude"].builtin and infos["magnitude"].registered["compressors"] == [
        "magnitude"
    ]
    assert "register_compressors" in infos["magnitude"].hooks
    assert {"digits", "digits28", "digits32"} <= set(fresh_registry.datasets())
    assert {"zoo", "timm", "torchvision", "file"} <= set(fresh_registry.model_adapters())


def test_entry_point_plugin_is_listed_and_usable(
    fresh_registry, fake_distribution, monkeypatch, lenet300
):
    fake_distribution()
    monkeypatch.setenv("NETSHRINK_PLUGINS", "half")
    fresh_registry.reset()
    infos = {i.name: i for i in fresh_registry.list_plugins()}
    assert infos["half"].distribution == "netshrink-half"
    assert infos["half"].version == "1.2.3"
    assert infos["half"].registered == {"compressors": ["half"]}
    out = CliRunner().invoke(cli, ["plugins"])
    assert out.exit_code == 0, out.output
    assert "netshrink-half" in out.output and "1.2.3" in out.output
    result = ns.compress(
        lenet300,
        [ns.step("half", keep_every=4, select={"types": ["Linear"]})],
        data="digits28",
        latency=False,
    )
    w = result.model.fc1.weight
    assert int((w != 0).sum()) <= w.numel() // 4 + 1


def test_netshrink_plugins_env_limits_third_party(fresh_registry, fake_distribution, monkeypatch):
    fake_distribution()
    monkeypatch.setenv("NETSHRINK_PLUGINS", "")
    fresh_registry.reset()
    assert "half" not in fresh_registry.compressors()
    assert "magnitude" in fresh_registry.compressors()  # built-ins still load
    monkeypatch.delenv("NETSHRINK_PLUGINS")
    fresh_registry.reset()
    assert "half" in fresh_registry.compressors()


def test_block_builtin_by_name(fresh_registry, monkeypatch):
    monkeypatch.setenv("NETSHRINK_DISABLE_PLUGINS", "magnitude")
    fresh_registry.reset()
    assert "magnitude" not in fresh_registry.compressors()
    with pytest.raises(UnknownNameError, match="Unknown compressor 'magnitude'"):
        fresh_registry.get_compressor("magnitude")
    monkeypatch.delenv("NETSHRINK_DISABLE_PLUGINS")
    fresh_registry.reset()
    fresh_registry.block_plugin("quantize")
    assert "quantize" not in fresh_registry.compressors()


def test_duplicate_name_names_both_plugins(fresh_registry, fake_distribution, monkeypatch):
    fake_distribution(name="magnitude")  # entry point "half" registers a clashing name
    monkeypatch.setenv("NETSHRINK_PLUGINS", "half")
    fresh_registry.reset()
    with pytest.raises(DuplicateNameError) as err:
        fresh_registry.compressors()
    msg = str(err.value)
    assert "'magnitude'" in msg and "'half'" in msg
    assert "built-in" in msg and "netshrink-half" in msg


def test_unknown_name_suggests(fresh_registry):
    with pytest.raises(UnknownNameError) as err:
        fresh_registry.get_compressor("magnitud")
    assert "Did you mean 'magnitude'" in str(err.value)
    with pytest.raises(KeyError):  # also a KeyError, as the style guide asks
        fresh_registry.get_dataset("digit")


def test_register_rejects_non_compressors(fresh_registry):
    class Bad:
        @ns.hookimpl
        def register_compressors(self, register):
            register(int)

    fresh_registry.register_plugin(Bad(), name="bad")
    with pytest.raises(ns.NetshrinkError, match="not a Compressor subclass"):
        fresh_registry.compressors()


def test_misspelled_hook_fails_loudly(fresh_registry):
    class Typo:
        @ns.hookimpl
        def register_compresors(self, register):
            pass

    with pytest.raises(Exception, match="register_compresors"):
        fresh_registry.register_plugin(Typo(), name="typo")


def test_plugin_sources_are_plain(tmp_path):
    # The throwaway plugin above is a complete example: keep it importable as text.
    assert "register_compressors" in textwrap.dedent(PLUGIN_SOURCE)
    assert torch.__version__


def test_cache_is_not_fooled_by_a_reused_object_id(fresh_registry):
    """The hook-result cache is keyed by the ids of the registered plugins. An unregistered
    plugin must stay referenced by the cache entry built with it: if it were freed, a new plugin
    could get its id and be served the old plugin's stale entries (a flaky test showed this)."""
    import gc
    import weakref

    from netshrink.registry import manager

    class Plugin:
        def __init__(self, prefix: str) -> None:
            self.prefix = prefix

        @ns.hookimpl
        def register_datasets(self, register):
            register(self.prefix, lambda: None)

    old = Plugin("reuse-old")
    fresh_registry.register_plugin(old, name="reuse")
    assert "reuse-old" in manager.datasets()
    fresh_registry.unregister_plugin(old)
    ref = weakref.ref(old)
    del old
    gc.collect()
    assert ref() is not None  # still referenced: its id cannot be handed to a new plugin
    new = Plugin("reuse-new")
    fresh_registry.register_plugin(new, name="reuse")
    names = manager.datasets()
    assert "reuse-new" in names and "reuse-old" not in names
    fresh_registry.unregister_plugin(new)
