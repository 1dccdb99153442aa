"""The hooks a netshrink plugin can implement.

Every hook takes a ``register`` callback (or the CLI group) so the registry validates each item as
it is registered and knows which plugin registered it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("netshrink")
hookimpl = pluggy.HookimplMarker("netshrink")


@hookspec
def register_compressors(register: Callable[[type], None]) -> None:
    """Register compressor classes: ``register(MyCompressor)``; the class's ``name`` is its id."""


@hookspec
def register_layer_selectors(register: Callable[[str, Any], None]) -> None:
    """Register named selector presets: ``register("convs-except-first", LayerSelector(...))``."""


@hookspec
def register_model_adapters(register: Callable[[Any], None]) -> None:
    """Register model adapters: ``register(MyAdapter())``; the adapter's ``prefix`` is its id."""


@hookspec
def register_datasets(register: Callable[..., None]) -> None:
    """Register datasets: ``register("name", loader, description="...")`` (loader -> DataSplits).

    A name ending in ``:`` claims a spec prefix: ``register("imagefolder:", loader)`` serves
    every ``imagefolder:TARGET?key=value`` not registered by its full name, calling
    ``loader(TARGET, key=value, ...)``.
    """


@hookspec
def register_executors(register: Callable[..., None]) -> None:
    """Register executors: ``register("ray", factory, description="...")``, where
    ``factory(workers=None, address=None)`` returns an object with ``name`` and
    ``map(fn, items)`` (``local`` and ``process`` are built in and cannot be registered).
    """


@hookspec
def register_commands(cli: Any) -> None:
    """Add sub-commands to the ``netshrink`` click group ``cli``."""
