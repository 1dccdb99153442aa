"""Physical removal of dead FC neurons and conv filters (Torch-Pruning's dependency graph does the
surgery), and kernel-granular sparse storage of the remaining conv weights."""

from __future__ import annotations

import torch
from torch import nn

from netshrink import CompressionContext, Dense, SelectionError, Sparse

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
        if not all(bool(dead[int(i)]) for i in idxs):
            return False
    return True


def check_traceable(model: nn.Module, ctx: CompressionContext) -> None:
    """Refuse, before any training, a model Torch-Pruning cannot trace: the physical removal
    after training would fail there (e.g. GPT-2's concatenations). Raises
    :class:`SelectionError` naming the error; ``model`` keeps its mode."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    try:
        tp.DependencyGraph().build_dependency(
            model, example_inputs=ctx.example_input(), verbose=False)
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
) -> dict[str, int]:
    """Physically remove every all-zero neuron (Linear) or filter (conv) of ``layers`` whose
    removal does not touch the head's outputs or unselected layers; returns removed counts.

    Layers are visited in model order, so a filter that lost all its inputs upstream goes too.
    """
    model.eval()
    import torch_pruning as tp  # imported here: it pulls in timm (seconds) at load time

    dg = tp.DependencyGraph().build_dependency(
        model, example_inputs=ctx.example_input(), verbose=False
    )
    targets = {id(m): m for _, m in layers}
    removed: dict[str, int] = {}
    for name, module in layers:
        is_linear = isinstance(module, nn.Linear)
        if module is head or (not is_linear and not remove_filters):
            removed[name] = 0
            continue
        fn = tp.prune_linear_out_channels if is_linear else tp.prune_conv_out_channels
        dead = zero_units(module.weight)
        # Never empty a layer: the surviving units are the live ones plus, if too few, some
        # dead ones (kept as zeros).
        budget = int(module.weight.shape[0]) - min_keep
        candidates = torch.nonzero(dead).reshape(-1).tolist()[: max(budget, 0)]
        eligible = [
            i
            for i in candidates
            if _coupled_ok(dg.get_pruning_group(module, fn, [i]), module, targets, head)
        ]
        if eligible:
            group = dg.get_pruning_group(module, fn, eligible)
            if dg.check_pruning_group(group):
                _fold_constant_inputs(model, group, ctx.example_input(batch=16))
                group.prune()
            else:
                eligible = []
        removed[name] = len(eligible)
    return removed


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
