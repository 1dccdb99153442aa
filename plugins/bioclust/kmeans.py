"""Vectorised one-dimensional k-means for weight sharing (torch, no Python loop over weights).

Weights are scalars, so Lloyd's assignment step is a ``bucketize`` against the midpoints of the
sorted centroids (O(n log k)) and the update step a ``bincount``: a 2.4M-weight layer clusters
in well under a second on a laptop CPU, which scikit-learn's generic n-dimensional KMeans does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Init = Literal["linear", "quantile", "random"]


@dataclass
class Clustering:
    """The result of clustering one value vector."""

    indices: torch.Tensor
    """int64 cluster index of every value."""
    centroids: torch.Tensor
    """float32 centroids (only clusters that received values, sorted ascending)."""
    spreads: torch.Tensor
    """float32 standard deviation of the values around their centroid, per cluster."""
    iterations: int
    """Lloyd iterations run on the fitting sample."""

    @property
    def k(self) -> int:
        """Number of (non-empty) clusters."""
        return int(self.centroids.numel())

    def reconstruction_error(self, values: torch.Tensor) -> float:
        """Relative squared error ``||v - c[i]||² / ||v||²`` of the unperturbed reconstruction."""
        err = (values - self.centroids[self.indices]).pow(2).sum()
        return float(err / values.pow(2).sum().clamp_min(1e-30))


def assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for each value (``centroids`` sorted ascending)."""
    mids = (centroids[1:] + centroids[:-1]) / 2
    return torch.bucketize(values, mids)


def _initial(values: torch.Tensor, k: int, init: Init, gen: torch.Generator) -> torch.Tensor:
    lo, hi = float(values.min()), float(values.max())
    if init == "linear":  # Deep Compression's finding: keeps the rare large weights represented
        return torch.linspace(lo, hi, k)
    if init == "quantile":  # density-based: more centroids where weights are dense
        # Sorting instead of torch.quantile, which refuses inputs above 16M elements.
        ordered = values.sort().values
        at = ((torch.arange(k, dtype=torch.float64) + 0.5) / k * values.numel()).long()
        return ordered[at.clamp(max=values.numel() - 1)]
    pick = torch.randperm(values.numel(), generator=gen)[:k]
    return values[pick].sort().values


def _update(values: torch.Tensor, indices: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    k = centroids.numel()
    counts = torch.bincount(indices, minlength=k).to(values.dtype)
    sums = torch.bincount(indices, weights=values, minlength=k).to(values.dtype)
    # An empty cluster keeps its centroid (it is dropped at the end).
    return torch.where(counts > 0, sums / counts.clamp_min(1), centroids)


def kmeans1d(values: torch.Tensor, k: int, *, iterations: int = 30, init: Init = "linear",
             sample_size: int | None = None, tol: float = 1e-6,
             generator: torch.Generator | None = None) -> Clustering:
    """Cluster a vector of scalars into at most ``k`` clusters.

    Lloyd iterations run on a random sample of ``sample_size`` values when the vector is larger
    (large layers); every value is then assigned and the centroids refitted once on all values.
    Clusters that end up empty are dropped, so the result may have fewer than ``k`` clusters
    (e.g. when a layer has fewer distinct values than ``k``).
    """
    gen = generator or torch.Generator().manual_seed(0)
    x = values.detach().reshape(-1).to("cpu", torch.float64)  # float64 sums: exact enough means
    if x.numel() == 0:
        raise ValueError("cannot cluster an empty vector")
    distinct = torch.unique(x)
    if distinct.numel() <= k:  # fewer values than clusters: each distinct value is a centroid
        centroids = distinct
        iters = 0
    else:
        fit = x
        if sample_size is not None and x.numel() > sample_size:
            fit = x[torch.randperm(x.numel(), generator=gen)[:sample_size]]
        centroids = _initial(fit, k, init, gen).to(torch.float64)
        scale = float(fit.max() - fit.min()) or 1.0
        iters = 0
        for iters in range(1, iterations + 1):  # noqa: B007 - the count is reported
            centroids = centroids.sort().values
            new = _update(fit, assign(fit, centroids), centroids)
            moved = float((new - centroids).abs().max())
            centroids = new
            if moved <= tol * scale:
                break
        centroids = centroids.sort().values
        centroids = _update(x, assign(x, centroids), centroids).sort().values
    indices = assign(x, centroids)
    used = torch.bincount(indices, minlength=centroids.numel()) > 0
    if not bool(used.all()):  # drop empty clusters and renumber
        remap = torch.cumsum(used.to(torch.int64), 0) - 1
        indices = remap[indices]
        centroids = centroids[used]
    centroids32 = centroids.to(torch.float32)
    kk = centroids32.numel()
    counts = torch.bincount(indices, minlength=kk).to(torch.float64)
    residual = x - centroids32.to(torch.float64)[indices]
    variance = torch.bincount(indices, weights=residual * residual, minlength=kk) / counts
    return Clustering(indices=indices.to(torch.int64), centroids=centroids32,
                      spreads=variance.sqrt().to(torch.float32), iterations=iters)
