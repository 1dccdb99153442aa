"""Rank selection for Tucker-2 and SVD: a ratio, an energy threshold, or VBMF.

VBMF is the empirical variational Bayesian matrix factorisation of Nakajima et al., "Global
analytic solution of fully-observed variational Bayesian matrix factorization" (JMLR 2013): the
noise variance is estimated by minimising the free energy, and singular values above the
analytic threshold are kept. It is the rank estimate used by Kim et al. (ICLR 2016) for Tucker-2
compression of convolutions.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar

from netshrink.plugins.tucker.factorize import singular_values


def rank_by_ratio(size: int, ratio: float) -> int:
    """``ceil(ratio * size)``, at least 1."""
    return max(1, math.ceil(ratio * size))


def rank_by_energy(singular_values: np.ndarray, energy: float) -> int:
    """Smallest rank whose singular values hold ``energy`` of the squared total."""
    power = np.asarray(singular_values, dtype=np.float64) ** 2
    total = power.sum()
    if total <= 0:
        return 1
    cumulative = np.cumsum(power) / total
    return int(min(np.searchsorted(cumulative, energy - 1e-12) + 1, len(power)))


def rank_by_vbmf(matrix: np.ndarray) -> int:
    """The rank EVBMF keeps for ``matrix`` (0 when it judges it all noise)."""
    y = np.asarray(matrix, dtype=np.float64)
    if y.shape[0] > y.shape[1]:
        y = y.T
    rows, cols = y.shape  # rows <= cols
    if rows < 2:
        return rows
    s = singular_values(y)
    alpha = rows / cols
    tau_bar = 2.5129 * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    # Upper bound on the number of signal components (Nakajima et al., Theorem 5).
    h_ub = min(math.ceil(rows / (1 + alpha)) - 1, rows) - 1
    h_ub = max(0, min(h_ub, rows - 2))
    upper = float((s**2).sum()) / (rows * cols)
    lower = max(float(s[h_ub + 1] ** 2) / (cols * x_bar), float(np.mean(s[h_ub + 1:] ** 2)) / cols)
    if not (upper > 0 and lower > 0) or lower >= upper:
        return rows
    result = minimize_scalar(_free_energy, args=(rows, cols, s, x_bar), bounds=(lower, upper),
                             method="bounded")
    sigma2 = float(result.x)
    threshold = math.sqrt(cols * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    return int((s > threshold).sum())


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    return 0.5 * (x - (1 + alpha) + np.sqrt(np.maximum((x - (1 + alpha)) ** 2 - 4 * alpha, 0)))


def _free_energy(sigma2: float, rows: int, cols: int, s: np.ndarray, x_bar: float) -> float:
    """EVBMF free energy as a function of the noise variance (rows <= cols, full SVD)."""
    alpha = rows / cols
    x = s**2 / (cols * sigma2)
    big, small = x[x > x_bar], x[x <= x_bar]
    tau = _tau(big, alpha)
    value = np.sum(small - np.log(small)) + np.sum(big - tau)
    value += np.sum(np.log((tau + 1) / big)) + alpha * np.sum(np.log(tau / alpha + 1))
    return float(value)
