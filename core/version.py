"""The installed netshrink version (one place, importable from any layer)."""

__version__ = "0.1.0"
