"""Training, evaluation, and fine-tuning that respects encodings."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
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


def train(
    model: nn.Module,
    data: DataSplits,
    config: FinetuneConfig,
    *,
    seed: int = 0,
    teacher: nn.Module | None = None,
    device: str | torch.device = "cpu",
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    desc: str = "train",
) -> dict[str, Any]:
    """Train ``model`` on ``data.train``; keeps the weights with the best validation accuracy
    (the incoming weights included, so training never ends worse on validation than it began).

    ``extra_loss(model)`` adds a regulariser (e.g. an L1 penalty); ``after_step(model)`` runs
    after every optimizer step (e.g. to re-apply masks). Returns the history.
    """
    torch.manual_seed(seed)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    history: dict[str, Any] = {"val_acc": [], "loss": []}
    if config.epochs == 0 or not params:
        return history
    opt = _optimizer(params, config)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs)
    loader = data.loader("train", batch_size=config.batch_size, seed=seed)
    val_loader = data.loader("val", batch_size=256)
    # Start from the incoming weights: a short fine-tune must never end worse than it began.
    best_acc, stale = evaluate(model, val_loader, device), 0
    best_state = copy.deepcopy(model.state_dict())
    history["start_val_acc"] = best_acc
    if teacher is not None:
        teacher.eval()
    bar = progress(range(config.epochs), desc=desc, total=config.epochs)
    for _epoch in bar:
        model.train()
        total_loss = 0.0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            if teacher is not None and config.distill:
                with torch.no_grad():
                    soft = teacher(x)
                loss = distillation_loss(
                    logits, y, soft, temperature=config.kd_temperature, alpha=config.kd_alpha
                )
            else:
                loss = F.cross_entropy(logits, y)
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step(model)
            total_loss += float(loss.detach()) * len(y)
        sched.step()
        acc = evaluate(model, val_loader, device)
        history["val_acc"].append(acc)
        history["loss"].append(total_loss / len(loader.dataset))
        if acc > best_acc:
            best_acc, best_state, stale = acc, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if config.patience is not None and stale >= config.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    history["best_val_acc"] = best_acc
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

    def keep_masks(m: nn.Module) -> None:
        current = model_tensors(m)
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
