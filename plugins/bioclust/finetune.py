"""Optional centroid fine-tuning with shared gradients (Deep Compression, Han et al. 2016).

Every weight of cluster i is ``centroid[i] + perturbation``; the gradient of the loss with
respect to ``centroid[i]`` is the sum of the gradients of its weights, so only the k centroids
per layer are trained and the weights stay shared (the perturbation stays the one selected).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from netshrink import CompressionContext
from netshrink.plugins.bioclust.search import Candidate, Target


def finetune_centroids(targets: list[Target], chosen: Candidate, model: torch.nn.Module,
                       ctx: CompressionContext, *, epochs: int, lr: float, distribution: str,
                       eval_limit: int | None = None) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Train the centroids of ``targets`` for ``epochs`` on the training split and return the
    centroids with the best validation accuracy (the starting ones included) and a history.

    The model runs in eval mode so BatchNorm statistics and dropout stay as they are: only the
    centroids change.
    """
    ctx.require_data()  # a clear error naming the step when no data was given
    centroids = [t.clustering.centroids.clone().requires_grad_(True) for t in targets]
    # The chosen perturbation, fixed: (decoded - centroid[idx]) computed the way Codebook does.
    offsets = []
    for t, seed, scale in zip(targets, chosen.seeds, chosen.scales):
        cb = t.codebook(seed, scale, distribution)
        if cb.perturbed:
            offsets.append(np.float32(cb.noise_scale) * cb.spreads[cb.indices] * cb.noise())
        else:
            offsets.append(torch.zeros(cb.indices.numel()))
    trainable = {id(t.param) for t in targets}
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():  # gradients only where centroids need them
        p.requires_grad_(id(p) in trainable)
    opt = torch.optim.Adam(centroids, lr=lr)
    history: dict[str, Any] = {"val_acc": []}

    def write() -> None:
        for t, c, off in zip(targets, centroids, offsets):
            t.write(t.scatter(c.detach()[t.clustering.indices] + off))

    def val() -> float:
        return ctx.evaluate(model, "val", limit=eval_limit)

    try:
        write()
        best_acc, best = val(), [c.detach().clone() for c in centroids]
        history["start_val_acc"] = best_acc
        model.eval()
        for _epoch in ctx.progress(range(epochs), desc="centroid fine-tune", total=epochs):
            for x, y in ctx.loader("train", batch_size=64):
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(x.to(ctx.device)), y.to(ctx.device)).backward()
                for t, c in zip(targets, centroids):
                    grad = t.param.grad.detach().reshape(-1).cpu().float()
                    if t.positions is not None:
                        grad = grad[t.positions]
                    c.grad = torch.zeros_like(c).index_add_(0, t.clustering.indices, grad)
                opt.step()
                write()
            acc = val()
            history["val_acc"].append(acc)
            if acc > best_acc:
                best_acc, best = acc, [c.detach().clone() for c in centroids]
        history["best_val_acc"] = best_acc
    finally:
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        model.zero_grad(set_to_none=True)
    return best, history
