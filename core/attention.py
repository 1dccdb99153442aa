"""Multi-head attention for structured pruning: keep heads and head dims consistent.

A fused ``qkv`` Linear (timm's ``Attention``, Swin's ``WindowAttention``) writes its outputs as
``[3, num_heads, head_dim]``: pruning any of its rows on their own leaves a width the
``reshape(B, N, 3, num_heads, head_dim)`` in ``forward`` cannot take. Structured pruning
therefore works in the space of the attention output (``num_heads * head_dim``, the input of the
layer after the attention, ``proj``): Torch-Pruning maps one index there onto the same row of q,
k and v (its own pruners root attention groups the same way), and the module's ``num_heads`` /
``head_dim`` / ``attn_dim`` / ``scale`` are updated afterwards. These are plain ints and floats,
so an artifact stores them as ``set`` edits.

The public helpers, shared by every method that removes channels::

    attention = find_attention(model)              # id(qkv) -> AttentionHeads
    heads = attention[id(model.blocks[0].attn.qkv)]
    group = attention_group(dg, heads)             # dg: a Torch-Pruning DependencyGraph
    if group.reason is None:
        module, fn = group.root
        dg.get_pruning_group(module, fn, heads.dims([0, 5])).prune()  # dims 0, 5 of each head
        update_heads(heads, heads.num_heads)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["AttentionGroup", "AttentionHeads", "attention_group", "find_attention",
           "update_heads"]


@dataclass
class AttentionHeads:
    """A recognised multi-head attention module with a fused ``qkv`` Linear."""

    module: nn.Module
    """The attention module (holds ``num_heads`` and the ``qkv`` Linear)."""
    qkv: nn.Linear
    """Its fused projection: rows ``[0, D)`` are q, ``[D, 2D)`` k, ``[2D, 3D)`` v."""
    num_heads: int
    head_dim: int

    @property
    def dim(self) -> int:
        """Width of the attention output, ``num_heads * head_dim`` (``D``)."""
        return self.num_heads * self.head_dim

    def dims(self, positions: list[int], heads: list[int] | None = None) -> list[int]:
        """Attention-output indices (``h * head_dim + p``) of ``positions`` in every head, plus
        every position of the whole ``heads``; sorted, without repeats."""
        out = {h * self.head_dim + p for h in range(self.num_heads) for p in positions}
        out.update(h * self.head_dim + p for h in heads or () for p in range(self.head_dim))
        return sorted(out)


@dataclass
class AttentionGroup:
    """How an attention's head dims are pruned through a Torch-Pruning graph."""

    heads: AttentionHeads
    root: tuple[nn.Module, Callable[..., Any]] | None = None
    """The layer that reads the attention output (``proj``) and Torch-Pruning's function that
    prunes its inputs: a group rooted there removes the matching q, k and v rows."""
    reason: str | None = None
    """Why the head dims cannot be pruned (None: they can)."""


def find_attention(model: nn.Module) -> dict[int, AttentionHeads]:
    """Attention modules of ``model`` keyed by ``id`` of their ``qkv`` Linear: a child Linear
    named ``qkv`` with ``3 * num_heads * head_dim`` outputs and an int ``num_heads``."""
    found: dict[int, AttentionHeads] = {}
    for module in model.modules():
        qkv, heads = getattr(module, "qkv", None), getattr(module, "num_heads", None)
        if (not isinstance(qkv, nn.Linear) or not isinstance(heads, int)
                or isinstance(heads, bool) or heads < 1 or qkv.out_features % (3 * heads)):
            continue
        found[id(qkv)] = AttentionHeads(module, qkv, heads, qkv.out_features // (3 * heads))
    return found


def _unsupported(heads: AttentionHeads) -> str | None:
    """Why the head dims of ``heads`` cannot be pruned (from the module alone), or None."""
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


def attention_group(dg: Any, heads: AttentionHeads) -> AttentionGroup:
    """The Torch-Pruning group of ``heads``' dims in ``dg`` (a ``DependencyGraph`` built on the
    model), rooted at the input of the one layer that reads the attention output; each dim
    ``c`` must tie rows ``c``, ``D + c`` and ``2D + c`` of ``qkv`` (q, k and v) and no other
    layer with weights, else ``reason`` says what Torch-Pruning found instead."""
    qkv, dim = heads.qkv, heads.dim
    group = AttentionGroup(heads, reason=_unsupported(heads))
    fn = dg.get_pruner_of_module(qkv).prune_out_channels
    full = dg.get_pruning_group(qkv, fn, list(range(qkv.out_features)))
    consumers = [dep.target.module for dep, idxs in full
                 if dg.is_in_channel_pruning_fn(dep.handler)
                 and isinstance(dep.target.module, (nn.Linear, nn.Conv2d))
                 and len(idxs) == dim]
    if len(consumers) != 1:
        group.reason = group.reason or (
            f"the attention output (width {dim}) feeds {len(consumers)} layers, not one "
            "projection")
        return group
    proj = consumers[0]
    group.root = (proj, dg.get_pruner_of_module(proj).prune_in_channels)
    # One attention dim must map onto the same row of q, k and v and nothing else that has
    # weights: checked on dim 0 and the last dim.
    for c in (0, dim - 1):
        found = dg.get_pruning_group(proj, group.root[1], [c])
        rows = sorted(int(i) for dep, idxs in found if dep.target.module is qkv
                      and dg.is_out_channel_pruning_fn(dep.handler) for i in idxs)
        others = [m for m in (dep.target.module for dep, _ in found)
                  if isinstance(m, nn.Module) and m is not qkv and m is not proj
                  and any(True for _ in m.parameters(recurse=False))]
        if rows != [c, dim + c, 2 * dim + c] or others:
            group.reason = group.reason or (
                f"Torch-Pruning maps attention dim {c} onto qkv rows {rows[:6]}"
                + (f" and {type(others[0]).__name__}" if others else "")
                + f", not [{c}, {dim + c}, {2 * dim + c}]")
            break
    return group


def update_heads(heads: AttentionHeads, num_heads: int) -> None:
    """Set the attention's ``num_heads``, ``head_dim``, ``attn_dim`` and ``scale`` from its
    pruned ``qkv`` (those it has). A default ``scale`` (``head_dim ** -0.5``) follows the new
    head_dim: that is what ``scaled_dot_product_attention`` uses on the fused path, so both
    paths agree."""
    if num_heads < 1 or heads.qkv.out_features % (3 * num_heads):
        raise ValueError(f"update_heads: qkv has {heads.qkv.out_features} outputs, which "
                         f"{num_heads} heads cannot split into q, k and v evenly")
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
