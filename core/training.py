"""Training, evaluation, and fine-tuning that respects encodings."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR
from torch.utils.data import DataLoader

from netshrink.config import NetshrinkConfig
from netshrink.data import DataSplits
from netshrink.encodings import EncodingTable, Sparse, model_tensors
from netshrink.progress import progress


class FinetuneConfig(NetshrinkConfig):
    """Fine-tuning after a step (or the whole recipe). Pruned zeros stay zero; quantized and
    clustered tensors are frozen."""

    epochs: int = Field(3, ge=0, le=1000, description="Training epochs over the train split.")
    lr: float = Field(1e-3, gt=0, le=10, description="Learning rate.")
    batch_size: int = Field(64, ge=1, description="Mini-batch size.")
    optimizer: Literal["adam", "sgd"] = Field(
        "adam", description="Optimizer (SGD uses momentum 0.9)."
    )
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay.")
    distill: bool = Field(
        False, description="Knowledge distillation from the uncompressed model (soft targets)."
    )
    kd_temperature: float = Field(4.0, gt=0, description="Distillation temperature.")
    kd_alpha: float = Field(0.7, ge=0, le=1, description="Weight of the distillation loss.")
    patience: int | None = Field(
        None,
        ge=1,
        description="Stop after this many epochs without validation improvement "
        "and keep the best weights (None: train all epochs, keep the best).",
    )


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` on ``loader`` (model left in eval mode)."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        logits = model(x.to(device))
        correct += int((logits.argmax(1).cpu() == y).sum())
        total += len(y)
    return correct / max(total, 1)


def distillation_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Hinton et al.'s knowledge-distillation loss.

    ``(1 - alpha) * CE(logits, targets) + alpha * T**2 * KL(softmax(teacher/T) || softmax(s/T))``;
    the ``T**2`` keeps the soft term's gradients on the scale of the hard term's.
    """
    hard = F.cross_entropy(logits, targets)
    soft = F.kl_div(
        F.log_softmax(logits / temperature, 1),
        F.softmax(teacher_logits / temperature, 1),
        reduction="batchmean",
    )
    return (1 - alpha) * hard + alpha * soft * temperature * temperature


def _optimizer(params, config: FinetuneConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


@dataclass
class TrainState:
    """Where a :func:`train` run is; every hook receives it."""

    model: nn.Module
    loader: DataLoader
    """The training batches (hooks may draw from it, e.g. to recalibrate BatchNorm)."""
    epoch: int = 0
    """Epochs completed: ``n`` while epoch ``n + 1`` runs and when epoch ``n`` is validated."""
    batch: int = 0
    """Index of the current batch in its epoch."""
    step: int = 0
    """Optimizer steps taken so far (``after_step`` sees its own step counted)."""

    @property
    def progress(self) -> float:
        """Epochs completed at the start of the current batch, fractional (for schedules)."""
        return self.epoch + self.batch / max(len(self.loader), 1)


@dataclass(frozen=True)
class CheckpointPolicy:
    """Which weights :func:`train` ends with, and when it stops early."""

    keep: Literal["best", "last"] = "best"
    """``best``: restore the best validated weights; ``last``: keep the final ones."""
    key: Callable[[Any, TrainState], Any] | None = None
    """Ranks a validation result, higher is better; ``None``: not a candidate. Default: the
    result itself. The incoming weights are validated (epoch 0) and ranked too, so that by
    default training never ends worse on validation than it began."""
    patience: int | None = None
    """Stop after this many epochs without a new best (None: train all epochs)."""
    warmup_epochs: int = 0
    """Epochs up to this one never count towards ``patience`` (e.g. while a penalty ramps up)."""


def train(
    model: nn.Module,
    data: DataSplits,
    config: FinetuneConfig,
    *,
    seed: int = 0,
    teacher: nn.Module | None = None,
    device: str | torch.device = "cpu",
    desc: str = "train",
    loss: Callable[[TrainState, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    extra_loss: Callable[[TrainState], torch.Tensor | float] | None = None,
    optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    before_epoch: Callable[[TrainState], None] | None = None,
    after_step: Callable[[TrainState], None] | None = None,
    validate: Callable[[TrainState], Any] | None = None,
    checkpoint: CheckpointPolicy | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``data.train`` for ``config.epochs``, validating after every epoch:
    the one training loop of netshrink and its plugins. By default it minimises cross-entropy
    (distillation from ``teacher`` if ``config.distill``) with ``config``'s optimizer and a
    cosine schedule, and keeps the weights with the best validation accuracy, incoming included.

    Hooks (each gets the :class:`TrainState`): ``loss(state, x, y)`` replaces the default loss
    and ``extra_loss(state)`` is added to it (e.g. an L1 penalty); ``optimizer(model)`` replaces
    the optimizer and the schedule (parameter groups, tensors outside the model; step your own
    scheduler in ``after_step``); ``before_epoch`` runs at the start of every epoch and
    ``after_step`` after every optimizer step (re-apply masks, project, ...); ``validate(state)``
    replaces the validation accuracy; ``checkpoint`` ranks the results and decides which weights
    are kept and when to stop (default: ``CheckpointPolicy(patience=config.patience)``).

    ``seed`` seeds torch and the shuffling. Returns the history: ``loss`` and ``val_acc`` (what
    ``validate`` returned) per epoch, ``start_val_acc`` (the incoming weights'), and
    ``best_val_acc`` and ``best_epoch`` of the weights kept (0: the incoming ones).
    """
    torch.manual_seed(seed)
    model.to(device)
    history: dict[str, Any] = {"val_acc": [], "loss": []}
    params = [p for p in model.parameters() if p.requires_grad]
    if config.epochs == 0 or not (params or optimizer):
        return history
    opt = optimizer(model) if optimizer else _optimizer(params, config)
    sched = None if optimizer else CosineAnnealingLR(opt, T_max=config.epochs)
    policy = checkpoint or CheckpointPolicy(patience=config.patience)
    state = TrainState(model, data.loader("train", batch_size=config.batch_size, seed=seed))
    val_loader = data.loader("val", batch_size=256)
    validate = validate or (lambda state: evaluate(state.model, val_loader, device))
    best: tuple[Any, Any, int] | None = None  # (rank, validation result, epoch)
    best_state = None

    def consider(result: Any) -> bool:
        """Rank a validation result; True (and its weights kept) if it is a new best."""
        nonlocal best, best_state
        score = result if policy.key is None else policy.key(result, state)
        if score is None or (best is not None and not score > best[0]):
            return False
        best = (score, result, state.epoch)
        if policy.keep == "best":
            best_state = copy.deepcopy(model.state_dict())
        return True

    history["start_val_acc"] = validate(state)
    consider(history["start_val_acc"])
    if teacher is not None:
        teacher.eval()
    for epoch in progress(range(config.epochs), desc=desc, total=config.epochs):
        state.epoch = epoch
        model.train()
        if before_epoch is not None:
            before_epoch(state)
        total_loss = 0.0
        for batch, (x, y) in enumerate(state.loader):
            state.batch = batch
            x, y = x.to(device), y.to(device)
            if loss is not None:
                batch_loss = loss(state, x, y)
            elif teacher is not None and config.distill:
                logits = model(x)
                with torch.no_grad():
                    soft = teacher(x)
                batch_loss = distillation_loss(
                    logits, y, soft, temperature=config.kd_temperature, alpha=config.kd_alpha
                )
            else:
                batch_loss = F.cross_entropy(model(x), y)
            if extra_loss is not None:
                batch_loss = batch_loss + extra_loss(state)
            opt.zero_grad()
            batch_loss.backward()
            opt.step()
            state.step += 1
            if after_step is not None:
                after_step(state)
            total_loss += float(batch_loss.detach()) * len(y)
        if sched is not None:
            sched.step()
        state.epoch, state.batch = epoch + 1, 0
        result = validate(state)
        history["val_acc"].append(result)
        history["loss"].append(total_loss / max(len(state.loader.dataset), 1))
        stale = state.epoch - max(best[2] if best else 0, policy.warmup_epochs)
        if not consider(result) and policy.patience is not None and stale >= policy.patience:
            break
    if policy.keep == "last":
        history["best_val_acc"], history["best_epoch"] = result, state.epoch
    elif best is not None and best_state is not None:
        model.load_state_dict(best_state)
        history["best_val_acc"], history["best_epoch"] = best[1], best[2]
    return history


def finetune(
    model: nn.Module,
    data: DataSplits,
    encodings: EncodingTable,
    config: FinetuneConfig,
    *,
    teacher: nn.Module | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    desc: str = "fine-tune",
) -> dict[str, Any]:
    """Fine-tune while keeping every encoding valid: zeros of sparse tensors stay zero,
    quantized/clustered tensors are frozen; then the encodings are refitted."""
    tensors = model_tensors(model)
    frozen: list[nn.Parameter] = []
    masks: dict[str, torch.Tensor] = {}
    for name, enc in encodings.items():
        tensor = tensors.get(name)
        if not isinstance(tensor, nn.Parameter):
            continue
        if enc.is_value_encoded:
            if tensor.requires_grad:
                tensor.requires_grad_(False)
                frozen.append(tensor)
        elif isinstance(enc, Sparse):
            masks[name] = enc.mask().to(tensor.device)

    def keep_masks(state: TrainState) -> None:
        current = model_tensors(state.model)
        with torch.no_grad():
            for name, mask in masks.items():
                current[name].mul_(mask)

    try:
        history = train(
            model,
            data,
            config,
            seed=seed,
            teacher=teacher,
            device=device,
            after_step=keep_masks if masks else None,
            desc=desc,
        )
    finally:
        for p in frozen:
            p.requires_grad_(True)
    encodings.reconcile(model)
    return history
