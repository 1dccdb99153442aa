"""Building the factorised replacements: Tucker-2 for Conv2d, two factors of a truncated SVD
(``netshrink.truncated_svd``) for Linear and 1x1 convs. Every replacement is an
``nn.Sequential`` of plain ``nn.Conv2d``/``nn.Linear`` modules."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def tucker2(weight: torch.Tensor, rank_out: int, rank_in: int, *, n_iter_max: int, tol: float,
            seed: int, backend: str = "gram") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HOOI over the output/input channel modes: ``W ~ core x0 U_out x1 U_in``.

    Returns ``core (R_out, R_in, kh, kw)``, ``U_out (O, R_out)``, ``U_in (I, R_in)`` (float64).
    ``backend="tensorly"`` calls ``tensorly.decomposition.partial_tucker`` (numpy backend, set
    in a context so the global backend is left alone); ``"gram"`` runs the same HOOI iterations
    with the leading singular vectors taken from eigendecompositions of the small Gram matrices,
    which is ~10x faster than the full SVDs of wide unfoldings on a CPU.
    """
    array = weight.detach().cpu().double().numpy()
    if backend == "tensorly":
        import tensorly as tl
        from tensorly.decomposition import partial_tucker

        with tl.backend_context("numpy"):
            (core, factors), _ = partial_tucker(array, rank=[rank_out, rank_in], modes=[0, 1],
                                                n_iter_max=n_iter_max, init="svd", tol=tol,
                                                random_state=seed)
        return np.asarray(core), np.asarray(factors[0]), np.asarray(factors[1])
    return _hooi_gram(array, rank_out, rank_in, n_iter_max, tol)


def _hooi_gram(w: np.ndarray, rank_out: int, rank_in: int, n_iter_max: int,
               tol: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    o, i = w.shape[:2]
    # float32 products (2x faster on CPU); eigendecompositions of the Gram matrices in float64
    t = torch.from_numpy(w).float().reshape(o, i, -1)  # (O, I, K), K = kh*kw
    norm = max(float(t.norm()), 1e-300)
    u_out = _leading(t.reshape(o, -1), rank_out)  # HOSVD initialisation
    u_in = _leading(t.transpose(0, 1).reshape(i, -1), rank_in)
    previous = float("inf")
    for _ in range(n_iter_max):
        y = torch.einsum("oik,ib->obk", t, u_in)  # W x1 U_in^T
        u_out = _leading(y.reshape(o, -1), rank_out)
        z = torch.einsum("oik,oa->iak", t, u_out)  # W x0 U_out^T, input mode first
        u_in = _leading(z.reshape(i, -1), rank_in)
        core = torch.einsum("iak,ib->abk", z, u_in)
        # orthonormal factors: ||W - W_hat||^2 = ||W||^2 - ||core||^2
        error = max(norm**2 - float(core.pow(2).sum()), 0.0) ** 0.5 / norm
        if abs(previous - error) < tol:
            break
        previous = error
    core = torch.einsum("oik,oa,ib->abk", t, u_out, u_in)
    return (core.reshape(rank_out, rank_in, *w.shape[2:]).double().numpy(),
            u_out.double().numpy(), u_in.double().numpy())


def _leading(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` leading left singular vectors of ``matrix`` (eigenvectors of its Gram)."""
    _, vectors = torch.linalg.eigh((matrix @ matrix.T).double())
    return vectors.flip(1)[:, :rank].to(matrix.dtype).contiguous()


def tucker2_conv(conv: nn.Conv2d, core: np.ndarray, u_out: np.ndarray,
                 u_in: np.ndarray) -> nn.Sequential:
    """``Conv 1x1 reduce -> Conv kxk core (original stride/padding/dilation) -> Conv 1x1 restore
    (original bias)``."""
    r_out, r_in = core.shape[:2]
    like = {"device": conv.weight.device, "dtype": conv.weight.dtype}
    reduce = nn.Conv2d(conv.in_channels, r_in, 1, bias=False, **like)
    middle = nn.Conv2d(r_in, r_out, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                       dilation=conv.dilation, bias=False, padding_mode=conv.padding_mode, **like)
    restore = nn.Conv2d(r_out, conv.out_channels, 1, bias=conv.bias is not None, **like)
    with torch.no_grad():
        reduce.weight.copy_(_tensor(u_in.T[:, :, None, None], like))
        middle.weight.copy_(_tensor(core, like))
        restore.weight.copy_(_tensor(u_out[:, :, None, None], like))
        if conv.bias is not None:
            restore.bias.copy_(conv.bias.detach())
    return nn.Sequential(reduce, middle, restore)


def svd_linear(linear: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> nn.Sequential:
    """``Linear(in, r, bias=False) -> Linear(r, out)`` (original bias), from ``W ~ a @ b``."""
    like = {"device": linear.weight.device, "dtype": linear.weight.dtype}
    rank = b.shape[0]
    first = nn.Linear(linear.in_features, rank, bias=False, **like)
    second = nn.Linear(rank, linear.out_features, bias=linear.bias is not None, **like)
    with torch.no_grad():
        first.weight.copy_(_tensor(b, like))
        second.weight.copy_(_tensor(a, like))
        if linear.bias is not None:
            second.bias.copy_(linear.bias.detach())
    return nn.Sequential(first, second)


def svd_pointwise(conv: nn.Conv2d, a: torch.Tensor, b: torch.Tensor) -> nn.Sequential:
    """A 1x1 conv as two 1x1 convs: ``in -> r`` (original stride/padding) then ``r -> out``."""
    like = {"device": conv.weight.device, "dtype": conv.weight.dtype}
    rank = b.shape[0]
    first = nn.Conv2d(conv.in_channels, rank, 1, stride=conv.stride, padding=conv.padding,
                      dilation=conv.dilation, bias=False, padding_mode=conv.padding_mode, **like)
    second = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None, **like)
    with torch.no_grad():
        first.weight.copy_(_tensor(b[:, :, None, None], like))
        second.weight.copy_(_tensor(a[:, :, None, None], like))
        if conv.bias is not None:
            second.bias.copy_(conv.bias.detach())
    return nn.Sequential(first, second)


def tucker2_params(conv: nn.Conv2d, r_out: int, r_in: int) -> int:
    """Parameters of the Tucker-2 replacement."""
    kh, kw = conv.kernel_size
    bias = conv.out_channels if conv.bias is not None else 0
    return conv.in_channels * r_in + r_in * r_out * kh * kw + r_out * conv.out_channels + bias


def svd_params(rows: int, cols: int, rank: int, bias: bool) -> int:
    """Parameters of a rank-``rank`` factorisation of a ``rows x cols`` matrix (+ bias)."""
    return rank * (rows + cols) + (rows if bias else 0)


def tucker2_error(weight: torch.Tensor, core: np.ndarray, u_out: np.ndarray,
                  u_in: np.ndarray) -> float:
    """Relative weight-space error ``||W - core x0 U_out x1 U_in|| / ||W||``."""
    w = weight.detach().cpu().double()
    approx = torch.einsum("abk,oa,ib->oik", torch.from_numpy(core).flatten(2),
                          torch.from_numpy(u_out), torch.from_numpy(u_in))
    return float((w.flatten(2) - approx).norm() / max(float(w.norm()), 1e-12))


def _tensor(array: np.ndarray | torch.Tensor, like: dict) -> torch.Tensor:
    array = np.ascontiguousarray(array) if isinstance(array, np.ndarray) else array
    return torch.as_tensor(array, **like)
