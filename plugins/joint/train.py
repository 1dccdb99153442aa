"""Joint training: masks (gradual magnitude pruning) and fake quantization (straight-through
estimator) are both active in every forward pass, so the weights learn to work pruned *and*
rounded, instead of being pruned, fine-tuned, then quantized after the fact."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from netshrink import CheckpointPolicy, FinetuneConfig, TrainState, train
from netshrink.plugins.joint.allocate import magnitude_mask
from netshrink.plugins.joint.config import JointConfig
from netshrink.plugins.joint.quant import bias_fake_quant, fake_quant, fit_scale


class JointWeight(nn.Module):
    """Parametrization ``w -> fake_quant(w * mask)`` (masked, rounded, straight-through)."""

    def __init__(self, mask: torch.Tensor, bits: int, scale: torch.Tensor) -> None:
        super().__init__()
        self.bits = bits
        self.register_buffer("mask", mask)
        self.register_buffer("scale", scale)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quant(weight * self.mask, self.bits, self.scale)


class BiasQuant(nn.Module):
    """Parametrization rounding a bias the way it will be stored."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        return bias_fake_quant(bias, self.mode)


@dataclass
class LayerPlan:
    """What the training does to one layer: its target sparsity and bit-width."""

    name: str
    module: nn.Module
    sparsity: float
    bits: int
    prior: torch.Tensor | None  # mask of an earlier sparse step (kept pruned)
    channels: int = 1


def _latent(module: nn.Module) -> torch.Tensor:
    return module.parametrizations.weight.original


def latent_weights(plans: list[LayerPlan]) -> dict[str, torch.Tensor]:
    """The trained weights behind the masks and rounding (what the next masks are cut from)."""
    return {plan.name: _latent(plan.module).detach() for plan in plans}


def _scale(weight: torch.Tensor, mask: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
    masked = (weight * mask).detach()
    if plan.bits == 1 or plan.channels == 1:
        return fit_scale(masked[mask], plan.bits)
    return fit_scale(masked, plan.bits, plan.channels)


def set_masks(plans: list[LayerPlan], progress: float) -> None:
    """Masks at ``progress`` in [0, 1] of the cubic ramp (Zhu & Gupta 2017) and refitted scales."""
    ramp = 1.0 - (1.0 - min(max(progress, 0.0), 1.0)) ** 3
    with torch.no_grad():
        for plan in plans:
            weight = _latent(plan.module)
            param = plan.module.parametrizations.weight[0]
            prior = None if plan.prior is None else plan.prior.to(weight.device)
            mask = magnitude_mask(
                weight.cpu(), plan.sparsity * ramp, None if prior is None else prior.cpu()
            ).to(weight.device)
            param.mask.copy_(mask)
            param.scale.copy_(_scale(weight, mask, plan))


def refit_scales(plans: list[LayerPlan]) -> None:
    """Refit every scale to the current latent weights (masks unchanged)."""
    with torch.no_grad():
        for plan in plans:
            param = plan.module.parametrizations.weight[0]
            param.scale.copy_(_scale(_latent(plan.module), param.mask, plan))


def apply_plans(plans: list[LayerPlan], progress: float) -> None:
    """After a re-allocation: each layer trains with its plan's bit-width from now on, its mask
    at ``progress`` of the ramp to its (new) target sparsity, and a scale refitted to both."""
    with torch.no_grad():
        for plan in plans:
            param = plan.module.parametrizations.weight[0]
            param.bits = plan.bits
            # A new buffer, not a copy: the scale's shape follows the bits (1 bit: 2 centroids).
            param.scale = _scale(_latent(plan.module), param.mask, plan)
    set_masks(plans, progress)


def reallocation_steps(ramp: int, count: int) -> list[int]:
    """The optimizer steps after which to re-allocate: ``count`` points evenly inside the
    sparsity ramp of ``ramp`` steps (``k·ramp/(count+1)``), at most one per step. Never after
    the ramp: the checkpoint only keeps states from the end of the ramp on, so every kept
    state has the final allocation, and the last allocation still gets the rest of the ramp
    and the fixed-mask phase to train."""
    return sorted({max(1, round(k * ramp / (count + 1))) for k in range(1, count + 1)})


def attach(plans: list[LayerPlan], bias_mode: str) -> None:
    """Register the mask/quantization parametrizations on every planned layer."""
    for plan in plans:
        weight = plan.module.weight
        mask = (
            plan.prior.clone()
            if plan.prior is not None
            else torch.ones_like(weight, dtype=torch.bool)
        ).to(weight.device)
        scale = _scale(weight, mask, plan)
        parametrize.register_parametrization(
            plan.module, "weight", JointWeight(mask, plan.bits, scale)
        )
        if getattr(plan.module, "bias", None) is not None and bias_mode != "fp32":
            parametrize.register_parametrization(plan.module, "bias", BiasQuant(bias_mode))


def detach(plans: list[LayerPlan]) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Remove the parametrizations (restoring the latent weights); returns each layer's latent
    weight, mask and scale for export."""
    out = {}
    for plan in plans:
        param = plan.module.parametrizations.weight[0]
        out[plan.name] = (
            _latent(plan.module).detach().cpu().clone(),
            param.mask.detach().cpu().clone(),
            param.scale.detach().cpu().clone(),
        )
        parametrize.remove_parametrizations(plan.module, "weight", leave_parametrized=False)
        if parametrize.is_parametrized(plan.module, "bias"):
            parametrize.remove_parametrizations(plan.module, "bias", leave_parametrized=False)
    return out


def joint_train(
    model: nn.Module,
    plans: list[LayerPlan],
    ctx,
    cfg: JointConfig,
    seed: int,
    reallocate: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` with the parametrizations attached; keeps the best validation state once
    every layer has reached its target sparsity. Returns the history (``reallocated_at``: the
    steps re-allocated after).

    ``reallocate(step)``, called ``cfg.reallocate`` times during the ramp (see
    :func:`reallocation_steps`), sets new ``sparsity``/``bits`` on the plans; the masks and
    quantizers follow at once (:func:`apply_plans`)."""
    if cfg.epochs == 0:
        set_masks(plans, 1.0)
        return {"val_acc": [], "loss": [], "best_val_acc": ctx.evaluate(model, "val")}
    data = ctx.require_data()
    total = cfg.epochs * len(data.loader("train", batch_size=cfg.batch_size))
    ramp = max(1, round(cfg.prune_fraction * total))
    every = max(1, ramp // cfg.mask_updates)
    realloc_at = set(reallocation_steps(ramp, cfg.reallocate)) if reallocate else set()
    done: list[int] = []
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)  # stepped per batch

    def refit(state: TrainState) -> None:
        if state.step >= ramp:
            refit_scales(plans)

    def ramp_masks(state: TrainState) -> None:
        """The learning rate, then the masks and scales the next step trains with."""
        sched.step()
        if state.step in realloc_at:
            reallocate(state.step)
            apply_plans(plans, state.step / ramp)
            done.append(state.step)
        if state.step < ramp and state.step % every == 0:
            set_masks(plans, state.step / ramp)
        elif state.step == ramp:
            set_masks(plans, 1.0)

    set_masks(plans, 0.0)  # the first step's masks
    shared = {"epochs", "batch_size", "distill", "kd_temperature", "kd_alpha"}
    history = train(
        model,
        data,
        FinetuneConfig(**cfg.model_dump(include=shared)),
        seed=seed,
        teacher=ctx.teacher if cfg.distill else None,
        device=ctx.device,
        desc=f"[{ctx.step_index}] {ctx.step_name}: joint training",
        optimizer=lambda _model: opt,
        before_epoch=refit,
        after_step=ramp_masks,
        # Candidates only once every layer has its target sparsity (never the incoming weights).
        checkpoint=CheckpointPolicy(key=lambda acc, state: acc if state.step >= ramp else None),
    )
    return {**history, "reallocated_at": done}
