"""Torch-Pruning glue: build the dependency graph and describe the group a layer belongs to."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from netshrink import AttentionHeads, NetshrinkError, attention_group
from netshrink.plugins.statprune.guard import describe_module, failing_module


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def build_graph(model: nn.Module, example: torch.Tensor):
    """A Torch-Pruning DependencyGraph of ``model`` traced on ``example`` (in eval mode, so
    BatchNorm accepts a single example; the training flag is restored)."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TP warns about every unwrapped parameter it finds
            return tp.DependencyGraph().build_dependency(model, example_inputs=example,
                                                         verbose=False)
    except TimeoutError:
        raise
    except Exception as exc:  # any tracing failure becomes one clear error
        where = failing_module(model, example)
        at = (f" in module {describe_module(model, where[0])}" if where
              else " (the model runs; the op is one Torch-Pruning does not handle)")
        raise NetshrinkError(
            f"Torch-Pruning could not trace {type(model).__name__} to find channel dependencies"
            f"{at}: {type(exc).__name__}: {_first_line(exc)}; statprune needs a traceable model"
        ) from exc
    finally:
        model.train(was_training)


def is_depthwise(module: nn.Module) -> bool:
    """A conv with one input channel per group (its outputs follow its inputs)."""
    groups = getattr(module, "groups", 1)
    return groups > 1 and groups == getattr(module, "in_channels", -1)


@dataclass
class GroupInfo:
    """What pruning one layer's output channels drags along."""

    channels: int
    """Output channels of the root layer."""
    weighted: list[tuple[nn.Module, list[int]]] = field(default_factory=list)
    """Conv/Linear layers whose *outputs* are pruned with the root (root first), with the
    indices that correspond to the root's channels ``0..C-1``."""
    channel_groups: int = 1
    """Grouped (non-depthwise) convs in the group need the same channels removed in every group."""
    touches: list[nn.Module] = field(default_factory=list)
    """Every module the group changes."""
    irregular: str | None = None
    """Why the channel mapping is not one-to-one (a split, slice or partial add), if it isn't."""
    heads: AttentionHeads | None = None
    """The attention whose ``qkv`` is the root: channels are then the attention dims
    (``num_heads * head_dim``), index ``h * head_dim + d`` being dim ``d`` of head ``h``."""
    root: tuple[nn.Module, object] | None = None
    """Module and Torch-Pruning function a pruning group is rooted at, if not the root layer's
    own outputs (for attention: the input of the layer after it)."""


def describe_group(dg, module: nn.Module,
                   attention: dict[int, AttentionHeads] | None = None) -> GroupInfo:
    """The coupling of ``module``'s output channels, discovered from a group over all channels;
    a ``qkv`` in ``attention`` is described in the space of its heads (:func:`_attention`)."""
    if attention and id(module) in attention:
        return _attention(dg, attention[id(module)])
    channels = int(dg.get_out_channels(module))
    fn = dg.get_pruner_of_module(module).prune_out_channels
    group = dg.get_pruning_group(module, fn, list(range(channels)))
    info = GroupInfo(channels)
    seen: set[int] = set()
    for dep, idxs in group:
        target = dep.target.module
        info.touches.append(target)
        if _is_unbind(dep.target) and not info.irregular:
            # a fused q/k/v split into heads in a module not recognised as attention
            info.irregular = ("its outputs are split by torch.unbind (fused attention heads?) "
                              "in a module netshrink does not recognise as attention (a 'qkv' "
                              "Linear beside an int 'num_heads')")
        groups = getattr(target, "groups", 1)
        if isinstance(target, nn.Conv2d) and groups > 1 and not is_depthwise(target):
            info.channel_groups = math.lcm(info.channel_groups, int(groups))
        if (dg.is_out_channel_pruning_fn(dep.handler) and isinstance(target, (nn.Conv2d, nn.Linear))
                and id(target) not in seen):
            seen.add(id(target))
            idxs = [int(i) for i in idxs]
            size = int(dg.get_out_channels(target))
            if len(idxs) != channels or max(idxs, default=0) >= size:
                # e.g. a split/slice or an add over part of the channels (rexnet, CSP blocks)
                info.irregular = info.irregular or (
                    f"its channels map onto {len(idxs)} of {size} channels of another layer "
                    "(split, slice or partial add)")
                continue
            info.weighted.append((target, idxs))
    if info.channel_groups > 1 and channels % info.channel_groups:
        raise NetshrinkError(
            f"{channels} channels cannot be split into {info.channel_groups} conv groups"
        )
    return info


def _is_unbind(node) -> bool:
    import torch_pruning as tp

    return getattr(node, "type", None) == tp.ops.OPTYPE.UNBIND


def _attention(dg, heads: AttentionHeads) -> GroupInfo:
    """The group of an attention's head dims, rooted at the input of the layer that consumes
    the attention output (``proj``; :func:`netshrink.attention_group`); each dim ties rows
    ``c``, ``D + c`` and ``2D + c`` of ``qkv`` (q, k and v)."""
    qkv, dim = heads.qkv, heads.dim
    group = attention_group(dg, heads)
    info = GroupInfo(dim, heads=heads, channel_groups=heads.num_heads, root=group.root,
                     irregular=group.reason)
    info.weighted = [(qkv, list(range(k * dim, (k + 1) * dim))) for k in range(3)]
    return info
