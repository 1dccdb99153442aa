"""``snip``: single-shot pruning by connection sensitivity, an example netshrink plugin.

SNIP (Lee, Ajanthan and Torr, "SNIP: Single-shot Network Pruning based on Connection
Sensitivity", ICLR 2019, https://arxiv.org/abs/1810.02340) scores every weight by how much the
loss reacts to removing it, estimated from one mini-batch: ``s = |dL/dw * w|``. The weights with
the smallest scores go, over all selected layers at once (or per layer), and the rest are
stored sparse. The paper prunes at initialisation; netshrink applies it to any model, and a
fine-tune after it recovers accuracy on a trained one.

This distribution is the worked example of docs/plugins/tutorial.md.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

import netshrink
from netshrink import Capabilities, Compressor, CompressorConfig, LayerRecord, Sparse, StepResult

__version__ = "0.1.0"


class SnipConfig(CompressorConfig):
    """Configuration of :class:`Snip`."""

    sparsity: float = Field(
        0.9, ge=0.0, lt=1.0,
        description="Fraction of the selected weights to remove (over all selected layers, or "
        "per layer with scope 'layer').")
    scope: Literal["global", "layer"] = Field(
        "global", description="'global': one ranking over all selected layers, as in the paper "
        "(layers lose different fractions); 'layer': every layer loses `sparsity`.")
    batches: int = Field(
        1, ge=1, le=1000,
        description="Training mini-batches whose gradients are averaged for the scores "
        "(the paper uses one).")
    batch_size: int = Field(128, ge=1, le=4096, description="Mini-batch size for the scores.")


def sensitivities(model: nn.Module, layers: list[tuple[str, nn.Module]], ctx: Any,
                  batches: int, batch_size: int) -> dict[str, torch.Tensor]:
    """``|g * w|`` per selected layer, with ``g`` the loss gradient averaged over ``batches``
    training mini-batches (drawn in a seeded order)."""
    weights = [module.weight for _, module in layers]
    grads = [torch.zeros_like(w) for w in weights]
    was_training = model.training
    # Eval mode: the scores need gradients, not BatchNorm statistics updates (which would
    # change tensors this step does not record).
    model.eval()
    seen = 0
    try:
        for x, y in ctx.loader("train", batch_size=batch_size, shuffle=True):
            loss = F.cross_entropy(model(x.to(ctx.device)), y.to(ctx.device))
            for acc, g in zip(grads, torch.autograd.grad(loss, weights)):
                acc += g.detach()
            seen += 1
            if seen >= batches:
                break
    finally:
        model.train(was_training)
    return {name: (g / max(seen, 1) * w.detach()).abs().cpu()
            for (name, _), g, w in zip(layers, grads, weights)}


def _keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the ``1 - sparsity`` highest scores (exactly that many; ties broken by position)."""
    flat = scores.reshape(-1)
    drop = round(sparsity * flat.numel())
    mask = torch.ones_like(flat, dtype=torch.bool)
    if drop > 0:
        # A stable sort makes tie-breaking (e.g. among zero scores) deterministic.
        order = torch.sort(flat, stable=True).indices
        mask[order[:drop]] = False
    return mask.reshape(scores.shape)


class Snip(Compressor):
    """SNIP: prune the weights whose removal changes the loss least (|gradient x weight|)."""

    name = "snip"
    Config = SnipConfig
    capabilities = Capabilities(handles=("Linear", "Conv2d"), needs_data=True, needs_finetune=True)
    paper = (
        'Lee, Ajanthan, Torr, "SNIP: Single-shot Network Pruning based on Connection '
        'Sensitivity", ICLR 2019, https://arxiv.org/abs/1810.02340'
    )
    config: SnipConfig

    def compress(self, model, layers, ctx) -> StepResult:
        cfg = self.config
        scores = sensitivities(model, layers, ctx, cfg.batches, cfg.batch_size)
        for name, _ in layers:
            previous = ctx.encoding_of(f"{name}.weight")
            if isinstance(previous, Sparse):  # weights an earlier step removed stay removed
                scores[name] = scores[name] * previous.mask()
        if cfg.scope == "global":
            flat = torch.cat([s.reshape(-1) for s in scores.values()])
            keep = _keep_mask(flat, cfg.sparsity)
            masks, start = {}, 0
            for name, s in scores.items():
                masks[name] = keep[start:start + s.numel()].reshape(s.shape)
                start += s.numel()
        else:
            masks = {name: _keep_mask(s, cfg.sparsity) for name, s in scores.items()}
        records = []
        for name, _ in ctx.progress(layers, desc="prune"):
            mask = ctx.prune(model, f"{name}.weight", masks[name])  # stored sparse, zeros kept
            records.append(LayerRecord(
                name, {"sparsity": round(1 - float(mask.float().mean()), 6)}))
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        return StepResult(model, records, {"sparsity": round(1 - kept / total, 6),
                                           "batches": cfg.batches})


@netshrink.hookimpl
def register_compressors(register):
    """Register the ``snip`` compressor."""
    register(Snip)
