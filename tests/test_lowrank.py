"""netshrink.lowrank: truncated SVD into balanced factors, and rank choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import netshrink as ns
from netshrink.lowrank import (
    rank_by_energy,
    rank_by_ratio,
    rank_by_vbmf,
    singular_values,
    truncated_svd,
)


def _with_spectrum(s: list[float], rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A ``rows x cols`` float64 matrix whose singular values are exactly ``s`` (then zeros)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(s), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("shape, rank", [((30, 20), 7), ((12, 40), 12), ((25, 25), 1)])
def test_error_is_the_discarded_energy_and_factors_are_balanced(shape, rank):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    left, right, s = truncated_svd(w, rank)
    assert left.shape == (shape[0], rank) and right.shape == (rank, shape[1])
    assert left.dtype == right.dtype == torch.float64
    assert torch.allclose(s, torch.linalg.svdvals(w.double()))
    error = float((w.double() - left @ right).norm())
    assert error == pytest.approx(float(s[rank:].pow(2).sum().sqrt()), rel=1e-9, abs=1e-12)
    # sqrt(s) in each factor: column i of left and row i of right both have norm sqrt(s_i)
    assert torch.allclose(left.norm(dim=0), s[:rank].sqrt())
    assert torch.allclose(right.norm(dim=1), s[:rank].sqrt())


def test_rank_from_the_spectrum_in_one_decomposition():
    w = _with_spectrum([5.0, 4.0, 3.0, 0.1], 20, 30)
    seen = []
    factors = truncated_svd(w, lambda s: seen.append(s) or rank_by_energy(s, 0.99))
    assert factors.rank == 3 and len(seen) == 1 and factors.singular_values is seen[0]
    assert float((w - factors.left @ factors.right).norm()) == pytest.approx(0.1, rel=1e-9)


@pytest.mark.parametrize("bad", [0, 21, lambda s: 0])
def test_rank_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match=r"rank must be in \[1, 20\].*got"):
        truncated_svd(torch.randn(20, 30), bad)


def test_only_matrices():
    with pytest.raises(ValueError, match=r"2-D matrix, got shape \(4, 3, 3\)"):
        truncated_svd(torch.randn(4, 3, 3), 1)


@pytest.mark.parametrize("energy, expected", [
    (0.3, 1), (0.5, 1), (0.8, 2), (0.81, 3), (0.9, 3), (0.96, 4), (0.99, 5), (1.0, 5),
])
def test_rank_by_energy_on_a_constructed_spectrum(energy, expected):
    power = [50.0, 30.0, 10.0, 6.0, 4.0]  # squared singular values, 100 in all
    s = np.sqrt(power)
    assert rank_by_energy(s, energy) == expected  # 0.8 is exactly the first two: 2, not 3
    assert rank_by_energy(torch.from_numpy(s), energy) == expected
    # the same ranks from a matrix with that spectrum, by either route to its singular values
    w = _with_spectrum(list(s), 9, 14)
    assert rank_by_energy(singular_values(w), energy) == expected
    assert rank_by_energy(truncated_svd(w, 1).singular_values, energy) == expected


def test_rank_by_energy_of_nothing_is_one():
    assert rank_by_energy(np.zeros(6), 0.9) == 1


@pytest.mark.parametrize("size, ratio, expected", [
    (10, 0.25, 3), (10, 1.0, 10), (10, 0.01, 1), (1, 0.5, 1), (24, 0.25, 6), (7, 0.5, 4),
])
def test_rank_by_ratio(size, ratio, expected):
    assert rank_by_ratio(size, ratio) == expected


def test_rank_by_ratio_stays_in_bounds():
    for size in range(1, 65):
        for ratio in np.linspace(1e-3, 1.0, 37):
            rank = rank_by_ratio(size, float(ratio))
            assert 1 <= rank <= size and rank >= ratio * size - 1e-9, (size, ratio, rank)


@pytest.mark.parametrize("shape", [(8, 30), (30, 8), (16, 16)])
def test_singular_values_match_the_svd(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    s = singular_values(w)
    assert s.shape == (min(shape),) and np.all(np.diff(s) <= 0)
    np.testing.assert_allclose(s, torch.linalg.svdvals(w).numpy(), rtol=1e-8)
    np.testing.assert_allclose(singular_values(w.numpy()), s)


def test_vbmf_finds_the_signal_rank_either_way_round():
    rng = np.random.default_rng(1)
    signal = rng.normal(size=(48, 3)) @ rng.normal(size=(3, 200))
    noisy = signal + 0.1 * rng.normal(size=(48, 200))
    ranks = [rank_by_vbmf(noisy), rank_by_vbmf(noisy.T), rank_by_vbmf(torch.from_numpy(noisy))]
    assert ranks == [3, 3, 3]


def test_public_api():
    for name in ("LowRank", "rank_by_energy", "rank_by_ratio", "rank_by_vbmf", "singular_values",
                 "truncated_svd"):
        assert name in ns.__all__ and getattr(ns, name) is getattr(ns.lowrank, name)
