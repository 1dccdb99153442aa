"""The per-layer options ``quantize`` offers to :func:`netshrink.search`: one per bit-width,
each with the exact bytes the compressor itself stores for the layer (measured by quantizing a
copy of the layer alone, so the count follows whatever scales the encoder keeps)."""

from __future__ import annotations

from torch import nn

import netshrink
from netshrink import Compressor

#: Bit-widths a search offers per layer.
SEARCH_BITS = (8, 4, 3, 2)


def layer_options(
    cls: type[Compressor], module: nn.Module, name: str
) -> list[netshrink.LayerOption]:
    """One option per bit-width of :data:`SEARCH_BITS` (``{"bits": b}``) with its exact
    stored bytes (codes, scales, and the bias as the config stores it)."""
    return [
        cls.option({"bits": bits}, bytes=netshrink.option_bytes(cls, module, {"bits": bits}))
        for bits in SEARCH_BITS
    ]
