"""The pruning environment the agent walks through: one step per selected layer.

It describes each layer (the state vector), keeps the episode inside the global budget
(AMC-style action clipping, so the target sparsity is met whatever the agent proposes), prunes a
model with an episode's ratios and scores it on a fixed validation subset (the reward).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from netshrink import (
    AttentionHeads,
    NetshrinkError,
    SelectionError,
    attention_group,
    find_attention,
    prune_or_put_back,
    update_heads,
    why_broken,
)

STATIC_FEATURES = ("index", "type", "in_channels", "out_channels", "kernel", "stride", "params",
                   "macs")
DYNAMIC_FEATURES = ("pruned_so_far", "params_after", "budget_left", "previous_action")
STATE_DIM = len(STATIC_FEATURES) + len(DYNAMIC_FEATURES)


@dataclass
class LayerInfo:
    """What the environment knows about one selected layer."""

    name: str
    module: nn.Module
    params: int
    """Elements of the weight tensor (what its ratio applies to)."""
    macs: int
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    is_linear: bool
    source: int | None = None
    """Channel mode: index of the selected layer whose output channels feed this layer's input."""
    coupled: int | None = None
    """Channel mode: index of the first selected layer whose output channels are pruned together
    with this layer's (a residual add, summed branches); None when they are its own."""


def describe_layers(model: nn.Module, layers: list[tuple[str, nn.Module]],
                    example: torch.Tensor) -> list[LayerInfo]:
    """Layer descriptors, with MACs measured from one forward pass on ``example``."""
    sizes: dict[str, int] = {}
    hooks = []
    for name, module in layers:
        def hook(mod: nn.Module, _inp: object, out: torch.Tensor, name: str = name) -> None:
            # Spatial positions per sample: every output position costs one kernel of MACs.
            sizes[name] = int(out[0, 0].numel()) if out.dim() > 2 else 1
        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    infos = []
    for name, module in layers:
        weight = module.weight
        is_linear = isinstance(module, nn.Linear)
        kernel = 1 if is_linear else int(module.kernel_size[0])
        stride = 1 if is_linear else int(module.stride[0])
        in_ch = int(module.in_features if is_linear else module.in_channels)
        out_ch = int(module.out_features if is_linear else module.out_channels)
        infos.append(LayerInfo(name, module, weight.numel(), weight.numel() * sizes.get(name, 1),
                               in_ch, out_ch, kernel, stride, is_linear))
    return infos


def static_features(infos: list[LayerInfo]) -> torch.Tensor:
    """``(layers, 8)`` min-max normalised descriptors (AMC normalises each column to [0, 1])."""
    rows = [[i, float(li.is_linear), li.in_channels, li.out_channels, li.kernel, li.stride,
             li.params, li.macs] for i, li in enumerate(infos)]
    table = torch.tensor(rows, dtype=torch.float32)
    low, high = table.min(0).values, table.max(0).values
    span = torch.where(high > low, high - low, torch.ones_like(high))
    return (table - low) / span


class BudgetModel:
    """How many of the selected weights an episode's ratios remove, and the per-layer bounds
    that keep the episode able to hit the global target exactly (AMC's "action wall").

    Weight granularity: layer ``t`` loses ``ratio_t * params_t``. Channel granularity: removing a
    fraction of a layer's output channels also removes the matching input channels of the
    layer it feeds, so its cost is ``params_t * (1 - keep_out_t * keep_in_t)``; layers whose
    outputs prune together (``LayerInfo.coupled``) all keep ``1 -`` the largest of their ratios.
    """

    def __init__(self, infos: list[LayerInfo], target: float, low: float, high: float,
                 channel: bool) -> None:
        self.params = [li.params for li in infos]
        self.sources = [li.source if channel else None for li in infos]
        # Layers whose outputs prune together take the largest of their ratios (each prunes its
        # group down to its own ratio; a smaller one finds the channels already gone).
        self.classes = [li.coupled if channel and li.coupled is not None else i
                        for i, li in enumerate(infos)]
        self.channel = channel
        self.total = sum(self.params)
        self.target = target * self.total
        self.low, self.high = low, high
        most, least = self.removed([high] * len(infos)), self.removed([low] * len(infos))
        if most < self.target - 1e-6:
            raise ValueError(
                f"target_sparsity {target} is out of reach: even max_ratio {high} on every "
                f"selected layer removes only {most / self.total:.4f} of their weights; raise "
                "max_ratio or lower target_sparsity")
        if least > self.target + 1e-6:
            raise ValueError(
                f"target_sparsity {target} is below what min_ratio {low} already removes "
                f"({least / self.total:.4f}); lower min_ratio")

    def removed(self, ratios: list[float]) -> float:
        """Weights the ratios remove from the selected layers (under the cost model)."""
        if not self.channel:
            return sum(r * n for r, n in zip(ratios, self.params))
        applied: dict[int, float] = {}
        for group, r in zip(self.classes, ratios):
            applied[group] = max(applied.get(group, 0.0), r)
        total = 0.0
        for group, n, src in zip(self.classes, self.params, self.sources):
            keep_in = 1.0 - applied[self.classes[src]] if src is not None else 1.0
            total += n * (1.0 - (1.0 - applied[group]) * keep_in)
        return total

    def bounds(self, prefix: list[float]) -> tuple[float, float]:
        """The range of the next layer's ratio that leaves the target reachable, given the
        ratios already chosen (``prefix``) and the extremes for the layers after it."""
        rest = len(self.params) - len(prefix) - 1

        def removed(x: float, fill: float) -> float:
            return self.removed([*prefix, x] + [fill] * rest)

        # Lower bound: even if every later layer takes `high`, this one must remove enough.
        lo = self.low if removed(self.low, self.high) >= self.target else _bisect(
            lambda x: removed(x, self.high) >= self.target, self.low, self.high, want_min=True)
        # Upper bound: even if every later layer takes `low`, this one must not remove too much.
        hi = self.high if removed(self.high, self.low) <= self.target else _bisect(
            lambda x: removed(x, self.low) <= self.target, self.low, self.high, want_min=False)
        return lo, max(lo, hi)


def _bisect(ok: Callable[[float], bool], low: float, high: float, want_min: bool) -> float:
    """Smallest (``want_min``) or largest x in [low, high] with ``ok(x)`` (monotone ``ok``)."""
    for _ in range(60):
        mid = (low + high) / 2
        if ok(mid) == want_min:
            high = mid
        else:
            low = mid
    return high if want_min else low


def magnitude_prior(infos: list[LayerInfo], target: float) -> list[float]:
    """The ratios global magnitude pruning would give each layer: one threshold over all the
    selected weights, removing ``target`` of them (an optional starting point for the agent)."""
    sizes = [li.params for li in infos]
    mags = torch.cat([li.module.weight.detach().abs().reshape(-1).cpu() for li in infos])
    owner = torch.repeat_interleave(torch.arange(len(infos)), torch.tensor(sizes))
    chosen = owner[mags.argsort(stable=True)[: round(target * mags.numel())]]
    counts = torch.bincount(chosen, minlength=len(infos))
    return [int(c) / n for c, n in zip(counts, sizes)]


def weight_counts(ratios: list[float], params: list[int], target: int) -> list[int]:
    """Weights to remove per layer; the last layer takes the exact remainder so the total is
    ``target`` (rounding every layer independently would drift by up to one weight each)."""
    counts = [round(r * n) for r, n in zip(ratios[:-1], params[:-1])]
    counts.append(min(max(target - sum(counts), 0), params[-1]))
    return counts


class WeightPruner:
    """Unstructured per-layer magnitude pruning, applied to the live model and undone."""

    def __init__(self, infos: list[LayerInfo]) -> None:
        self.infos = infos
        self.originals = [li.module.weight.detach().clone() for li in infos]
        # Sorting once makes every episode's pruning a cheap index assignment.
        self.orders = [w.abs().reshape(-1).argsort(stable=True) for w in self.originals]

    def masks(self, counts: list[int]) -> list[torch.Tensor]:
        """Keep-masks removing the ``counts[t]`` smallest-magnitude weights of each layer."""
        out = []
        for order, w, k in zip(self.orders, self.originals, counts):
            mask = torch.ones(w.numel(), dtype=torch.bool)
            mask[order[:k]] = False
            out.append(mask.reshape(w.shape))
        return out

    @torch.no_grad()
    def apply(self, counts: list[int]) -> None:
        """Write the pruned weights into the model."""
        for li, w, mask in zip(self.infos, self.originals, self.masks(counts)):
            li.module.weight.copy_(w * mask)

    @torch.no_grad()
    def restore(self) -> None:
        """Put the original weights back."""
        for li, w in zip(self.infos, self.originals):
            li.module.weight.copy_(w)


def link_channel_sources(model: nn.Module, infos: list[LayerInfo], example: torch.Tensor) -> None:
    """Set each layer's ``source``: the selected layer whose output-channel pruning also prunes
    this layer's input channels, and ``coupled``: the first selected layer whose outputs are
    pruned together with this one's (both found with Torch-Pruning's dependency graph). A
    selected ``qkv`` of multi-head attention is followed from its attention dims
    (:func:`netshrink.attention_group`); one netshrink cannot prune consistently is refused
    here, before any episode, with a :class:`SelectionError` naming the layer."""
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example[:1], verbose=False)
    attention = find_attention(model)
    index = {id(li.module): i for i, li in enumerate(infos)}
    first = list(range(len(infos)))  # union-find over layers whose outputs prune together

    def leader(i: int) -> int:
        while first[i] != i:
            i = first[i]
        return i

    for i, li in enumerate(infos):
        heads = attention.get(id(li.module))
        if heads is not None:
            root, fn = _attention_root(graph, heads, li.name)
            group = graph.get_pruning_group(root, fn, idxs=[0])
        else:
            group = graph.get_pruning_group(li.module, out_pruning_fn(li.module), idxs=[0])
        for item in group:
            dep = item.dep if hasattr(item, "dep") else item[0]
            j = index.get(id(dep.target.module))
            if j is None or j == i:
                continue
            if infos[j].source is None and graph.is_in_channel_pruning_fn(dep.handler):
                infos[j].source = i
            elif heads is None and graph.is_out_channel_pruning_fn(dep.handler):
                a, b = sorted((leader(i), leader(j)))
                first[b] = a
    for i, li in enumerate(infos):
        li.coupled = leader(i) if leader(i) != i or first.count(i) > 1 else None


def _attention_root(graph, heads: AttentionHeads, name: str) -> tuple[nn.Module, Callable]:
    """Where a group of ``heads``' attention dims is rooted (the input of its projection), or a
    :class:`SelectionError` naming layer ``name`` if its head dims cannot be pruned."""
    group = attention_group(graph, heads)
    if group.reason is not None or group.root is None:
        raise SelectionError(
            f"rlprune channel mode refused (nothing changed): layer {name!r} is the fused qkv "
            f"of a multi-head attention ({type(heads.module).__name__}) whose head dims cannot "
            f"be pruned: {group.reason}; exclude it from 'select' or use granularity='weight'")
    return group.root


def out_pruning_fn(module: nn.Module) -> Callable:
    """Torch-Pruning's output-channel pruning function for a conv or linear layer."""
    import torch_pruning as tp

    if isinstance(module, nn.Linear):
        return tp.prune_linear_out_channels
    return tp.prune_conv_out_channels


def prune_channels(model: nn.Module, names: list[str], ratios: list[float],
                   originals: list[int], example: torch.Tensor, *,
                   check: Callable[[], str | None] | None = None,
                   broken: dict[str, str] | None = None) -> list[int]:
    """Remove the lowest-L1 output channels of each named layer of ``model`` (in place) through
    Torch-Pruning's dependency graph, so every coupled layer shrinks with it. Returns the
    channels kept per layer.

    A fused ``qkv`` of multi-head attention loses the same head dims in every head (q, k and v
    rows alike, and the projection's inputs), so heads stay equal; its ``num_heads`` stays,
    ``head_dim`` and the default ``scale`` follow (:func:`netshrink.update_heads`).

    With ``check`` (why the model no longer runs, or None), a layer whose group fails or breaks
    the model is put back (:func:`netshrink.prune_or_put_back`) and its reason goes into
    ``broken``."""
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example[:1], verbose=False)
    attention = find_attention(model)
    modules = dict(model.named_modules())
    kept = []
    for name, ratio, orig in zip(names, ratios, originals):
        module = modules[name]
        heads = attention.get(id(module))
        try:
            if heads is not None:
                _prune_head_dims(graph, heads, name, ratio, orig, check, broken)
            else:
                _prune_lowest_l1(graph, module, name, ratio, orig, check, broken)
        except (TimeoutError, NetshrinkError):
            raise
        except Exception as exc:  # building the group failed: only a checked run survives it
            if check is None or broken is None:
                raise
            broken[name] = (f"Torch-Pruning failed building its group ({type(exc).__name__}: "
                            f"{(str(exc).strip().splitlines() or [''])[0][:300]})")
        kept.append(int(module.weight.shape[0]))
    return kept


def _prune_lowest_l1(graph, module: nn.Module, name: str, ratio: float, orig: int,
                     check: Callable[[], str | None] | None,
                     broken: dict[str, str] | None) -> None:
    """Remove ``ratio`` of ``module``'s ``orig`` output channels, those of lowest L1 norm."""
    weight = module.weight.detach()
    current = weight.shape[0]
    keep = max(1, min(current, orig - round(ratio * orig)))
    drop = current - keep
    if drop <= 0:
        return
    norms = weight.abs().reshape(current, -1).sum(1)
    idxs = norms.argsort(stable=True)[:drop].tolist()
    group = graph.get_pruning_group(module, out_pruning_fn(module), idxs=idxs)
    if graph.check_pruning_group(group):
        _prune(group, name, check, broken)


def _prune(group, name: str, check: Callable[[], str | None] | None,
           broken: dict[str, str] | None, also: tuple[nn.Module, ...] = (),
           then: Callable[[], None] | None = None) -> None:
    """``group.prune()`` (then ``then``), or with ``check``, put back if it breaks the model."""
    if check is None:
        group.prune()
        if then is not None:
            then()
        return
    why = prune_or_put_back(group, check, also=also, then=then)
    if why is not None and broken is not None:
        broken[name] = why


def _prune_head_dims(graph, heads: AttentionHeads, name: str, ratio: float, orig: int,
                     check: Callable[[], str | None] | None = None,
                     broken: dict[str, str] | None = None) -> None:
    """Remove ``ratio`` of the head dims of ``heads`` (``orig``: its qkv's original rows), the
    same positions in every head: those with the lowest L1 norm of their q, k and v rows summed
    over the heads."""
    root, fn = _attention_root(graph, heads, name)
    original_dim = orig // (3 * heads.num_heads)
    keep = max(1, min(heads.head_dim, original_dim - round(ratio * original_dim)))
    drop = heads.head_dim - keep
    if drop <= 0:
        return
    norms = heads.qkv.weight.detach().abs().sum(1).reshape(3 * heads.num_heads, heads.head_dim)
    positions = norms.sum(0).argsort(stable=True)[:drop].tolist()
    group = graph.get_pruning_group(root, fn, idxs=heads.dims(positions))
    if graph.check_pruning_group(group):
        _prune(group, name, check, broken, also=(heads.module,),
               then=lambda: update_heads(heads, heads.num_heads))


#: The loss an episode scores when its model gives a non-finite loss or its ratios cannot be
#: built into a model that runs.
BROKEN_LOSS = 1e6


class RewardFn:
    """Scores a pruned model on a fixed validation subset (the fast proxy of the paper's
    validation accuracy)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> None:
        self.x, self.y, self.batch = x, y, batch

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> tuple[float, float]:
        """``(accuracy, mean cross-entropy)`` on the subset."""
        was_training = model.training
        model.eval()
        correct, loss = 0, 0.0
        for start in range(0, len(self.x), self.batch):
            x, y = self.x[start:start + self.batch], self.y[start:start + self.batch]
            logits = model(x)
            correct += int((logits.argmax(1) == y).sum())
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
        model.train(was_training)
        acc = correct / len(self.x)
        loss /= len(self.x)
        if not math.isfinite(loss):
            loss = BROKEN_LOSS
        return acc, loss


def channel_reward(model: nn.Module, names: list[str], ratios: list[float], originals: list[int],
                   example: torch.Tensor, reward: RewardFn,
                   checked: bool = False) -> tuple[float, float, bool]:
    """Reward of channel-pruning a copy of ``model`` with ``ratios`` (the model is untouched),
    and whether it needed checking. If Torch-Pruning gets this mix of ratios wrong (the pruned
    copy fails, although each layer alone passed the preflight), or ``checked`` is set, the
    copy is pruned layer by layer and each layer that breaks it is put back
    (:func:`prune_checked`): the reward is that of the model that can be built."""
    if not checked:
        work = copy_model(model)
        try:
            prune_channels(work, names, ratios, originals, example)
            acc, loss = reward(work)
            return acc, loss, False
        except (TimeoutError, NetshrinkError):
            raise
        except Exception:  # scored below, with the layers that break the model put back
            pass
    work = copy_model(model)
    try:
        prune_checked(work, names, ratios, originals, example)
    except SelectionError:
        raise
    except NetshrinkError:  # a layer broke the copy and could not be put back: unusable mix
        return 0.0, BROKEN_LOSS, True
    acc, loss = reward(work)
    return acc, loss, True


def prune_checked(model: nn.Module, names: list[str], ratios: list[float],
                  originals: list[int], example: torch.Tensor) -> dict[str, str]:
    """:func:`prune_channels` with a forward check after each layer: a layer whose group fails
    or breaks the model is put back. Returns those layers, with why."""
    broken: dict[str, str] = {}
    prune_channels(model, names, ratios, originals, example,
                   check=lambda: why_broken(model, example[:1], "pruning its channels"),
                   broken=broken)
    return broken


class EpisodeScorer:
    """Scores an episode's ratios: ``(accuracy, loss)`` of the model pruned with them.

    Weight granularity prunes the live model in place from the kept original weights (undo
    with :meth:`restore`); channel granularity prunes a copy. An instance holds the model as a
    module and tensors (no closure), so an executor can pickle it to worker processes or Ray
    workers, each of which scores its own copy; the results are the same as here.
    """

    def __init__(self, model: nn.Module, infos: list[LayerInfo], budget: BudgetModel,
                 target_count: int, x: torch.Tensor, reward: RewardFn, channel: bool) -> None:
        self.model = model
        self.names = [li.name for li in infos]
        self.out_channels = [li.out_channels for li in infos]
        self.params = list(budget.params)
        self.target_count = target_count
        self.x = x
        self.reward = reward
        self.pruner = None if channel else WeightPruner(infos)
        self.checked = False

    def __call__(self, ratios: list[float]) -> tuple[float, float]:
        """``(accuracy, mean cross-entropy)`` of the model pruned with ``ratios``."""
        if self.pruner is None:
            # Once one episode needed the checked pruning, the next ones go straight to it.
            acc, loss, self.checked = channel_reward(self.model, self.names, ratios,
                                                     self.out_channels, self.x, self.reward,
                                                     self.checked)
            return acc, loss
        self.pruner.apply(weight_counts(ratios, self.params, self.target_count))
        return self.reward(self.model)

    def restore(self) -> None:
        """Put the live model's original weights back (weight granularity)."""
        if self.pruner is not None:
            self.pruner.restore()


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``; a module that cached tensors built from its parameters during
    a forward with gradients (timm's LeViT attention biases, after Torch-Pruning's trace) cannot
    be copied, and drops those caches when put in training mode, so that is done first."""
    try:
        return copy.deepcopy(model)
    except RuntimeError:
        was_training = model.training
        model.train()
        model.train(was_training)
        return copy.deepcopy(model)
