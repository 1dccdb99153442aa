"""``statprune``: statistics-based filter pruning (paper 002: Gong, Zhang, Zeng, "Convolution neural
network model compression method based on pruning and tensor decomposition", Journal of Computer
Applications 40(11):3146-3151, 2020, https://doi.org/10.11772/j.issn.1001-9081.2020030362).

Each selected layer's filters are described by the mean and variance of their weights (optionally
|mean|, L1, L2); k-means or a Gaussian mixture clusters them and the cluster(s) with the smallest
RMS weight are removed, subject to a floor on kept channels. Removal is physical and goes through
Torch-Pruning's DependencyGraph, which rebuilds the next layers from the kept channels and keeps
BatchNorm, residual adds, concatenations and depthwise groups consistent.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator
from torch import nn

from netshrink import (
    AttentionHeads,
    Capabilities,
    Compressor,
    CompressorConfig,
    LayerRecord,
    NetshrinkError,
    SelectionError,
    StepResult,
    find_attention,
    hookimpl,
    last_linear,
    prune_or_put_back,
    update_heads,
    why_broken,
)
from netshrink.plugins.statprune.graph import GroupInfo, build_graph, describe_group, is_depthwise
from netshrink.plugins.statprune.guard import Deadline, deadline, describe_module, failing_module
from netshrink.plugins.statprune.stats import (
    Feature,
    filter_features,
    removal_budget,
    round_removal,
    standardise,
    weak_channels,
)

PAPER = ('Gong Kaiqiang, Zhang Chunmei, Zeng Guanghua, "Convolution neural network model '
         'compression method based on pruning and tensor decomposition", Journal of Computer '
         'Applications (计算机应用) 40(11):3146-3151, 2020')


class StatPruneConfig(CompressorConfig):
    """Configuration of :class:`StatPrune`."""

    features: list[Feature] = Field(
        default_factory=lambda: ["mean", "var"],
        description="Per-filter statistics clustered: any of mean, var, abs_mean, l1, l2 "
        "(the paper uses mean and variance).")
    method: Literal["kmeans", "gmm"] = Field(
        "kmeans", description="Clustering: scikit-learn KMeans or GaussianMixture.")
    clusters: int = Field(2, ge=2, le=16, description="Number of clusters per layer (k >= 2).")
    drop_clusters: int = Field(
        1, ge=1, le=15, description="How many of the weakest clusters (smallest mean RMS weight) "
        "are removed; must be < clusters.")
    min_keep_ratio: float = Field(
        0.25, gt=0.0, le=1.0, description="Floor: every layer keeps at least this fraction of its "
        "channels (the weakest filters of the weak clusters go first).")
    min_keep_channels: int = Field(
        4, ge=1, description="Floor: every layer keeps at least this many channels.")
    round_to: int = Field(
        1, ge=1, le=256, description="Kept channel counts are rounded up to a multiple of this "
        "(e.g. 8 for SIMD-friendly shapes).")
    coupled: Literal["joint", "skip"] = Field(
        "joint", description="Layers whose outputs are tied to others (residual adds): 'joint' "
        "clusters the averaged statistics of all tied selected layers and prunes them together; "
        "'skip' leaves such channels alone.")
    attention: Literal["head_dims", "heads", "skip"] = Field(
        "head_dims", description="A fused qkv Linear of multi-head attention (timm ViT/DeiT): "
        "'head_dims' removes the same dims from every head (q, k and v alike; the number of "
        "heads is kept), 'heads' removes whole heads, 'skip' leaves attention widths alone. The "
        "attention's num_heads/head_dim are updated.")
    verify: bool = Field(
        True, description="Run a forward pass after each group is pruned. A group whose pruning "
        "breaks the model (Torch-Pruning missed a dependency, e.g. through a split) is put back "
        "and left unpruned, with the module that failed in its record.")
    time_limit: float = Field(
        600.0, gt=0, description="Seconds the Torch-Pruning trace and surgery may take; past it "
        "the step is refused, naming what was being done (the model is left unchanged).")

    @field_validator("features")
    @classmethod
    def _features(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("features must name at least one statistic, got []")
        if len(set(value)) != len(value):
            raise ValueError(f"features must not repeat, got {value}")
        return value

    @model_validator(mode="after")
    def _drop_lt_clusters(self) -> StatPruneConfig:
        if self.drop_clusters >= self.clusters:
            raise ValueError(
                f"drop_clusters must be < clusters, got drop_clusters={self.drop_clusters} "
                f"with clusters={self.clusters}")
        return self


class StatPrune(Compressor):
    """Prune the filters that cluster as weak by the mean and variance of their weights."""

    name = "statprune"
    Config = StatPruneConfig
    capabilities = Capabilities(handles=("Conv2d", "Linear"), changes_structure=True,
                                needs_finetune=True)
    paper = PAPER
    config: StatPruneConfig

    def compress(self, model, layers, ctx) -> StepResult:
        """Prune ``model`` in place under :attr:`StatPruneConfig.time_limit`. A group whose
        pruning breaks the model is put back and left unpruned (its record says why); a trace
        that fails, or the time running out, refuses the step (:class:`SelectionError` naming
        the module or op) and puts ``model`` back as it was."""
        backup = copy.deepcopy(model)
        try:
            with deadline(self.config.time_limit) as limit:
                return self._surgery(model, layers, ctx, limit)
        except TimeoutError as exc:
            _restore(model, backup)
            raise SelectionError(
                f"statprune refused {_model_name(model, ctx)} (left unchanged): {exc}; "
                "Torch-Pruning cannot handle this graph in time: raise 'time_limit' or exclude "
                "those layers from 'select'") from None
        except _Refusal as exc:
            _restore(model, backup)
            raise SelectionError(
                f"statprune refused {_model_name(model, ctx)} (left unchanged): {exc}") from None

    def _surgery(self, model, layers, ctx, limit: Deadline) -> StepResult:
        """Trace, cluster and prune ``layers`` of ``model`` (a copy) in place."""
        cfg = self.config
        head_name = (ctx.info.head if ctx.info else None) or last_linear(model)
        head = model.get_submodule(head_name) if head_name else None
        names = {id(m): n for n, m in model.named_modules()}
        selected = {id(m) for _, m in layers}
        attention = find_attention(model)
        params_before = sum(p.numel() for p in model.parameters())
        limit.doing = "Torch-Pruning traced the model"
        try:
            dg = build_graph(model, ctx.example_input(1))
        except NetshrinkError as exc:
            raise _Refusal(str(exc)) from exc
        records: dict[str, LayerRecord] = {}
        done: set[int] = set()
        for index, (lname, module) in enumerate(ctx.progress(layers, desc="cluster + prune")):
            if id(module) in done:
                continue
            limit.doing = f"Torch-Pruning grouped and pruned the channels of {lname}"
            limit.check()
            rec = LayerRecord(lname)
            records[lname] = rec
            check = ((lambda: why_broken(model, ctx.example_input(1), "pruning it"))
                     if cfg.verify else (lambda: None))
            rec.details.update(self._prune_one(dg, module, head, selected, names, ctx, index, done,
                                               attention, check))
            for other in rec.details.get("coupled_with", []):
                records.setdefault(other, LayerRecord(other, {"pruned_with": lname}))
        if cfg.verify:
            limit.doing = "the pruned model ran once"
            _verify(model, ctx)
        params_after = sum(p.numel() for p in model.parameters())
        pruned = [r for r in records.values() if r.details.get("removed")]
        return StepResult(model, list(records.values()), {
            "params_before": params_before, "params_after": params_after,
            "groups_pruned": len(pruned),
            "skipped": {n: r.details["skipped"] for n, r in records.items()
                        if "skipped" in r.details},
        })

    def _prune_one(self, dg, module: nn.Module, head: nn.Module | None, selected: set[int],
                   names: dict[int, str], ctx, index: int, done: set[int],
                   attention: dict[int, AttentionHeads],
                   check: Callable[[], str | None]) -> dict[str, Any]:
        """Cluster and prune the group rooted at ``module`` (a ``qkv`` in ``attention`` by its
        heads; ``check``: why the model no longer runs, or None); returns the record's
        details."""
        cfg = self.config
        info = describe_group(dg, module, attention)
        details: dict[str, Any] = {"channels_before": info.channels}
        if info.heads is not None:
            details.update(heads_before=info.heads.num_heads, head_dim_before=info.heads.head_dim)
            if cfg.attention == "skip" and not info.irregular:
                info.irregular = "attention widths are left alone (attention='skip')"
        tied = [m for m, _ in info.weighted if m is not module and not is_depthwise(m)]
        details["coupled_with"] = [names[id(m)] for m in tied if id(m) in selected]
        for m, _ in info.weighted:
            done.add(id(m))
        reason = _refusal(info, tied, head, selected, names, cfg.coupled)
        if reason:
            return {**details, "skipped": reason, "channels_after": info.channels}
        table, strength = _joint_features(info, selected, cfg.features)
        if info.heads is not None and cfg.attention == "heads":
            return self._prune_heads(dg, info, table, strength, details, ctx.seed + index, check)
        g = info.channel_groups
        positions = info.channels // g
        if g > 1:  # same positions in every conv group, so groups stay equal-sized
            table = table.reshape(g, positions, -1).mean(0)
            strength = strength.reshape(g, positions).mean(0)
        budget = removal_budget(info.channels, cfg.min_keep_ratio, cfg.min_keep_channels,
                                cfg.round_to) // g
        weak, summary = weak_channels(table, strength, method=cfg.method, clusters=cfg.clusters,
                                      drop_clusters=cfg.drop_clusters, max_remove=budget,
                                      seed=ctx.seed + index)
        details.update(summary)
        remove = round_removal(positions, len(weak), max(cfg.round_to // g, 1))
        weak = np.sort(weak[:remove])
        idxs = sorted(int(p + j * positions) for j in range(g) for p in weak)
        if not idxs:
            return {**details, "removed": 0, "channels_after": info.channels}
        return {**details, **_remove(dg, module, info, idxs, check)}

    def _prune_heads(self, dg, info: GroupInfo, table: np.ndarray, strength: np.ndarray,
                     details: dict[str, Any], seed: int,
                     check: Callable[[], str | None]) -> dict[str, Any]:
        """Cluster whole heads (each described by the mean statistics of its dims) and remove
        the weak ones; at least ``min_keep_ratio`` of the heads (and one) stay."""
        cfg = self.config
        heads = info.channel_groups
        table = standardise(table.reshape(heads, -1, table.shape[1]).mean(1))
        strength = strength.reshape(heads, -1).mean(1)
        budget = removal_budget(heads, cfg.min_keep_ratio, 1, 1)
        weak, summary = weak_channels(table, strength, method=cfg.method, clusters=cfg.clusters,
                                      drop_clusters=cfg.drop_clusters, max_remove=budget,
                                      seed=seed)
        details.update(summary)
        width = info.channels // heads
        idxs = sorted(int(h) * width + d for h in weak for d in range(width))
        return {**details, **_remove(dg, info.heads.qkv, info, idxs, check,
                                     heads_removed=len(weak))}


def _remove(dg, module: nn.Module, info: GroupInfo, idxs: list[int],
            check: Callable[[], str | None], heads_removed: int = 0) -> dict[str, Any]:
    """Prune ``idxs`` of the group (through its root) and update an attention's heads
    (``heads_removed`` whole heads went); the record's outcome. If Torch-Pruning fails, or
    ``check`` finds the model broken afterwards, every module the group changed is put back
    and the group is recorded as skipped."""
    if not idxs:
        return {"removed": 0, "channels_after": info.channels}
    root, fn = info.root or (module, dg.get_pruner_of_module(module).prune_out_channels)
    group = dg.get_pruning_group(root, fn, idxs)
    if not dg.check_pruning_group(group):
        return {"skipped": "Torch-Pruning rejected the group (it would empty a layer)",
                "channels_after": info.channels}
    heads = info.heads
    try:
        broken = prune_or_put_back(
            group, check, also=[heads.module] if heads is not None else [],
            then=(lambda: update_heads(heads, heads.num_heads - heads_removed)) if heads else None)
    except NetshrinkError as exc:  # the model could not be repaired: the step is refused
        raise _Refusal(str(exc)) from None
    if broken is not None:
        return {"skipped": f"{broken}; the group was put back, unpruned",
                "channels_after": info.channels}
    out: dict[str, Any] = {"removed": len(idxs), "channels_after": info.channels - len(idxs)}
    if info.heads is not None:
        out.update(heads_after=info.heads.num_heads, head_dim_after=info.heads.head_dim)
    return out


def _refusal(info: GroupInfo, tied: list[nn.Module], head: nn.Module | None, selected: set[int],
             names: dict[int, str], coupled: str) -> str | None:
    """Why this group must not be pruned, or None."""
    if head is not None and any(m is head for m, _ in info.weighted):
        return "its channels are the classifier's outputs (never pruned)"
    if info.irregular:
        return info.irregular
    if tied and coupled == "skip":
        return f"outputs tied to {names[id(tied[0])]} (residual add); coupled='skip'"
    unselected = [names[id(m)] for m in tied if id(m) not in selected]
    if unselected:
        return f"outputs tied to unselected layer(s) {unselected[:3]}; select them too"
    return None


def _joint_features(info: GroupInfo, selected: set[int],
                    features: list[Feature]) -> tuple[np.ndarray, np.ndarray]:
    """Statistics averaged over the tied selected layers (each standardised on its own first, so
    layers of different scale count equally); strengths relative to each layer's mean."""
    tables, strengths = [], []
    for m, idxs in info.weighted:
        if id(m) not in selected:
            continue
        table, strength = filter_features(m.weight, features)
        tables.append(standardise(table[idxs]))
        strengths.append(strength[idxs] / max(float(strength.mean()), 1e-12))
    return np.mean(tables, 0), np.mean(strengths, 0)


class _Refusal(Exception):
    """Torch-Pruning cannot handle this model (raised on the copy; becomes a refusal)."""


def _restore(model: nn.Module, backup: nn.Module) -> None:
    """Put ``model`` back to ``backup`` (its copy from before the surgery), in place."""
    model.__dict__.clear()
    model.__dict__.update(backup.__dict__)


def _model_name(model: nn.Module, ctx) -> str:
    spec = ctx.info.spec if ctx.info is not None and ctx.info.spec else ""
    return spec or type(model).__name__


def _verify(model: nn.Module, ctx) -> None:
    """One forward pass in eval mode; a broken graph becomes a refusal naming the module whose
    forward fails."""
    found = failing_module(model, ctx.example_input(1))
    if found is None:
        return
    name, exc = found
    raise _Refusal(
        f"the pruned model no longer runs: module {describe_module(model, name)} raised "
        f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}; "
        "Torch-Pruning missed a dependency there: exclude that module (and the layers feeding "
        "it) from 'select'")


@hookimpl
def register_compressors(register):
    register(StatPrune)
