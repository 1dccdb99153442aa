"""The per-layer options ``quantize`` offers to :func:`netshrink.search`: one per bit-width,
each with the exact bytes the compressor itself stores for the layer (measured by quantizing a
copy of the layer alone, so the count follows whatever scales the encoder keeps)."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

import netshrink
from netshrink import CompressionContext, Compressor

#: Bit-widths a search offers per layer.
SEARCH_BITS = (8, 4, 3, 2)


def stored_bytes(cls: type[Compressor], module: nn.Module, config: dict[str, Any]) -> int:
    """Exact stored bytes of ``module``'s tensors after ``cls`` compresses a copy of it alone
    with ``config`` (no data needed: quantization reads only the weights)."""
    holder = nn.Module()
    holder.add_module("layer", copy.deepcopy(module))
    ctx = CompressionContext()
    out = cls(config).compress(holder, [("layer", holder.layer)], ctx)
    return sum(enc.payload_bytes for enc in ctx.encodings.complete(out.model).values())


def layer_options(
    cls: type[Compressor], module: nn.Module, name: str
) -> list[netshrink.LayerOption]:
    """One option per bit-width of :data:`SEARCH_BITS` (``{"bits": b}``) with its exact
    stored bytes (codes, scales, and the bias as the config stores it)."""
    return [
        cls.option({"bits": bits}, bytes=stored_bytes(cls, module, {"bits": bits}))
        for bits in SEARCH_BITS
    ]
