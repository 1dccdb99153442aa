"""The per-layer options ``bioclust`` offers to :func:`netshrink.search`: plain k-means at a few
codebook sizes, each with the exact bytes the compressor itself stores for the layer.

An option is plain k-means (``noise_scale: 0``): no perturbation, so no population search and
no data, which keeps the search's sensitivity scan to one clustering per candidate, and the
stored bytes depend only on the weights. The bytes are measured by clustering a copy of the
layer alone with the compressor's own code: how many clusters survive k-means (a layer with
fewer distinct values than ``k`` keeps fewer, and so fewer index bits) is known only then.
"""

from __future__ import annotations

from typing import Any

from torch import nn

import netshrink
from netshrink import Compressor, Dense

#: Index bits a search offers per layer (k = 2, 4, 8, 16, 64 clusters). 1 bit goes below
#: quantize's narrowest option; 2-4 bits meet quantize's widths with k-means levels instead of
#: a uniform grid; 6 bits is a near-lossless point between quantize's 4 and 8. 8 bits is left
#: out: it stores as much as quantize's 8 bits and its 256-cluster k-means is the slowest.
SEARCH_BITS = (1, 2, 3, 4, 6)


def option_config(cls: type[Compressor], module: nn.Module, bits: int) -> dict[str, Any]:
    """The per-layer config of the option with ``bits`` index bits on ``module``.

    Plain k-means (``noise_scale: 0``). A weight larger than the default ``sample_size`` is
    fitted on all its values (``sample_size: None``): a sampled fit depends on the run's seed
    and step index, so the clusters that survive (and the bytes) could differ between the
    scan and the searched recipe."""
    config: dict[str, Any] = {"bits": bits, "noise_scale": 0.0}
    sample = cls.Config.model_fields["sample_size"].default
    if sample is not None and module.weight.numel() > sample:
        config["sample_size"] = None
    return config


def layer_options(
    cls: type[Compressor], module: nn.Module, name: str
) -> list[netshrink.LayerOption]:
    """One option per width of :data:`SEARCH_BITS` with its exact stored bytes (packed
    indices, fp32 centroids, the bias dense), MACs unchanged. An option that stores no fewer
    bytes than the dense layer, or as many as a narrower one (fewer distinct values than
    clusters), is left out."""
    dense = sum(Dense(p.detach()).payload_bytes for p in module.parameters(recurse=False))
    options: list[netshrink.LayerOption] = []
    for bits in SEARCH_BITS:
        config = option_config(cls, module, bits)
        stored = netshrink.option_bytes(cls, module, config)
        if stored >= dense or (options and stored == options[-1].bytes):
            continue
        options.append(cls.option(config, bytes=stored))
    return options
