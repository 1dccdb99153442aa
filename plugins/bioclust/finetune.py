"""Optional centroid fine-tuning with shared gradients (Deep Compression, Han et al. 2016).

Every weight of cluster i is ``centroid[i] + perturbation``; the gradient of the loss with
respect to ``centroid[i]`` is the sum of the gradients of its weights, so only the k centroids
per layer are trained and the weights stay shared (the perturbation stays the one selected).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from netshrink import CompressionContext, FinetuneConfig, train
from netshrink.plugins.bioclust.search import Candidate, Target


class SharedWeights(nn.Module):
    """``model`` with each target's weights computed from its centroids, so that autograd sums
    the gradients of a cluster's weights into its centroid. ``model`` is no submodule: the
    centroids are the only parameters, and its mode (eval: BatchNorm statistics and dropout stay
    as they are) does not change while they train."""

    def __init__(self, model: nn.Module, targets: list[Target], offsets: list[torch.Tensor]):
        super().__init__()
        self.net, self.targets = (model,), targets
        self.centroids = nn.ParameterList(t.clustering.centroids.clone() for t in targets)
        # Index tensors where the model runs (train() moves the centroids there too).
        self.parts = [(t.clustering.indices.to(t.param.device), off.to(t.param.device),
                       None if t.positions is None else t.positions.to(t.param.device))
                      for t, off in zip(targets, offsets)]

    def weights(self) -> dict[str, torch.Tensor]:
        """Each target's tensor: centroid + perturbation (zeros where an earlier step pruned)."""
        out = {}
        for t, c, (index, offset, positions) in zip(self.targets, self.centroids, self.parts):
            values = c.index_select(0, index) + offset
            if positions is not None:
                values = values.new_zeros(t.original.numel()).index_put((positions,), values)
            out[t.tensor_name] = values.to(t.param.dtype).reshape(t.param.shape)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.net[0], self.weights(), (x,))


def finetune_centroids(targets: list[Target], chosen: Candidate, model: torch.nn.Module,
                       ctx: CompressionContext, *, epochs: int, lr: float, distribution: str,
                       eval_limit: int | None = None) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Train the centroids of ``targets`` for ``epochs`` on the training split and return the
    centroids with the best validation accuracy (the starting ones included) and a history.

    The model runs in eval mode so BatchNorm statistics and dropout stay as they are: only the
    centroids change.
    """
    data = ctx.require_data()  # a clear error naming the step when no data was given
    # The chosen perturbation, fixed: (decoded - centroid[idx]) computed the way Codebook does.
    offsets = []
    for t, seed, scale in zip(targets, chosen.seeds, chosen.scales):
        cb = t.codebook(seed, scale, distribution)
        if cb.perturbed:
            offsets.append(np.float32(cb.noise_scale) * cb.spreads[cb.indices] * cb.noise())
        else:
            offsets.append(torch.zeros(cb.indices.numel()))
    shared = SharedWeights(model, targets, offsets)
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():  # the centroids get their gradients through `shared`
        p.requires_grad_(False)
    model.eval()
    try:
        history = train(
            shared, data, FinetuneConfig(epochs=epochs, batch_size=64),
            seed=ctx.seed, device=ctx.device,
            desc=f"[{ctx.step_index}] {ctx.step_name}: centroid fine-tune",
            optimizer=lambda m: torch.optim.Adam(m.parameters(), lr=lr),
            validate=lambda state: ctx.evaluate(state.model, "val", limit=eval_limit))
    finally:
        for p, flag in saved_flags:
            p.requires_grad_(flag)
    return [c.detach().cpu().clone() for c in shared.centroids], history
