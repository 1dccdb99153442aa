"""The search's solver: one candidate per layer minimising the summed cost under a byte budget
(a multiple-choice knapsack by dynamic programming; with a MACs or latency budget too, a
MILP through ``scipy.optimize.milp``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from netshrink.errors import ConfigError


def solve(
    costs: Sequence[Sequence[float]],
    sizes: Sequence[Sequence[int]],
    budget: int,
    *,
    macs: Sequence[Sequence[int]] | None = None,
    max_macs: int | None = None,
    latency: Sequence[Sequence[float]] | None = None,
    max_latency: float | None = None,
    resolution: int = 4096,
) -> list[int] | None:
    """One choice per group minimising the summed cost with summed size ≤ ``budget`` (and
    summed ``macs`` ≤ ``max_macs``, summed ``latency`` ≤ ``max_latency`` if given); the chosen
    index per group, or None when no choice fits.

    Without a MACs or latency budget: dynamic programming over sizes in ``budget /
    resolution`` buckets, each size rounded *up* (a choice found always fits exactly; ties go
    to the earlier option). With one: a MILP through ``scipy.optimize.milp``, one row per
    budget."""
    if budget < 0 or (max_latency is not None and max_latency < 0):
        return None
    if max_macs is not None or max_latency is not None:
        rows: list[tuple[Sequence[Sequence[float]], float]] = []
        if max_macs is not None:
            rows.append((macs or [], max_macs))
        if max_latency is not None:
            rows.append((latency or [], max_latency))
        return _solve_milp(costs, sizes, budget, rows)
    unit = max(1, math.ceil(budget / resolution))
    capacity = budget // unit
    best = np.zeros(capacity + 1)  # best[c]: least cost of the groups so far within c units
    picks: list[np.ndarray] = []
    for group_costs, group_sizes in zip(costs, sizes, strict=True):
        new = np.full(capacity + 1, np.inf)
        pick = np.full(capacity + 1, -1)
        for index, (cost, size) in enumerate(zip(group_costs, group_sizes, strict=True)):
            w = math.ceil(size / unit)
            if w > capacity:
                continue
            shifted = np.full(capacity + 1, np.inf)
            shifted[w:] = best[: capacity + 1 - w] + cost
            better = shifted < new
            new[better] = shifted[better]
            pick[better] = index
        best = new
        picks.append(pick)
    if not np.isfinite(best[capacity]):
        return None
    chosen: list[int] = []
    c = capacity
    for group_sizes, pick in zip(reversed(list(sizes)), reversed(picks), strict=True):
        index = int(pick[c])
        chosen.append(index)
        c -= math.ceil(group_sizes[index] / unit)
    return chosen[::-1]


def _solve_milp(
    costs: Sequence[Sequence[float]],
    sizes: Sequence[Sequence[int]],
    budget: int,
    extra: Sequence[tuple[Sequence[Sequence[float]], float]],
) -> list[int] | None:
    """The MILP: one choice per group, bytes ≤ ``budget`` and, per ``(values, limit)`` of
    ``extra`` (MACs, latency), the summed values ≤ ``limit``."""
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError:
        raise ConfigError("a MACs or latency budget needs scipy (pip install scipy)") from None
    flat = [(g, i) for g, group in enumerate(costs) for i in range(len(group))]
    n = len(flat)
    one = np.zeros((len(costs), n))
    for j, (g, _) in enumerate(flat):
        one[g, j] = 1
    rows = [[float(sizes[g][i]) for g, i in flat]]
    limits = [float(budget)]
    for values, limit in extra:
        # Each row scaled by its limit: latencies are microseconds, and the solver's absolute
        # feasibility tolerance (1e-7) must stay far below a row's resolution.
        scale = float(limit) if limit > 0 else 1.0
        rows.append([values[g][i] / scale for g, i in flat])
        limits.append(limit / scale)
    res = milp(
        c=np.array([costs[g][i] for g, i in flat]),
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
        constraints=[
            LinearConstraint(one, 1, 1),
            LinearConstraint(np.array(rows), -np.inf, np.array(limits)),
        ],
    )
    if res.x is None:
        return None
    x = np.round(res.x).astype(int)
    chosen = [0] * len(costs)
    for (g, i), v in zip(flat, x, strict=True):
        if v:
            chosen[g] = i
    return chosen


__all__ = [
    "solve",
]
