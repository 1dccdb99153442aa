"""The L1 training loop: cross-entropy + lambda * sum(r), ``r >= 0`` and ``u`` on the unit sphere
after every step, early stopping on the validation accuracy of the *pruned* model."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netshrink import CompressionContext
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

    def better_than(self, other: Checkpoint | None) -> bool:
        """Admissible beats inadmissible; then more removed; then higher accuracy."""
        if other is None:
            return True
        if self.admissible != other.admissible:
            return self.admissible
        if self.admissible:
            return (self.removed, self.val_acc) > (other.removed, other.val_acc)
        return (self.val_acc, self.removed) > (other.val_acc, other.removed)


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
    data = ctx.require_data()
    torch.manual_seed(ctx.seed * 1_000_003 + ctx.step_index)
    loader = data.loader("train", batch_size=cfg.batch_size, seed=ctx.seed + ctx.step_index)
    frozen = {id(p) for p in constraints.frozen}
    magnitudes = {id(rep.r) for rep in reps}
    params = [
        p
        for p in model.parameters()
        if p.requires_grad and id(p) not in frozen and id(p) not in magnitudes
    ]
    opt = torch.optim.Adam(
        [
            {"params": params, "lr": cfg.lr},
            {"params": [rep.r for rep in reps], "lr": cfg.lr_magnitude},
        ]
    )
    penalised = [rep for rep in reps if rep.penalised]
    history: dict[str, Any] = {"epoch": [], "val_acc": [], "removed": [], "l1": []}

    def evaluate_checkpoint(epoch: int) -> Checkpoint:
        with pruned_view(reps, cfg):
            # The statistics of the pruned model are also the ones the kept checkpoint needs.
            recalibrate_batchnorm(model, loader, ctx.device, cfg.bn_batches)
            acc = ctx.evaluate(model, "val")
        removed = removed_fraction(reps, cfg)
        ok = acc >= reference_acc - cfg.val_tolerance - 1e-9
        return Checkpoint(epoch, acc, removed, ok)

    best = evaluate_checkpoint(0)
    best_state = copy.deepcopy(model.state_dict())
    stale = 0
    steps_per_epoch = max(len(loader), 1)
    for epoch in ctx.progress(range(1, cfg.epochs + 1), desc="L1 training", total=cfg.epochs):
        model.train()
        lam = 0.0
        for step, (x, y) in enumerate(loader):
            x, y = x.to(ctx.device), y.to(ctx.device)
            lam = cfg.l1_at(epoch - 1 + step / steps_per_epoch)
            loss = F.cross_entropy(model(x), y)
            if lam > 0 and penalised:
                # r >= 0 is kept by projection, so sum(r) is the L1 norm of the magnitudes.
                loss = loss + lam * sum(rep.r.sum() for rep in penalised)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for p, mask in constraints.masks.values():
                    p.mul_(mask)
                for rep in reps:
                    project_(rep, constraints.direction_masks.get(rep.name))
        point = evaluate_checkpoint(epoch)
        for key, value in (
            ("epoch", epoch),
            ("val_acc", point.val_acc),
            ("removed", point.removed),
            ("l1", lam),
        ):
            history[key].append(value)
        ctx.logger.info(
            "normsparse epoch %d: lambda %.2e, pruned val acc %.4f, %.1f%% of "
            "penalised weights below threshold",
            epoch,
            lam,
            point.val_acc,
            100 * point.removed,
        )
        if point.better_than(best):
            best, best_state, stale = point, copy.deepcopy(model.state_dict()), 0
        elif epoch > (0 if cfg.schedule == "constant" else cfg.warmup_epochs):
            stale += 1
            if cfg.patience is not None and stale >= cfg.patience:
                break
    model.load_state_dict(best_state)
    history.update(
        best_epoch=best.epoch,
        best_val_acc=best.val_acc,
        best_removed=best.removed,
        admissible=best.admissible,
        epochs_run=len(history["epoch"]),
    )
    return history
