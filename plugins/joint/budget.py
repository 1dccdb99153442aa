"""Byte accounting of the ``joint`` plugin: the budget is the whole artifact file, not just the
weights of the selected layers (manifest, header, biases and unselected tensors included)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from netshrink.encodings import Encoding, EncodingTable, model_tensors

log = logging.getLogger("netshrink")

#: Bytes kept for what the report adds to the manifest (recipe and accuracy summary), which the
#: step cannot see; measured at 150-250 bytes (zlib-compressed) for the shipped recipes.
REPORT_EXTRA_BYTES = 320


def dense_bytes(model: nn.Module) -> int:
    """Dense size as the report counts it: floats at 4 bytes, integers at their own size."""
    total = 0
    for tensor in model_tensors(model).values():
        size = 4 if tensor.is_floating_point() else tensor.element_size()
        total += tensor.numel() * size
    return total


def artifact_size(model: nn.Module, table: EncodingTable, info) -> int:
    """Bytes of the artifact ``model`` + ``table`` would be, plus :data:`REPORT_EXTRA_BYTES`.

    Falls back to payload bytes + 64 bytes per tensor if the artifact cannot be built here
    (e.g. a model the artifact format cannot describe yet)."""
    from netshrink.artifact import artifact_bytes

    try:
        return len(artifact_bytes(model, table, info)) + REPORT_EXTRA_BYTES
    except Exception as exc:  # an estimate is still useful; the pipeline reports the truth
        log.debug("joint: artifact size estimate failed (%s); using payload + 64 B/tensor", exc)
        complete = table.complete(model)
        return sum(e.payload_bytes + 64 for e in complete.values()) + REPORT_EXTRA_BYTES


def fixed_bytes(
    model: nn.Module, table: EncodingTable, info, placeholders: dict[str, Encoding]
) -> int:
    """Artifact bytes that do not depend on the allocation: everything except the payload of
    the selected weights (``placeholders`` stand in for them, so their manifest records and
    the other tensors are counted as they will be)."""
    trial = table.copy()
    for name, enc in placeholders.items():
        trial.set(name, enc)
    with torch.no_grad():
        size = artifact_size(model, trial, info)
    return size - sum(enc.payload_bytes for enc in placeholders.values())
