"""Physical removal of dead FC neurons and conv filters (Torch-Pruning's dependency graph does the
surgery), and kernel-granular sparse storage of the remaining conv weights.

A fused ``qkv`` Linear of multi-head attention (timm ViT/DeiT) is cut in the space of its heads
(:func:`netshrink.attention_group`): a head dim goes when its q, k and v rows are dead in every
head, a whole head when all its rows are dead, so the heads stay equal and the function stays
the same (dead q and k rows add one constant to every attention logit, dead v rows a constant
output that is folded into the projection's bias; q is rescaled for the new ``head_dim``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from netshrink import (
    AttentionHeads,
    CompressionContext,
    Deadline,
    Dense,
    SelectionError,
    Sparse,
    attention_group,
    deadline,
    find_attention,
    prune_or_put_back,
    update_heads,
    why_broken,
)

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def zero_units(weight: torch.Tensor) -> torch.Tensor:
    """Output units (rows / filters) whose weights are all exactly zero."""
    return weight.detach().reshape(weight.shape[0], -1).abs().sum(dim=1) == 0


def _coupled_ok(
    group, root: nn.Module, targets: dict[int, nn.Module], head: nn.Module | None
) -> bool:
    """True if every *other* layer whose outputs this group removes is a selected layer whose
    matching units are dead too (residual adds couple channels), and the head is not among them."""
    for item in group:
        dep, idxs = item.dep, item.idxs
        module = dep.target.module
        if (
            not isinstance(module, _PRUNABLE)
            or getattr(dep.handler, "__name__", "") != "prune_out_channels"
        ):
            continue
        if module is head:
            return False
        if module is root:
            continue
        if id(module) not in targets:
            return False
        dead = zero_units(module.weight)
        if any(int(i) >= dead.numel() for i in idxs):
            return False  # the channels map onto part of another layer (a split, a CSP block)
        if not all(bool(dead[int(i)]) for i in idxs):
            return False
    return True


def check_traceable(model: nn.Module, ctx: CompressionContext, seconds: float) -> None:
    """Refuse, before any training, a model Torch-Pruning cannot trace, or cannot trace within
    ``seconds``: the physical removal after training would fail there (e.g. GPT-2's
    concatenations) or take as long. Raises :class:`SelectionError` naming the error; ``model``
    keeps its mode."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    try:
        with deadline(seconds, "Torch-Pruning traced the model"):
            tp.DependencyGraph().build_dependency(
                model, example_inputs=ctx.example_input(), verbose=False)
    except TimeoutError as exc:
        raise SelectionError(
            f"normsparse refused before training: {exc}; raise 'time_limit', or select layers "
            "of a smaller model, or use an unstructured method (magnitude, sigmaprune)") from None
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise SelectionError(
            f"normsparse refused before training: Torch-Pruning cannot trace this model to "
            f"remove dead units ({type(exc).__name__}: {first}); select layers of a traceable "
            "model, or use an unstructured method (magnitude, sigmaprune)") from None
    finally:
        model.train(was_training)


def remove_dead_units(
    model: nn.Module,
    ctx: CompressionContext,
    layers: list[tuple[str, nn.Module]],
    head: nn.Module | None,
    min_keep: int,
    remove_filters: bool,
    skipped: dict[str, str] | None = None,
    seconds: float = 600.0,
) -> dict[str, int]:
    """Physically remove every all-zero neuron (Linear) or filter (conv) of ``layers`` whose
    removal does not touch the head's outputs or unselected layers; returns removed counts
    (rows of a ``qkv``). Why a layer kept its dead units, when that is not the plain rules
    above (an attention netshrink cannot cut), goes into ``skipped`` by layer name.

    Layers are visited in model order, so a filter that lost all its inputs upstream goes too.
    Torch-Pruning gets ``seconds`` in all (it can walk some graphs for minutes, e.g.
    efficientvit_m0's): when they run out, the layer being grouped and every later one keep
    their dead units as zeros, saying so in ``skipped``; a removal under way always finishes.
    """
    model.eval()
    skipped = {} if skipped is None else skipped
    removed: dict[str, int] = {}
    try:
        with deadline(seconds, "Torch-Pruning traced the model") as limit:
            _remove(model, ctx, layers, head, min_keep, remove_filters, skipped, removed, limit)
    except TimeoutError as exc:
        for name, _ in layers:
            if name not in removed:
                removed[name] = 0
                skipped[name] = (f"{exc}; its dead units are kept as zeros (raise 'time_limit' "
                                 "to remove them)")
    return removed


def _remove(model: nn.Module, ctx: CompressionContext, layers: list[tuple[str, nn.Module]],
            head: nn.Module | None, min_keep: int, remove_filters: bool, skipped: dict[str, str],
            removed: dict[str, int], limit: Deadline) -> None:
    """:func:`remove_dead_units`' work under ``limit``: Torch-Pruning's graph walks may be
    interrupted, changes to the model are not (:meth:`Deadline.paused`)."""
    import torch_pruning as tp  # imported here: it pulls in timm (seconds) at load time

    dg = tp.DependencyGraph().build_dependency(
        model, example_inputs=ctx.example_input(), verbose=False
    )
    attention = find_attention(model)
    targets = {id(m): m for _, m in layers}
    for name, module in layers:
        limit.doing = f"Torch-Pruning grouped the channels of {name}"
        is_linear = isinstance(module, nn.Linear)
        if module is head or (not is_linear and not remove_filters):
            removed[name] = 0
            continue
        if id(module) in attention:
            removed[name] = _remove_dead_head_dims(
                model, dg, attention[id(module)], ctx, min_keep, name, skipped, limit)
            continue
        fn = tp.prune_linear_out_channels if is_linear else tp.prune_conv_out_channels
        dead = zero_units(module.weight)
        # Never empty a layer: the surviving units are the live ones plus, if too few, some
        # dead ones (kept as zeros).
        budget = int(module.weight.shape[0]) - min_keep
        candidates = torch.nonzero(dead).reshape(-1).tolist()[: max(budget, 0)]
        if candidates and _splits_heads(dg.get_pruning_group(module, fn, candidates[:1])):
            # fused q/k/v in a module not recognised as attention: rows cannot go one by one
            skipped[name] = (
                "its outputs are split into heads by torch.unbind in a module netshrink does not "
                "recognise as attention (a 'qkv' Linear beside an int 'num_heads'); dead units "
                "kept as zeros")
            removed[name] = 0
            continue
        eligible = [
            i
            for i in candidates
            if _coupled_ok(dg.get_pruning_group(module, fn, [i]), module, targets, head)
        ]
        if eligible:
            group = dg.get_pruning_group(module, fn, eligible)
            if not dg.check_pruning_group(group):
                eligible = []
            else:
                with limit.paused():
                    broken = prune_or_put_back(
                        group, lambda: why_broken(model, ctx.example_input(1), "removing them"),
                        before=lambda g=group: _fold_constant_inputs(
                            model, g, ctx.example_input(batch=16)))
                    if broken is not None:
                        skipped[name] = f"{broken}; its dead units were put back, kept as zeros"
                        eligible = []
                    removed[name] = len(eligible)  # recorded before a pending alarm is raised
                continue
        removed[name] = len(eligible)


def _splits_heads(group) -> bool:
    """Whether Torch-Pruning's ``group`` passes through a ``torch.unbind`` (fused heads)."""
    import torch_pruning as tp

    return any(getattr(item.dep.target, "type", None) == tp.ops.OPTYPE.UNBIND for item in group)


def _remove_dead_head_dims(
    model: nn.Module,
    dg,
    heads: AttentionHeads,
    ctx: CompressionContext,
    min_keep: int,
    name: str,
    skipped: dict[str, str],
    limit: Deadline,
) -> int:
    """Remove the dead whole heads and the head dims dead in every other head of an attention's
    ``qkv`` (q, k and v rows all zero), keeping at least one head, one dim and ``min_keep``
    rows; returns the qkv rows removed."""
    group = attention_group(dg, heads)
    if group.reason is not None or group.root is None:
        if bool(zero_units(heads.qkv.weight).any()):
            skipped[name] = f"attention head dims cannot be removed: {group.reason}; dead " \
                            "units kept as zeros"
        return 0
    count, width = heads.num_heads, heads.head_dim
    dead = zero_units(heads.qkv.weight).reshape(3, count, width).all(0)  # (heads, head dims)
    gone = [h for h in range(count) if bool(dead[h].all())]
    if len(gone) == count:
        gone.pop()  # keep one head (dead: its constant output is the same either way)
    kept = [h for h in range(count) if h not in gone]
    old_default = width ** -0.5
    scale = getattr(heads.module, "scale", old_default)
    positions = [p for p in range(width) if bool(dead[kept, p].all())]
    if positions and (not isinstance(scale, float) or abs(scale - old_default) > 1e-9):
        # the fused path always scales by head_dim ** -0.5: q can follow only that scale
        skipped[name] = f"its attention scale {scale} is not head_dim ** -0.5; only whole " \
                        "dead heads are removed"
        positions = []
    positions = positions[: width - 1]  # keep one dim
    while positions and 3 * len(kept) * (width - len(positions)) < min_keep:
        positions.pop()
    while gone and 3 * (count - len(gone)) * (width - len(positions)) < min_keep:
        gone.pop()
    idxs = heads.dims(positions, gone)
    if not idxs:
        return 0
    module, fn = group.root
    pruning = dg.get_pruning_group(module, fn, idxs)
    if not dg.check_pruning_group(pruning):
        return 0
    rows = heads.qkv.out_features
    with limit.paused():
        _fold_constant_inputs(model, pruning, ctx.example_input(batch=16))
        pruning.prune()
        update_heads(heads, count - len(gone))
        if heads.head_dim != width:
            # logits were scaled by width ** -0.5 and are now by head_dim ** -0.5: rescale q
            factor = math.sqrt(heads.head_dim / width)
            with torch.no_grad():
                heads.qkv.weight[: heads.dim].mul_(factor)
                if heads.qkv.bias is not None:
                    heads.qkv.bias[: heads.dim].mul_(factor)
        return rows - heads.qkv.out_features


def _fold_constant_inputs(model: nn.Module, group, x: torch.Tensor) -> None:
    """A dead unit still outputs a constant (its bias through the activation, BatchNorm...);
    add that constant's contribution to the bias of every layer that reads it, so removing the
    unit does not change the function (exact for Linear readers and unpadded convs)."""
    readers = {}
    for item in group:
        module = item.dep.target.module
        if (
            isinstance(module, _PRUNABLE)
            and getattr(module, "bias", None) is not None
            and getattr(item.dep.handler, "__name__", "") == "prune_in_channels"
        ):
            readers[id(module)] = (module, [int(i) for i in item.idxs])
    if not readers:
        return
    inputs: dict[int, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(id(mod), args[0].detach()))
        for m, _ in readers.values()
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        for key, (module, idxs) in readers.items():
            inp = inputs.get(key)
            if inp is None:
                continue
            if isinstance(module, nn.Linear):
                values = inp.reshape(-1, inp.shape[-1])[:, idxs]
                weight = module.weight[:, idxs]
            elif all(p == 0 for p in _padding(module)) and module.groups == 1:
                values = inp.transpose(0, 1).reshape(inp.shape[1], -1)[idxs].T
                weight = (
                    module.weight[:, idxs].reshape(module.weight.shape[0], len(idxs), -1).sum(-1)
                )
            else:
                continue
            const = values[0]
            # Only inputs that really are constant over the batch (and space) are folded.
            steady = (values - const).abs().amax(dim=0) <= 1e-6 * (1 + const.abs())
            module.bias.add_(weight[:, steady] @ const[steady])


def _padding(module: nn.Module) -> tuple[int, ...]:
    padding = module.padding
    if isinstance(padding, str):
        return (0,) if padding == "valid" else (1,)
    return tuple(padding)


def encode_kernel_sparse(
    model: nn.Module, ctx: CompressionContext, name: str, module: nn.Module
) -> tuple[int, int]:
    """Store a conv weight sparse at kernel-slice granularity (a removed (out, in) slice costs
    only its index bits); returns (live slices, total slices)."""
    weight = module.weight.detach()
    slices = weight.reshape(weight.shape[0], weight.shape[1], -1)
    alive = slices.abs().sum(dim=-1) > 0
    mask = alive.reshape(*alive.shape, *([1] * (weight.dim() - 2))).expand_as(weight)
    if isinstance(ctx.encoding_of(f"{name}.weight"), Sparse):
        mask = mask & (weight != 0)  # keep an earlier step's finer zeros out of storage too
    if bool(alive.all()) and not isinstance(ctx.encoding_of(f"{name}.weight"), Sparse):
        return int(alive.sum()), alive.numel()  # nothing removed: dense is smaller
    storage = ctx.encoding_of(f"{name}.weight")
    dtype = (
        storage.values.data.dtype
        if isinstance(storage, Sparse) and isinstance(storage.values, Dense)
        else None
    )
    ctx.encode(
        model,
        f"{name}.weight",
        Sparse.from_dense(
            weight, mask=mask, value_encoder=lambda v, p, s: Dense(v, storage_dtype=dtype)
        ),
    )
    return int(alive.sum()), alive.numel()
