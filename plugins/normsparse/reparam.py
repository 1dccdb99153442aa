"""The norm x direction reparametrisation ``w = r * u`` as a ``torch.nn.utils.parametrize`` wrapper.

A Linear layer's weight ``[out, in]`` gets one magnitude per output neuron (row); a convolution's
weight ``[out, in/groups, *kernel]`` gets one magnitude per (output, input) kernel slice. The
direction tensor keeps the weight's shape and is kept on the unit sphere of each row/slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

_EPS = 1e-12


class NormDirection(nn.Module):
    """Parametrization ``weight = r[..., None, ...] * u / ||u||`` with norms over the trailing
    ``dims`` (1 for Linear rows, the kernel dims for conv slices).

    Dividing by ``||u||`` in the forward pass (as weight normalisation does) makes the gradient
    with respect to ``u`` tangent to the sphere; :func:`project_` then puts ``u`` back on the
    sphere exactly after each optimizer step.
    """

    def __init__(self, group_dims: int) -> None:
        super().__init__()
        self.group_dims = group_dims  # leading dims that index one magnitude (1 or 2)

    def _reduce(self, tensor: torch.Tensor) -> tuple[int, ...]:
        return tuple(range(self.group_dims, tensor.dim()))

    def forward(self, r: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        dims = self._reduce(u)
        norm = u.norm(dim=dims, keepdim=True).clamp_min(_EPS)
        return r.reshape(r.shape + (1,) * len(dims)) * (u / norm)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dims = self._reduce(weight)
        r = weight.norm(dim=dims)
        # Rows/slices that are already zero keep a zero direction: they stay zero.
        u = weight / r.clamp_min(_EPS).reshape(r.shape + (1,) * len(dims))
        return r.detach().clone(), u.detach().clone()


@dataclass
class Reparam:
    """One reparametrised layer: its name, module, and whether its magnitudes are penalised."""

    name: str
    module: nn.Module
    kind: str  # "linear" or "conv"
    penalised: bool = True

    @property
    def r(self) -> nn.Parameter:
        """The magnitudes (``[out]`` for Linear, ``[out, in/groups]`` for conv)."""
        return self.module.parametrizations.weight.original0

    @property
    def u(self) -> nn.Parameter:
        """The directions (same shape as the weight)."""
        return self.module.parametrizations.weight.original1

    @property
    def unit_size(self) -> int:
        """Weights controlled by one magnitude (a row, or a kernel slice)."""
        return self.u[0].numel() if self.kind == "linear" else self.u[0, 0].numel()


def attach(name: str, module: nn.Module, penalised: bool = True) -> Reparam:
    """Reparametrise ``module.weight`` as norm x direction (in place)."""
    kind = "linear" if isinstance(module, nn.Linear) else "conv"
    parametrize.register_parametrization(
        module, "weight", NormDirection(1 if kind == "linear" else 2)
    )
    return Reparam(name, module, kind, penalised)


@torch.no_grad()
def project_(rep: Reparam, mask: torch.Tensor | None = None) -> None:
    """Keep ``r >= 0`` (it is a norm) and ``u`` on the unit sphere (zeros kept by ``mask``)."""
    rep.r.clamp_(min=0.0)
    u = rep.u
    if mask is not None:
        u.mul_(mask)
    dims = tuple(range(rep.r.dim(), u.dim()))
    u.div_(u.norm(dim=dims, keepdim=True).clamp_min(_EPS))


def dead_mask(r: torch.Tensor, threshold: float, min_keep: int = 1) -> torch.Tensor:
    """Units to remove: ``r < threshold * max(r)`` over the layer, never all of them.

    For conv magnitudes ``[out, in]`` the mask is per slice; ``min_keep`` still applies to whole
    filters (a filter is kept alive by its largest slice).
    """
    r = r.detach()
    dead = (r < threshold * r.max()) | (r == 0)  # a zero norm is dead even at threshold 0
    if r.dim() == 1:
        if int((~dead).sum()) < min_keep:
            dead[torch.topk(r, min(min_keep, r.numel())).indices] = False
        return dead
    alive_filters = (~dead).any(dim=1)
    if int(alive_filters.sum()) < min_keep:
        best = torch.topk(r.amax(dim=1), min(min_keep, r.shape[0])).indices
        for f in best.tolist():
            dead[f, int(r[f].argmax())] = False
    return dead


def fold(rep: Reparam, dead: torch.Tensor) -> None:
    """Zero the removed magnitudes and replace the wrapper by a plain ``weight`` parameter."""
    with torch.no_grad():
        rep.r.masked_fill_(dead, 0.0)
    parametrize.remove_parametrizations(rep.module, "weight", leave_parametrized=True)
