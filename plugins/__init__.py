"""netshrink's built-in plugins: each sub-package registers through the same hooks as a
third-party plugin (see :data:`netshrink.registry.DEFAULT_PLUGINS`)."""
