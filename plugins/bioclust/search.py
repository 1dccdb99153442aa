"""Clustered tensors, candidate reconstructions and the evolutionary search over them.

A *candidate* is one seed and one perturbation scale per clustered tensor. Rebuilding a model
from a candidate goes through :class:`~netshrink.encodings.Codebook` itself, so the weights a
candidate is evaluated with are exactly the weights the artifact regenerates at load time.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from netshrink import (
    Codebook,
    CompressionContext,
    Encoding,
    EncodingError,
    Sparse,
    encode_values,
    evaluate,
)
from netshrink.plugins.bioclust.config import BioclustConfig
from netshrink.plugins.bioclust.kmeans import Clustering, kmeans1d

_SEED_RANGE = 2**31 - 1


@dataclass
class Target:
    """One clustered tensor: where it lives, what it was, and its clustering."""

    layer: str
    tensor_name: str
    param: torch.Tensor
    original: torch.Tensor
    """The tensor before this step (CPU copy); its kept values are what was clustered."""
    previous: Encoding | None
    positions: torch.Tensor | None
    """Flat positions of the stored values when an earlier step left the tensor sparse."""
    clustering: Clustering
    base_scale: float
    requested_k: int

    @property
    def values(self) -> torch.Tensor:
        """The clustered values (all weights, or the kept ones of a sparse tensor)."""
        flat = self.original.reshape(-1).float()
        return flat if self.positions is None else flat[self.positions]

    def codebook(self, seed: int | None, scale: float, distribution: str,
                 centroids: torch.Tensor | None = None) -> Codebook:
        """The codebook of the values for one (seed, scale) choice."""
        cl = self.clustering
        perturbed = seed is not None and scale > 0
        return Codebook(cl.indices, cl.centroids if centroids is None else centroids,
                        seed=seed if perturbed else None,
                        noise_scale=scale if perturbed else 0.0,
                        spreads=cl.spreads if perturbed else None,
                        distribution=distribution)  # type: ignore[arg-type]

    def decoded(self, codebook: Codebook) -> torch.Tensor:
        """The full tensor a codebook of the values rebuilds (zeros where pruned)."""
        return self.scatter(codebook.decode())

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """The full tensor holding ``values`` at the stored positions (zeros elsewhere)."""
        values = values.reshape(-1)
        if self.positions is None:
            return values.reshape(self.original.shape)
        out = torch.zeros(self.original.numel(), dtype=values.dtype)
        out[self.positions] = values
        return out.reshape(self.original.shape)

    def encoding(self, codebook: Codebook) -> Encoding:
        """The tensor's final encoding: the codebook, nested in the earlier sparse structure."""
        def value_encoder(values, positions, full_shape):
            if values.numel() != codebook.indices.numel():
                raise EncodingError(
                    f"{self.tensor_name}: {values.numel()} values to encode but the clustering "
                    f"has {codebook.indices.numel()}")
            return codebook
        return encode_values(self.original, self.previous, value_encoder)

    def write(self, tensor: torch.Tensor) -> None:
        """Put ``tensor`` into the model's parameter (used while evaluating candidates)."""
        with torch.no_grad():
            self.param.copy_(tensor.to(self.param.dtype).reshape(self.param.shape))


def cluster_targets(model: nn.Module, layers: list[tuple[str, nn.Module]],
                    ctx: CompressionContext, cfg: BioclustConfig,
                    config_for: Callable[[str], BioclustConfig] | None = None) -> list[Target]:
    """Cluster the weight of every selected layer (the kept values only, if sparse), each with
    its own config from ``config_for(layer)`` (a step's overrides; default: ``cfg``)."""
    targets = []
    gen = ctx.generator(offset=1)
    for lname, module in ctx.progress(layers, desc="k-means"):
        weight = module.weight
        tname = f"{lname}.weight"
        previous = ctx.encoding_of(tname)
        if previous is not None and previous.is_value_encoded:
            raise EncodingError(
                f"{tname} is already stored as {previous.describe()}; bioclust clusters "
                "raw (dense or pruned) weights, so run it before quantizing steps")
        original = weight.detach().cpu().clone()
        positions = None
        if isinstance(previous, Sparse):
            positions = previous.mask().reshape(-1).nonzero().reshape(-1)
            if positions.numel() == 0:
                continue  # fully pruned: nothing to cluster
        values = original.reshape(-1).float()
        values = values if positions is None else values[positions]
        lcfg = cfg if config_for is None else config_for(lname)
        k = lcfg.clusters
        clustering = kmeans1d(values, k, iterations=lcfg.kmeans_iterations, init=lcfg.init,
                              sample_size=lcfg.sample_size, generator=gen)
        targets.append(Target(lname, tname, weight, original, previous, positions, clustering,
                              lcfg.noise_scale, k))
    return targets


@dataclass
class Candidate:
    """One reconstruction: a seed and a scale per target (seed None = unperturbed)."""

    seeds: list[int | None]
    scales: list[float]
    generation: int
    index: int
    val_acc: float = float("nan")
    parent: int | None = None

    @property
    def perturbed(self) -> bool:
        """True if any layer carries a perturbation."""
        return any(s is not None and sc > 0 for s, sc in zip(self.seeds, self.scales))

    @classmethod
    def from_description(cls, data: dict[str, Any]) -> Candidate:
        """Inverse of :meth:`describe` (e.g. from a report's ``candidates``)."""
        return cls(list(data["seeds"]), [float(s) for s in data["scales"]],
                   generation=int(data["generation"]), index=int(data["index"]),
                   val_acc=float(data["val_acc"]), parent=data.get("parent"))

    def describe(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {"generation": self.generation, "index": self.index, "val_acc": self.val_acc,
                "parent": self.parent, "seeds": self.seeds,
                "scales": list(self.scales)}


@dataclass
class SearchResult:
    """Everything the population search found."""

    targets: list[Target]
    plain: Candidate
    candidates: list[Candidate] = field(default_factory=list)
    chosen: Candidate | None = None

    def first_generation(self) -> list[Candidate]:
        """The random (unmutated) candidates: the paper's stability population."""
        return [c for c in self.candidates if c.generation == 1]

    def best(self) -> Candidate:
        """The perturbed candidate with the highest validation accuracy (earliest on ties)."""
        return max(self.candidates, key=lambda c: (c.val_acc, -c.generation, -c.index))


def apply(targets: list[Target], cand: Candidate, distribution: str) -> None:
    """Write the reconstruction ``cand`` into the model."""
    for target, seed, scale in zip(targets, cand.seeds, cand.scales):
        target.write(target.decoded(target.codebook(seed, scale, distribution)))


def _f32(x: float) -> float:
    """Round to float32, the precision the codebook stores, so a candidate's recorded scale
    rebuilds exactly the weights it was evaluated with."""
    return float(np.float32(x))


def _draw_seed(gen: torch.Generator) -> int:
    return int(torch.randint(1, _SEED_RANGE, (1,), generator=gen))


def _random_candidate(targets: list[Target], cfg: BioclustConfig, gen: torch.Generator,
                      index: int) -> Candidate:
    seeds: list[int | None] = [_draw_seed(gen) for _ in targets]
    u = torch.rand(len(targets), generator=gen) * 2 - 1
    scales = [_f32(t.base_scale * (1 + cfg.scale_jitter * float(x))) for t, x in zip(targets, u)]
    return Candidate(seeds, scales, generation=1, index=index)


def _mutate(parent: Candidate, cfg: BioclustConfig, gen: torch.Generator, targets: list[Target],
            generation: int, index: int) -> Candidate:
    n = len(targets)
    flips = torch.rand(n, generator=gen) < cfg.mutation_rate
    if not bool(flips.any()):  # a child identical to its parent would waste an evaluation
        flips[int(torch.randint(0, n, (1,), generator=gen))] = True
    seeds = list(parent.seeds)
    scales = list(parent.scales)
    for i in torch.nonzero(flips).reshape(-1).tolist():
        seeds[i] = _draw_seed(gen)
        base = scales[i] if scales[i] > 0 else targets[i].base_scale
        factor = math.exp(cfg.scale_mutation * float(torch.randn(1, generator=gen)))
        scales[i] = _f32(min(base * factor, 10.0))
    return Candidate(seeds, scales, generation=generation, index=index, parent=parent.index)


class CandidateScorer:
    """Validation accuracy of the model with a candidate's reconstruction written into it.

    It holds the model, the targets (whose parameters are the model's own) and the validation
    loader, no closure, so an executor can pickle it to worker processes or Ray workers; each
    rebuilds the candidate's weights from its seeds with the same codebook code and measures
    the same accuracy as here.
    """

    def __init__(self, model: nn.Module, targets: list[Target], distribution: str,
                 loader: torch.utils.data.DataLoader, device: torch.device) -> None:
        self.model, self.targets, self.distribution = model, targets, distribution
        self.loader, self.device = loader, device

    def __call__(self, cand: Candidate) -> float:
        """The accuracy of the model rebuilt with ``cand``."""
        apply(self.targets, cand, self.distribution)
        return evaluate(self.model, self.loader, self.device)


def population_search(targets: list[Target], ctx: CompressionContext, cfg: BioclustConfig,
                      evaluate: Callable[[], float],
                      evaluate_many: Callable[[list[Candidate]], list[float]] | None = None,
                      ) -> SearchResult:
    """Evaluate the unperturbed reconstruction and ``population`` random ones (per
    generation, mutating the best after the first) with ``evaluate()`` (validation accuracy
    of the model as the targets currently hold it); choose the best.

    With ``evaluate_many`` (an executor's ``map`` over a :class:`CandidateScorer`), each
    generation's candidates are evaluated together instead; candidates are drawn from the
    generator before any is evaluated, so the search is the same."""
    dist = cfg.distribution
    plain = Candidate([None] * len(targets), [0.0] * len(targets), generation=0, index=-1)
    apply(targets, plain, dist)
    plain.val_acc = evaluate()
    result = SearchResult(targets, plain)
    if all(t.base_scale == 0 for t in targets):  # plain k-means: nothing random to search
        result.chosen = plain
        return result
    gen = ctx.generator(offset=2)
    population = [_random_candidate(targets, cfg, gen, i) for i in range(cfg.population)]
    for g in range(1, cfg.generations + 1):
        desc = f"candidates (generation {g}/{cfg.generations})"
        if evaluate_many is not None:
            for cand, acc in zip(population, evaluate_many(population), strict=True):
                cand.val_acc = float(acc)
        for cand in ctx.progress(population, desc=desc, total=len(population)):
            if evaluate_many is None:
                apply(targets, cand, dist)
                cand.val_acc = evaluate()
        result.candidates += population
        if g < cfg.generations:
            ranked = sorted(result.candidates, key=lambda c: -c.val_acc)
            elite = ranked[: max(1, min(cfg.elite, len(ranked)))]
            start = len(result.candidates)
            population = [_mutate(elite[i % len(elite)], cfg, gen, targets, g + 1, start + i)
                          for i in range(cfg.population)]
    best = result.best()
    keep_plain = cfg.keep_unperturbed and not best.val_acc > plain.val_acc + cfg.min_gain
    result.chosen = plain if keep_plain else best
    return result


def stats(values: list[float]) -> dict[str, float]:
    """Mean, standard deviation, min and max of accuracies (rounded)."""
    if not values:
        return {}
    return {"mean": round(statistics.fmean(values), 6),
            "std": round(statistics.pstdev(values), 6) if len(values) > 1 else 0.0,
            "min": round(min(values), 6), "best": round(max(values), 6), "n": len(values)}
