"""Datasets by name, through the registry: ``netshrink.datasets.load("digits28")``."""

from __future__ import annotations

from typing import Any

from netshrink.data import DataSplits, Split
from netshrink.registry import datasets as _registered
from netshrink.registry import get_dataset

__all__ = ["DataSplits", "Split", "available", "load"]


def load(name: str | DataSplits, **kwargs: Any) -> DataSplits:
    """Load a registered dataset by name (``digits``, ``digits28``, ``digits32``, ...)."""
    if isinstance(name, DataSplits):
        return name
    return get_dataset(name)(**kwargs)


def available() -> dict[str, str]:
    """Registered dataset names with their descriptions."""
    return {name: e.description for name, e in _registered().items()}
