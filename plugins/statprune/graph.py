"""Torch-Pruning glue: build the dependency graph and describe the group a layer belongs to."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from netshrink import NetshrinkError
from netshrink.plugins.statprune.attention import Heads, unsupported
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
    heads: Heads | None = None
    """The attention whose ``qkv`` is the root: channels are then the attention dims
    (``num_heads * head_dim``), index ``h * head_dim + d`` being dim ``d`` of head ``h``."""
    root: tuple[nn.Module, object] | None = None
    """Module and Torch-Pruning function a pruning group is rooted at, if not the root layer's
    own outputs (for attention: the input of the layer after it)."""


def describe_group(dg, module: nn.Module, attention: dict[int, Heads] | None = None) -> GroupInfo:
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


def _attention(dg, heads: Heads) -> GroupInfo:
    """The group of an attention's head dims, rooted at the input of the layer that consumes
    the attention output (``proj``); each dim ties rows ``c``, ``D + c`` and ``2D + c`` of
    ``qkv`` (q, k and v). Anything else Torch-Pruning finds there makes the group irregular."""
    qkv = heads.qkv
    dim = qkv.out_features // 3
    info = GroupInfo(dim, heads=heads, channel_groups=heads.num_heads)
    info.weighted = [(qkv, list(range(k * dim, (k + 1) * dim))) for k in range(3)]
    info.irregular = unsupported(heads)
    fn = dg.get_pruner_of_module(qkv).prune_out_channels
    full = dg.get_pruning_group(qkv, fn, list(range(qkv.out_features)))
    consumers = [dep.target.module for dep, idxs in full
                 if dg.is_in_channel_pruning_fn(dep.handler)
                 and isinstance(dep.target.module, (nn.Linear, nn.Conv2d))
                 and len(idxs) == dim]
    if len(consumers) != 1:
        info.irregular = info.irregular or (
            f"the attention output (width {dim}) feeds {len(consumers)} layers, not one "
            "projection")
        return info
    proj = consumers[0]
    info.root = (proj, dg.get_pruner_of_module(proj).prune_in_channels)
    info.touches = [dep.target.module for dep, _ in full]
    # One attention dim must map onto the same row of q, k and v and nothing else that has
    # weights: checked on dim 0 and the last dim.
    for c in (0, dim - 1):
        group = dg.get_pruning_group(proj, info.root[1], [c])
        rows = sorted(int(i) for dep, idxs in group if dep.target.module is qkv
                      and dg.is_out_channel_pruning_fn(dep.handler) for i in idxs)
        others = [m for m in (dep.target.module for dep, _ in group)
                  if isinstance(m, nn.Module) and m is not qkv and m is not proj
                  and any(True for _ in m.parameters(recurse=False))]
        if rows != [c, dim + c, 2 * dim + c] or others:
            info.irregular = info.irregular or (
                f"Torch-Pruning maps attention dim {c} onto qkv rows {rows[:6]}"
                + (f" and {type(others[0]).__name__}" if others else "")
                + f", not [{c}, {dim + c}, {2 * dim + c}]")
            break
    return info
