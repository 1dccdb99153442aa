"""Multi-head attention in a Torch-Pruning group: keep heads and head dims consistent.

A fused ``qkv`` Linear (timm's ``Attention``, Swin's ``WindowAttention``) writes its outputs as
``[3, num_heads, head_dim]``: pruning any of its rows on their own leaves a width the
``reshape(B, N, 3, num_heads, head_dim)`` in ``forward`` cannot take. Pruning therefore works in
the space of the attention output (``num_heads * head_dim``, the input of the layer after the
attention, ``proj``): Torch-Pruning maps one index there onto the same row of q, k and v (its
own pruners root attention groups the same way), and the module's ``num_heads`` / ``head_dim`` /
``attn_dim`` / ``scale`` are updated afterwards. These are plain ints and floats, so an artifact
stores them as ``set`` edits.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["Heads", "find_attention", "unsupported", "update_heads"]


@dataclass
class Heads:
    """A recognised multi-head attention module."""

    module: nn.Module
    """The attention module (holds ``num_heads`` and the ``qkv`` Linear)."""
    qkv: nn.Linear
    num_heads: int
    head_dim: int


def find_attention(model: nn.Module) -> dict[int, Heads]:
    """Attention modules of ``model`` keyed by ``id`` of their ``qkv`` Linear: a child Linear
    named ``qkv`` with ``3 * num_heads * head_dim`` outputs and an int ``num_heads``."""
    found: dict[int, Heads] = {}
    for module in model.modules():
        qkv, heads = getattr(module, "qkv", None), getattr(module, "num_heads", None)
        if (not isinstance(qkv, nn.Linear) or not isinstance(heads, int)
                or isinstance(heads, bool) or heads < 1 or qkv.out_features % (3 * heads)):
            continue
        found[id(qkv)] = Heads(module, qkv, heads, qkv.out_features // (3 * heads))
    return found


def unsupported(heads: Heads) -> str | None:
    """Why the head dims of ``heads`` cannot be pruned here, or None."""
    module = heads.module
    for name in ("q_norm", "k_norm", "norm"):
        # a norm over head_dim (qk-norm) or over the attention output would need its own
        # entries removed; Torch-Pruning does not map the indices onto it
        if not isinstance(getattr(module, name, None), (nn.Identity, type(None))):
            return f"its attention has a {name} ({type(getattr(module, name)).__name__}) " \
                   "over the head dims, which Torch-Pruning does not prune with them"
    if getattr(module, "gate", None) is not None:
        return "its attention is gated (a second projection over the head dims)"
    head_dim = getattr(module, "head_dim", heads.head_dim)
    if head_dim != heads.head_dim:
        return (f"qkv has {heads.qkv.out_features} outputs but the attention's head_dim is "
                f"{head_dim} with {heads.num_heads} heads")
    return None


def update_heads(heads: Heads, num_heads: int) -> None:
    """Set the attention's ``num_heads``, ``head_dim``, ``attn_dim`` and ``scale`` from its
    pruned ``qkv`` (those it has). A default ``scale`` (``head_dim ** -0.5``) follows the new
    head_dim: that is what ``scaled_dot_product_attention`` uses on the fused path, so both
    paths agree."""
    module = heads.module
    old_default = heads.head_dim ** -0.5
    attn_dim = heads.qkv.out_features // 3
    head_dim = attn_dim // num_heads
    module.num_heads = num_heads
    for name, value in (("head_dim", head_dim), ("attn_dim", attn_dim)):
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, value)
    scale = getattr(module, "scale", None)
    if isinstance(scale, float) and abs(scale - old_default) <= 1e-12 * old_default:
        module.scale = head_dim ** -0.5
    heads.num_heads, heads.head_dim = num_heads, head_dim
