"""The plugin manager: discovery, loading, blocking, and the per-kind name registries.

Built-in plugins are modules listed in :data:`DEFAULT_PLUGINS`; they are registered with the same
``pm.register`` call and consumed through the same hooks as third-party plugins found through the
``netshrink`` entry-point group, so they have no privileges a third-party plugin lacks.

Environment variables:

``NETSHRINK_PLUGINS``
    Comma-separated entry-point names: only these third-party plugins load (``""`` loads none).
    Built-ins always load unless blocked.
``NETSHRINK_DISABLE_PLUGINS``
    Comma-separated plugin names to block, built-ins included (e.g. ``magnitude,timm_adapter``).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from netshrink.adapters import ModelAdapter
from netshrink.compressor import Compressor
from netshrink.errors import DuplicateNameError, NetshrinkError, UnknownNameError
from netshrink.registry import hookspecs
from netshrink.selector import LayerSelector

DEFAULT_PLUGINS: tuple[str, ...] = (
    "netshrink.plugins.digits",
    "netshrink.plugins.shapes",
    "netshrink.plugins.localdata",
    "netshrink.plugins.zoo",
    "netshrink.plugins.timm_adapter",
    "netshrink.plugins.torchvision_adapter",
    "netshrink.plugins.file_adapter",
    "netshrink.plugins.transformers_adapter",
    "netshrink.plugins.sequences",
    "netshrink.plugins.selectors",
    "netshrink.plugins.magnitude",
    "netshrink.plugins.quantize",
    "netshrink.plugins.svd",
    "netshrink.plugins.bioclust",
    "netshrink.plugins.normsparse",
    "netshrink.plugins.statprune",
    "netshrink.plugins.tucker",
    "netshrink.plugins.rlprune",
    "netshrink.plugins.sigmaprune",
    "netshrink.plugins.joint",
    "netshrink.plugins.ray_executor",
)

_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
# A dataset name may end in ':' to claim a spec prefix (``imagefolder:`` serves any
# ``imagefolder:PATH``), the way model adapters own ``zoo:``, ``timm:``, ...
_DATASET_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*:?$")
# The executors netshrink.executors builds in (it sits above the registry, so it cannot be
# imported here to ask); a plugin registering one of these names would be shadowed.
_BUILTIN_EXECUTORS = ("local", "process")

pm = pluggy.PluginManager("netshrink")
pm.add_hookspecs(hookspecs)

_loaded = False
_blocked: set[str] = set()
_cache: dict[str, tuple[frozenset[int], list[object], dict[str, Entry]]] = {}


@dataclass(frozen=True)
class Entry:
    """One registered item and the plugin that registered it."""

    name: str
    obj: Any
    plugin: str
    distribution: str | None
    description: str = ""


@dataclass
class PluginInfo:
    """A loaded plugin: its name, distribution, version and what it registered."""

    name: str
    distribution: str | None
    version: str | None
    builtin: bool
    hooks: list[str]
    registered: dict[str, list[str]] = field(default_factory=dict)


def _env_list(var: str) -> list[str] | None:
    value = os.environ.get(var)
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def load_plugins() -> None:
    """Load built-in and third-party plugins once (idempotent, lazy)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in _env_list("NETSHRINK_DISABLE_PLUGINS") or []:
        _blocked.add(name)
        pm.set_blocked(name)
    for module_name in DEFAULT_PLUGINS:
        short = module_name.rsplit(".", 1)[-1]
        if pm.is_blocked(short) or pm.has_plugin(short):
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # A built-in listed before its module exists, or whose optional dependency is
            # missing: skip it rather than break every other plugin.
            if exc.name and (exc.name == module_name or not exc.name.startswith("netshrink")):
                continue
            raise
        pm.register(module, name=short)
    only = _env_list("NETSHRINK_PLUGINS")
    if only is None:
        pm.load_setuptools_entrypoints("netshrink")
    else:
        for name in only:
            pm.load_setuptools_entrypoints("netshrink", name=name)
    pm.check_pending()


def reset() -> None:
    """Unregister every plugin and forget the cache (for tests); the next access reloads."""
    global _loaded
    for plugin in list(pm.get_plugins()):
        pm.unregister(plugin)
    for name in _blocked:  # forget blocks too, so the environment is read again
        pm.unblock(name)
    _blocked.clear()
    _loaded = False
    _cache.clear()


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register a plugin object (module or instance with hookimpls); returns its name."""
    load_plugins()
    registered = pm.register(plugin, name=name)
    if registered is None:
        raise NetshrinkError(f"plugin {name!r} is blocked and was not registered")
    pm.check_pending()
    return registered


def unregister_plugin(name_or_plugin: str | object) -> None:
    """Unregister a plugin by name or object."""
    if isinstance(name_or_plugin, str):
        pm.unregister(name=name_or_plugin)
    else:
        pm.unregister(name_or_plugin)


def block_plugin(name: str) -> None:
    """Block a plugin by name (built-ins included); unregisters it if already loaded."""
    load_plugins()
    _blocked.add(name)
    pm.set_blocked(name)


def _distributions() -> dict[int, Any]:
    return {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}


def _dist_name(dist: Any) -> str | None:
    if dist is None:
        return None
    return (
        dist.metadata["name"] if hasattr(dist, "metadata") else getattr(dist, "project_name", None)
    )


def _collect(
    hook_name: str,
    make_register: Callable[[Callable[..., None]], Callable[..., None]],
    name_re: re.Pattern[str] = _NAME_RE,
):
    """Call every implementation of ``hook_name`` with its own register callback."""
    load_plugins()
    plugins = pm.get_plugins()
    key = frozenset(id(p) for p in plugins)
    cached = _cache.get(hook_name)
    if cached is not None and cached[0] == key:
        return cached[2]
    dists = _distributions()
    entries: dict[str, Entry] = {}
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        dist = dists.get(id(impl.plugin))
        dist_name = _dist_name(dist)

        def add(name: str, obj: Any, description: str = "", _impl=impl, _dist=dist_name) -> None:
            if not isinstance(name, str) or not name_re.match(name):
                prefix_note = name_re is not _NAME_RE
                suffix = " (and a trailing ':' for a spec prefix)" if prefix_note else ""
                raise NetshrinkError(
                    f"plugin {_impl.plugin_name!r} registered an invalid name {name!r} "
                    f"in {hook_name}: use lower-case letters, digits, '-' or '_'{suffix}"
                )
            if name in entries:
                other = entries[name]
                raise DuplicateNameError(
                    f"{hook_name}: name {name!r} is registered by two plugins: "
                    f"{other.plugin!r} (distribution {other.distribution or 'built-in'}) and "
                    f"{_impl.plugin_name!r} (distribution {_dist or 'built-in'}). "
                    f"Block one with NETSHRINK_DISABLE_PLUGINS={_impl.plugin_name}."
                )
            entries[name] = Entry(name, obj, _impl.plugin_name, _dist, description)

        impl.function(**{impl.argnames[0]: make_register(add)})
    # The plugin objects are kept with the key: while they are referenced here, no new plugin
    # can be given the id of one that was unregistered, so an equal key means the same set.
    _cache[hook_name] = (key, list(plugins), entries)
    return entries


def _register_compressor(add):
    def register(cls: type) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Compressor)):
            raise NetshrinkError(f"register_compressors: {cls!r} is not a Compressor subclass")
        cls.validate_class()
        add(cls.name, cls, cls.summary())

    return register


def _register_adapter(add):
    def register(adapter: Any) -> None:
        if not isinstance(adapter, ModelAdapter):
            raise NetshrinkError(f"register_model_adapters: {adapter!r} is not a ModelAdapter")
        add(adapter.prefix, adapter, adapter.description)

    return register


def _register_dataset(add):
    def register(name: str, loader: Callable[..., Any], description: str = "") -> None:
        if not callable(loader):
            raise NetshrinkError(f"register_datasets: loader for {name!r} is not callable")
        add(name, loader, description)

    return register


def _register_selector(add):
    def register(name: str, selector: Any, description: str = "") -> None:
        sel = (
            selector
            if isinstance(selector, LayerSelector)
            else LayerSelector.model_validate(selector)
        )
        add(name, sel, description)

    return register


def _register_executor(add):
    def register(name: str, factory: Callable[..., Any], description: str = "") -> None:
        if not callable(factory):
            raise NetshrinkError(f"register_executors: factory for {name!r} is not callable")
        if name in _BUILTIN_EXECUTORS:
            raise DuplicateNameError(
                f"register_executors: {name!r} is a built-in executor of netshrink "
                f"({', '.join(_BUILTIN_EXECUTORS)}); register yours under another name"
            )
        add(name, factory, description)

    return register


def compressors() -> dict[str, Entry]:
    """All registered compressors by name."""
    return _collect("register_compressors", _register_compressor)


def model_adapters() -> dict[str, Entry]:
    """All registered model adapters by spec prefix."""
    return _collect("register_model_adapters", _register_adapter)


def datasets() -> dict[str, Entry]:
    """All registered datasets by name; a name ending in ':' is a spec prefix."""
    return _collect("register_datasets", _register_dataset, _DATASET_NAME_RE)


def selector_presets() -> dict[str, Entry]:
    """All registered layer-selector presets by name."""
    return _collect("register_layer_selectors", _register_selector)


def executors() -> dict[str, Entry]:
    """All executors registered by plugins, by name (``local`` and ``process`` are built in:
    :func:`netshrink.executors.get_executor` resolves every name)."""
    return _collect("register_executors", _register_executor)


def _get(kind: str, table: dict[str, Entry], name: str) -> Any:
    if name not in table:
        raise UnknownNameError(kind, name, table)
    return table[name].obj


def get_compressor(name: str) -> Any:
    """The compressor class registered as ``name`` (with a did-you-mean error otherwise)."""
    return _get("compressor", compressors(), name)


def get_model_adapter(prefix: str) -> Any:
    """The model adapter registered for spec prefix ``prefix``."""
    return _get("model adapter", model_adapters(), prefix)


def get_dataset(name: str) -> Any:
    """The dataset loader registered as exactly ``name`` (``digits28``, ``imagefolder:``)."""
    return _get("dataset", datasets(), name)


def resolve_dataset(spec: str) -> tuple[Any, str | None]:
    """The loader for a dataset spec and the target it is called with: ``(loader, None)`` for
    a registered name (``digits28``); ``(loader, "PATH?k=v")`` for ``prefix:PATH?k=v`` when no
    dataset has that full name and a plugin registered the prefix ``prefix:``."""
    table = datasets()
    if spec in table:
        return table[spec].obj, None
    prefix, sep, target = spec.partition(":")
    if sep and f"{prefix}:" in table:
        return table[f"{prefix}:"].obj, target
    raise UnknownNameError("dataset", spec, table)


def get_selector_preset(name: str) -> Any:
    """The layer selector preset registered as ``name``."""
    return _get("selector preset", selector_presets(), name)


def list_plugins() -> list[PluginInfo]:
    """Every loaded plugin with its distribution, version, hooks and registered names."""
    load_plugins()
    dists = _distributions()
    kinds = {
        "compressors": compressors(),
        "model adapters": model_adapters(),
        "datasets": datasets(),
        "selectors": selector_presets(),
        "executors": executors(),
    }
    builtin_names = {m.rsplit(".", 1)[-1] for m in DEFAULT_PLUGINS}
    infos = []
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin) or repr(plugin)
        dist = dists.get(id(plugin))
        registered = {
            kind: sorted(e.name for e in table.values() if e.plugin == name)
            for kind, table in kinds.items()
        }
        infos.append(
            PluginInfo(
                name=name,
                distribution=_dist_name(dist),
                version=getattr(dist, "version", None),
                builtin=dist is None and name in builtin_names,
                hooks=sorted(c.name for c in pm.get_hookcallers(plugin) or []),
                registered={k: v for k, v in registered.items() if v},
            )
        )
    return sorted(infos, key=lambda i: (not i.builtin, i.name))
