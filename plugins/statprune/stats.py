"""Per-filter statistics and the clustering that separates weak filters (paper 002, step 1).

A filter's statistics are computed over all its weights (``weight[c]``). The paper judges a
filter by the mean and the variance of its weights; ``|mean|``, L1 and L2 norms can be added.
Filters are clustered in that (standardised) space; the cluster(s) whose members have the
smallest RMS weight, ``sqrt(mean**2 + var)``, are the weak ones. RMS is the one quantity both
statistics feed into (``E[w^2] = mean^2 + var``): a filter with small mean and small variance
barely responds to its input.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

Feature = Literal["mean", "var", "abs_mean", "l1", "l2"]
ClusterMethod = Literal["kmeans", "gmm"]


def filter_features(weight: torch.Tensor, features: list[Feature]) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel: a ``(C, len(features))`` matrix and the RMS strength ``(C,)``."""
    w = weight.detach().float().cpu().reshape(weight.shape[0], -1)
    mean = w.mean(1)
    var = w.var(1, unbiased=False)
    columns = {
        "mean": mean,
        "var": var,
        "abs_mean": w.abs().mean(1),
        "l1": w.abs().sum(1),
        "l2": w.pow(2).sum(1).sqrt(),
    }
    table = torch.stack([columns[f] for f in features], 1).double().numpy()
    strength = (mean.pow(2) + var).sqrt().double().numpy()
    return table, strength


def standardise(table: np.ndarray) -> np.ndarray:
    """Z-score every column (constant columns become zero) so no statistic dominates k-means."""
    std = table.std(0)
    std[std == 0] = 1.0
    return (table - table.mean(0)) / std


def weak_channels(table: np.ndarray, strength: np.ndarray, *, method: ClusterMethod,
                  clusters: int, drop_clusters: int, max_remove: int,
                  seed: int) -> tuple[np.ndarray, dict[str, object]]:
    """Indices of weak channels (weakest first) and a summary of the clustering.

    ``table`` is already standardised; at most ``max_remove`` channels are returned (the floor on
    kept channels), the weakest by ``strength`` when the weak clusters hold more.
    """
    n = len(strength)
    info: dict[str, object] = {"clusters": clusters}
    if n < clusters or max_remove <= 0:
        return np.zeros(0, dtype=np.int64), info
    labels = _cluster(table, method, clusters, seed)
    present = sorted(set(labels.tolist()))
    # clusters ordered by the mean RMS strength of their members, weakest first
    order = sorted(present, key=lambda c: float(strength[labels == c].mean()))
    weak_set = order[: min(drop_clusters, len(order) - 1)]
    weak = np.flatnonzero(np.isin(labels, weak_set))
    info["cluster_sizes"] = [int((labels == c).sum()) for c in order]
    info["cluster_rms"] = [round(float(strength[labels == c].mean()), 6) for c in order]
    weak = weak[np.argsort(strength[weak], kind="stable")]
    return weak[:max_remove], info


def _cluster(table: np.ndarray, method: ClusterMethod, clusters: int, seed: int) -> np.ndarray:
    """Cluster labels of the rows of ``table``."""
    if np.allclose(table, table[0]):
        return np.zeros(len(table), dtype=np.int64)  # nothing to separate
    if method == "gmm":
        from sklearn.mixture import GaussianMixture

        gmm = GaussianMixture(n_components=clusters, random_state=seed, reg_covar=1e-4)
        return gmm.fit_predict(table)
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=clusters, n_init=4, random_state=seed).fit_predict(table)


def removal_budget(channels: int, min_keep_ratio: float, min_keep_channels: int,
                   round_to: int) -> int:
    """How many of ``channels`` may go: the floor keeps ``max(ceil(ratio*C), min_keep)``."""
    keep = max(math.ceil(min_keep_ratio * channels), min_keep_channels, 1)
    if round_to > 1:
        keep = _round_up(keep, round_to, channels)
    return max(channels - keep, 0)


def round_removal(channels: int, remove: int, round_to: int) -> int:
    """Reduce ``remove`` so the kept count is a multiple of ``round_to`` (or all channels)."""
    if round_to <= 1 or remove <= 0:
        return remove
    kept = _round_up(channels - remove, round_to, channels)
    return channels - kept


def _round_up(value: int, multiple: int, cap: int) -> int:
    return min(int(math.ceil(value / multiple) * multiple), cap)
