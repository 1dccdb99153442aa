"""Low-rank matrices: a truncated SVD into two balanced factors, and the choice of its rank
(a ratio, an energy threshold, or VBMF: Nakajima et al., JMLR 2013, the empirical variational
Bayesian estimate Kim et al., https://arxiv.org/abs/1511.06530, use for Tucker-2)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

Matrix = torch.Tensor | np.ndarray


class LowRank(NamedTuple):
    """``matrix ~ left @ right`` (float64), with all the singular values (descending)."""

    left: torch.Tensor  # (rows, rank): U_r * sqrt(s_r)
    right: torch.Tensor  # (rank, cols): sqrt(s_r) * Vh_r
    singular_values: torch.Tensor

    @property
    def rank(self) -> int:
        """The rank kept."""
        return self.right.shape[0]


def truncated_svd(matrix: torch.Tensor, rank: int | Callable[[torch.Tensor], int]) -> LowRank:
    """Factor a 2-D ``matrix`` by an SVD in float64, ``sqrt(s)`` into each factor (similar scales
    for fine-tuning). ``rank``: an int, or a function of the singular values that returns one.
    The Frobenius error of ``left @ right`` is ``sqrt(sum(s[rank:] ** 2))``."""
    if matrix.dim() != 2:
        raise ValueError(f"truncated_svd needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    u, s, vh = torch.linalg.svd(matrix.detach().double(), full_matrices=False)
    r = int(rank(s)) if callable(rank) else rank
    if not 1 <= r <= s.numel():
        raise ValueError(f"rank must be in [1, {s.numel()}] for a {tuple(matrix.shape)} matrix, "
                         f"got {r}")
    root = s[:r].sqrt()
    return LowRank(u[:, :r] * root[None, :], root[:, None] * vh[:r], s)


def singular_values(matrix: Matrix) -> np.ndarray:
    """Singular values (descending, float64) from the Gram matrix of the shorter side: cheap for
    wide unfoldings; tiny values lose relative precision, not their share of the energy."""
    m = _float64(matrix)
    m = m if m.shape[0] <= m.shape[1] else m.T
    values = np.linalg.eigvalsh(m @ m.T)[::-1]
    return np.sqrt(np.clip(values, 0.0, None))


def rank_by_ratio(size: int, ratio: float) -> int:
    """``ceil(ratio * size)``, between 1 and ``size``."""
    return max(1, min(size, math.ceil(ratio * size)))


def rank_by_energy(singular_values: Matrix, energy: float) -> int:
    """Smallest rank whose singular values hold ``energy`` of the squared total (1e-12 slack for
    rounding in the cumulative sum; 1 for an all-zero spectrum)."""
    power = _float64(singular_values) ** 2
    total = power.sum()
    if total <= 0:
        return 1
    cumulative = np.cumsum(power) / total
    return int(min(np.searchsorted(cumulative, energy - 1e-12) + 1, len(power)))


def rank_by_vbmf(matrix: Matrix) -> int:
    """The rank empirical VBMF keeps for ``matrix`` (0 when it judges it all noise): the noise
    variance minimises the free energy, singular values above the analytic threshold stay."""
    from scipy.optimize import minimize_scalar  # lazily: scipy is slow to import

    y = _float64(matrix)
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


def _float64(values: Matrix) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)
