"""L1 training on ``netshrink.train``: cross-entropy + lambda * sum(r), ``r >= 0`` and ``u`` on the
unit sphere after every step, early stopping on the validation accuracy of the *pruned* model."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from netshrink import CheckpointPolicy, CompressionContext, FinetuneConfig, TrainState, train
from netshrink.plugins.normsparse.config import NormSparseConfig
from netshrink.plugins.normsparse.reparam import Reparam, dead_mask, project_


@dataclass
class Constraints:
    """What earlier steps fixed: zeros that must stay zero, tensors that must not change."""

    frozen: list[nn.Parameter] = field(default_factory=list)
    masks: dict[int, tuple[nn.Parameter, torch.Tensor]] = field(default_factory=dict)
    """Sparse masks of parameters that are not reparametrised, keyed by ``id(param)``."""
    direction_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    """Sparse masks of reparametrised weights (applied to the direction ``u``), by layer."""


@dataclass
class Checkpoint:
    """The state of one epoch as a removal candidate."""

    epoch: int
    val_acc: float
    removed: float
    admissible: bool
    l1: float = 0.0
    """Lambda at the last step before this checkpoint."""

    def rank(self) -> tuple[bool, float, float]:
        """Higher is better: admissible beats inadmissible; then admissible ones by weights
        removed, then accuracy; inadmissible ones by accuracy, then weights removed."""
        if self.admissible:
            return (True, self.removed, self.val_acc)
        return (False, self.val_acc, self.removed)


def removed_fraction(reps: list[Reparam], cfg: NormSparseConfig) -> float:
    """Fraction of the penalised layers' weights whose magnitude is below the threshold."""
    dead = total = 0
    for rep in reps:
        if rep.penalised:
            mask = dead_mask(rep.r, cfg.threshold, cfg.min_keep)
            dead += int(mask.sum()) * rep.unit_size
            total += mask.numel() * rep.unit_size
    return dead / max(total, 1)


@contextmanager
def pruned_view(reps: list[Reparam], cfg: NormSparseConfig):
    """Temporarily zero the magnitudes that removal would drop (to evaluate the pruned model)."""
    saved = [rep.r.detach().clone() for rep in reps]
    with torch.no_grad():
        for rep in reps:
            if rep.penalised:
                rep.r.masked_fill_(dead_mask(rep.r, cfg.threshold, cfg.min_keep), 0.0)
    try:
        yield
    finally:
        with torch.no_grad():
            for rep, r in zip(reps, saved):
                rep.r.copy_(r)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader, device: torch.device, batches: int) -> None:
    """Recompute BatchNorm running statistics for the current weights.

    A convolution followed by BatchNorm is scale-invariant, so the L1 penalty shrinks its
    magnitudes quickly and the running statistics (a slow moving average) fall behind: the
    model then looks broken in eval mode although it is fine. Evaluating with fresh statistics
    measures what removal would really give.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or batches <= 0:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    was_training = model.training
    model.train()
    try:
        for i, (x, _y) in enumerate(loader):
            if i >= batches:
                break
            model(x.to(device))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)


def l1_train(
    model: nn.Module,
    reps: list[Reparam],
    ctx: CompressionContext,
    cfg: NormSparseConfig,
    constraints: Constraints,
    reference_acc: float,
) -> dict[str, Any]:
    """Train with the L1 penalty on the magnitudes; restore the best checkpoint; return history.

    The best checkpoint is the one removing most weights whose pruned model stays within
    ``val_tolerance`` of ``reference_acc`` on the validation split.
    """
    skip = {id(p) for p in constraints.frozen} | {id(rep.r) for rep in reps}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
    magnitudes = [rep.r for rep in reps]
    opt = torch.optim.Adam(
        [{"params": others, "lr": cfg.lr}, {"params": magnitudes, "lr": cfg.lr_magnitude}]
    )
    penalised = [rep for rep in reps if rep.penalised]
    lam = 0.0

    def l1(state: TrainState) -> torch.Tensor | float:
        nonlocal lam
        lam = cfg.l1_at(state.progress)
        # r >= 0 is kept by projection, so sum(r) is the L1 norm of the magnitudes.
        return lam * sum(rep.r.sum() for rep in penalised) if lam > 0 and penalised else 0.0

    def constrain(state: TrainState) -> None:
        with torch.no_grad():
            for p, mask in constraints.masks.values():
                p.mul_(mask)
            for rep in reps:
                project_(rep, constraints.direction_masks.get(rep.name))

    def validate(state: TrainState) -> Checkpoint:
        with pruned_view(reps, cfg):
            # The statistics of the pruned model are also the ones the kept checkpoint needs.
            recalibrate_batchnorm(model, state.loader, ctx.device, cfg.bn_batches)
            acc = ctx.evaluate(model, "val")
        ok = acc >= reference_acc - cfg.val_tolerance - 1e-9
        point = Checkpoint(state.epoch, acc, removed_fraction(reps, cfg), ok, lam)
        if state.epoch:
            ctx.logger.info(
                "normsparse epoch %d: lambda %.2e, pruned val acc %.4f, %.1f%% of "
                "penalised weights below threshold",
                state.epoch,
                lam,
                acc,
                100 * point.removed,
            )
        return point

    out = train(
        model,
        ctx.require_data(),
        FinetuneConfig(epochs=cfg.epochs, batch_size=cfg.batch_size),
        seed=ctx.seed + ctx.step_index,
        device=ctx.device,
        desc=f"[{ctx.step_index}] {ctx.step_name}: L1 training",
        extra_loss=l1,
        optimizer=lambda _model: opt,
        after_step=constrain,
        validate=validate,
        checkpoint=CheckpointPolicy(
            key=lambda point, _state: point.rank(),
            patience=cfg.patience,
            warmup_epochs=0 if cfg.schedule == "constant" else cfg.warmup_epochs,
        ),
    )
    points, best = out["val_acc"], out["best_val_acc"]
    history = {k: [getattr(p, k) for p in points] for k in ("val_acc", "removed", "l1")}
    kept = {"best_epoch": best.epoch, "admissible": best.admissible, "epochs_run": len(points)}
    return history | kept
