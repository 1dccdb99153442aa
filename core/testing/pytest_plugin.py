"""pytest plugin for netshrink plugin authors, loaded through the ``pytest11`` entry point.

It is loaded into every pytest run of an environment where netshrink is installed, so it imports
nothing heavy at import time. It provides:

``netshrink_plugin`` (fixture)
    ``netshrink_plugin(obj, name=None)`` registers a throwaway plugin (a class instance or
    module with ``@netshrink.hookimpl`` methods) and unregisters it when the test ends.
``netshrink_tiny_model`` (fixture)
    ``netshrink_tiny_model("Conv2d")`` → a fresh tiny model of that layer type (trained briefly
    on ``digits``), the ones the conformance suite uses.
``--netshrink-conformance NAME`` (option)
    Adds the conformance cases of registered compressor ``NAME`` (repeatable, or ``all``) to the
    run, e.g. ``pytest --netshrink-conformance my-method -p no:cacheprovider``.
``--netshrink-conformance-config NAME=JSON`` (option)
    The config the suite runs ``NAME`` with (repeatable, one per compressor), e.g.
    ``--netshrink-conformance-config 'my-method={"epochs": 1}'``. Built-ins default to their
    :data:`~netshrink.testing.fast_configs.BUILTIN_FAST_CONFIGS` entry.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--netshrink-conformance`` and ``--netshrink-conformance-config``."""
    group = parser.getgroup("netshrink")
    group.addoption(
        "--netshrink-conformance", action="append", default=[], metavar="NAME",
        help="run netshrink's conformance suite on registered compressor NAME ('all': every one)")
    group.addoption(
        "--netshrink-conformance-config", action="append", default=[], metavar="NAME=JSON",
        help="the config the conformance suite runs compressor NAME with, as a JSON object "
        "(e.g. 'my-method={\"epochs\": 1}'; built-ins default to their fast settings)")


def _configs(values: list[str]) -> dict[str, dict[str, Any]]:
    """``NAME=JSON`` option values by compressor name."""
    out: dict[str, dict[str, Any]] = {}
    for value in values:
        name, sep, text = value.partition("=")
        try:
            config = json.loads(text) if sep else None
        except json.JSONDecodeError as exc:
            raise pytest.UsageError(
                f"--netshrink-conformance-config {value!r}: invalid JSON ({exc})") from None
        if not name.strip() or not isinstance(config, dict):
            raise pytest.UsageError(
                f"--netshrink-conformance-config expects NAME=JSON-object, got {value!r} "
                "(e.g. 'my-method={\"epochs\": 1}')")
        out[name.strip()] = config
    return out


def pytest_configure(config: pytest.Config) -> None:
    """Declare the ``conformance`` marker (for ``--strict-markers`` projects)."""
    config.addinivalue_line("markers", "conformance: a netshrink compressor conformance check")


@pytest.fixture
def netshrink_plugin() -> Iterator[Callable[..., str]]:
    """Register throwaway plugins for one test; they are unregistered afterwards."""
    from netshrink.registry import register_plugin, unregister_plugin

    registered: list[object] = []

    def register(plugin: object, name: str | None = None) -> str:
        registered_name = register_plugin(plugin, name=name)
        registered.append(plugin)
        return registered_name

    try:
        yield register
    finally:
        for plugin in reversed(registered):
            unregister_plugin(plugin)


@pytest.fixture
def netshrink_tiny_model() -> Callable[[str], Any]:
    """``netshrink_tiny_model(layer_type)`` → a tiny model with layers of that type."""
    from netshrink.testing.models import model_for_type, tiny_model

    def make(layer_type: str) -> Any:
        spec = model_for_type(layer_type)
        if spec is None:
            pytest.skip(f"no tiny model for layer type {layer_type!r}")
        return tiny_model(spec)

    return make


class _ConformanceItem(pytest.Item):
    """One conformance case collected through ``--netshrink-conformance``."""

    def __init__(self, *, case: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.case = case
        self.add_marker("conformance")

    def runtest(self) -> None:
        self.case.run()

    def reportinfo(self) -> tuple[str, int, str]:
        return self.path, 0, f"netshrink conformance: {self.case.id}"


class _ConformanceCollector(pytest.Collector):
    """Collects the conformance cases of the compressors named on the command line."""

    def __init__(self, *, names: list[str], configs: dict[str, dict[str, Any]],
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.names = names
        self.configs = configs

    def collect(self) -> list[pytest.Item]:
        from netshrink.registry import compressors, get_compressor
        from netshrink.testing.suite import conformance_cases

        names = sorted(compressors()) if "all" in self.names else self.names
        items: list[pytest.Item] = []
        for name in names:
            for case in conformance_cases(get_compressor(name), config=self.configs.get(name)):
                items.append(_ConformanceItem.from_parent(self, name=case.id, case=case))
        return items


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselection, so those apply to these items
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    """Append the ``--netshrink-conformance`` cases to the collected items."""
    names = config.getoption("--netshrink-conformance")
    if not names:
        return
    configs = _configs(config.getoption("--netshrink-conformance-config"))
    collector = _ConformanceCollector.from_parent(session, name="netshrink-conformance",
                                                  names=list(names), configs=configs)
    items.extend(collector.collect())
