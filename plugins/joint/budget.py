"""Byte accounting of the ``joint`` plugin: the budget is the whole artifact file, not just the
weights of the selected layers (manifest, header, biases and unselected tensors included), as
the context measures it (``ctx.artifact_size``: the exact bytes the pipeline will write)."""

from __future__ import annotations

from torch import nn

from netshrink import CompressionContext, Encoding, model_tensors


def dense_bytes(model: nn.Module) -> int:
    """Dense size as the report counts it: floats at 4 bytes, integers at their own size."""
    total = 0
    for tensor in model_tensors(model).values():
        size = 4 if tensor.is_floating_point() else tensor.element_size()
        total += tensor.numel() * size
    return total


def fixed_bytes(
    model: nn.Module, ctx: CompressionContext, placeholders: dict[str, Encoding]
) -> int:
    """Artifact bytes that do not depend on the allocation: everything except the payload of
    the selected weights (``placeholders`` stand in for them, so their manifest records and
    the other tensors are counted as they will be)."""
    trial = ctx.encodings.copy()
    for name, enc in placeholders.items():
        trial.set(name, enc)
    size = ctx.artifact_size(model, trial)
    return size - sum(enc.payload_bytes for enc in placeholders.values())
