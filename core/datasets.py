"""Datasets by name or spec, through the registry: ``netshrink.datasets.load("digits28")``,
``load("shapes32")``, ``load("imagefolder:/data/pets?size=64")``."""

from __future__ import annotations

from typing import Any

from netshrink.adapters import parse_spec
from netshrink.data import ArrayDataset, DataSplits, Split
from netshrink.registry import datasets as _registered
from netshrink.registry.manager import resolve_dataset

__all__ = ["ArrayDataset", "DataSplits", "Split", "available", "load"]


def load(name: str | DataSplits, **kwargs: Any) -> DataSplits:
    """Load a dataset by registered name (``digits``, ``digits28``, ``shapes32``, ...) or by
    spec ``prefix:TARGET?key=value&...`` for a prefix a plugin registered (``imagefolder:``,
    ``torchvision:``, ``npz:``, ``safetensors:``). Query values are JSON-decoded where they
    parse (``size=32`` is an int) and passed to the loader as keyword arguments, after the
    target; ``kwargs`` override them."""
    if isinstance(name, DataSplits):
        return name
    loader, target = resolve_dataset(name)
    if target is None:
        return loader(**kwargs)
    _, target, options = parse_spec(name)
    return loader(target, **{**options, **kwargs})


def available() -> dict[str, str]:
    """Registered dataset names (a trailing ``:`` marks a spec prefix) with their descriptions."""
    return {name: e.description for name, e in _registered().items()}
