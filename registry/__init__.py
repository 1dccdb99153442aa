"""netshrink's plugin registry: pluggy hookspecs, the plugin manager and the name registries."""

from netshrink.registry.hookspecs import hookimpl, hookspec
from netshrink.registry.manager import (
    DEFAULT_PLUGINS,
    PluginInfo,
    block_plugin,
    compressors,
    datasets,
    get_compressor,
    get_dataset,
    get_model_adapter,
    get_selector_preset,
    list_plugins,
    load_plugins,
    model_adapters,
    pm,
    register_plugin,
    reset,
    selector_presets,
    unregister_plugin,
)

__all__ = [
    "DEFAULT_PLUGINS",
    "PluginInfo",
    "block_plugin",
    "compressors",
    "datasets",
    "get_compressor",
    "get_dataset",
    "get_model_adapter",
    "get_selector_preset",
    "hookimpl",
    "hookspec",
    "list_plugins",
    "load_plugins",
    "model_adapters",
    "pm",
    "register_plugin",
    "reset",
    "selector_presets",
    "unregister_plugin",
]
