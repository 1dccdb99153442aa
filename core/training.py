"""Training, evaluation, and fine-tuning that respects encodings; resumable training
checkpoints, kept in checksummed safetensors files (:mod:`netshrink.checkedfile`)."""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR
from torch.utils.data import DataLoader

from netshrink.checkedfile import check_like, read_checked, write_checked
from netshrink.config import NetshrinkConfig
from netshrink.data import DataSplits
from netshrink.encodings import EncodingTable, Sparse, model_tensors
from netshrink.errors import ArtifactError, ConfigError
from netshrink.progress import enabled as progress_enabled
from netshrink.progress import progress

log = logging.getLogger("netshrink")

CHECKPOINT_FORMAT = "netshrink-train-checkpoint/1"


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
    path: str | Path | None = None
    """Resumable checkpoint file. After every epoch but the last, the run's state (weights,
    optimizer, built-in schedule, RNG and shuffling state, history, best weights) is written
    here atomically, as safetensors with JSON metadata (no pickle); a later call with the same
    settings continues after the last finished epoch and ends with the same weights as an
    uninterrupted run (on the CPU; GPU kernels need not be deterministic). The file is deleted
    when training ends. State kept by hooks is not saved, and validation results and ranks
    must be JSON-able (numbers, strings, lists)."""
    run_key: str = ""
    """Identifies the run for ``path`` (e.g. the settings as JSON): a checkpoint written under
    another key or other training settings, or a corrupt one, is ignored with a warning."""


def _bar_hidden() -> bool:
    """True when progress is on but no bar is drawn (stderr is not a terminal)."""
    return progress_enabled() is None and not sys.stderr.isatty()


def _epoch_line(desc: str, epoch: int, total: int, loss: float, result: Any, secs: float) -> str:
    acc = f"{result:.2%}" if isinstance(result, float) else str(result)
    return f"{desc}: epoch {epoch}/{total}, train loss {loss:.4f}, val acc {acc}, {secs:.1f} s"


def _fingerprint(policy: CheckpointPolicy, config: FinetuneConfig, seed: int, custom: bool) -> str:
    """What a checkpoint must have been written under to be resumed."""
    return json.dumps(
        {
            "run": policy.run_key,
            "config": config.model_dump(mode="json"),
            "seed": seed,
            "policy": [policy.keep, policy.patience, policy.warmup_epochs],
            "custom_optimizer": custom,
        },
        sort_keys=True,
    )


def _state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@dataclass
class _Progress:
    """What a resumable run carries from one epoch to the next, besides model and optimizer."""

    history: dict[str, Any]
    best: tuple[Any, Any, int] | None = None  # (rank, validation result, epoch)
    best_state: dict[str, torch.Tensor] | None = None


def _save_checkpoint(
    path: Path,
    fingerprint: str,
    state: TrainState,
    opt: torch.optim.Optimizer,
    sched: CosineAnnealingLR | None,
    run: _Progress,
) -> None:
    tensors = {f"model.{k}": v.clone() for k, v in state.model.state_dict().items()}
    best_is_current = run.best is not None and run.best[2] == state.epoch
    if run.best_state is not None and not best_is_current:
        tensors.update({f"best.{k}": v for k, v in run.best_state.items()})
    opt_state = opt.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in opt_state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if state.loader.generator is not None:
        tensors["rng.loader"] = state.loader.generator.get_state()
    record = {
        "epoch": state.epoch,
        "step": state.step,
        "history": run.history,
        "best": list(run.best) if run.best is not None else None,
        "best_is_current": best_is_current,
        "opt_groups": opt_state["param_groups"],
        "opt_scalars": scalars,
        "sched": sched.state_dict() if sched is not None else None,
    }
    try:
        text = json.dumps(record)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"checkpoint {path}: cannot save the training state as JSON ({exc}); a resumable "
            "checkpoint needs validation results and ranks made of numbers, strings and lists"
        ) from None
    write_checked(path, tensors, fmt=CHECKPOINT_FORMAT, key=fingerprint, meta={"run": text})


def _as_rank(value: Any) -> Any:
    """JSON turned tuples into lists; ranks compare as tuples again."""
    return tuple(_as_rank(v) for v in value) if isinstance(value, list) else value


def _load_checkpoint(
    path: Path,
    fingerprint: str,
    state: TrainState,
    opt: torch.optim.Optimizer,
    sched: CosineAnnealingLR | None,
) -> _Progress | None:
    """Restore the model, optimizer, schedule, RNGs and ``state`` from ``path``; the run's
    progress, or None (with a warning if a file was there but unusable)."""
    if not path.is_file():
        return None
    model = state.model
    limit = 8 * _state_bytes(model) + (64 << 20)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    try:
        tensors, meta = read_checked(path, fmt=CHECKPOINT_FORMAT, key=fingerprint,
                                     max_bytes=limit)
        record = json.loads(meta["run"])
        weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        best_weights = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        check_like(path, weights, saved[0])
        if best_weights:
            check_like(path, best_weights, saved[0])
        opt_state: dict[int, dict[str, Any]] = {}
        for name, value in tensors.items():
            if name.startswith("opt."):
                pid, field = name[4:].split(".", 1)
                opt_state.setdefault(int(pid), {})[field] = value
        for pid, entry in record["opt_scalars"].items():
            opt_state.setdefault(int(pid), {}).update(entry)
        groups = [
            {k: tuple(v) if isinstance(fresh.get(k), tuple) else v for k, v in group.items()}
            for group, fresh in zip(record["opt_groups"], saved[1]["param_groups"], strict=True)
        ]
        opt.load_state_dict({"state": opt_state, "param_groups": groups})
        model.load_state_dict(weights)
        if sched is not None:
            sched.load_state_dict(record["sched"])
        torch.set_rng_state(tensors["rng.torch"])
        if state.loader.generator is not None:
            state.loader.generator.set_state(tensors["rng.loader"])
    except Exception as exc:  # any unusable checkpoint: warn, start afresh, never fail the run
        model.load_state_dict(saved[0])
        opt.load_state_dict(saved[1])
        reason = str(exc) if isinstance(exc, ArtifactError) else f"{path}: {exc!r}"
        log.warning("ignoring training checkpoint: %s; training from the start", reason)
        return None
    state.epoch, state.step = int(record["epoch"]), int(record["step"])
    run = _Progress(history=record["history"])
    if record["best"] is not None:
        score, result, epoch = record["best"]
        run.best = (_as_rank(score), result, int(epoch))
        if best_weights:
            run.best_state = best_weights
        elif record["best_is_current"]:
            run.best_state = copy.deepcopy(model.state_dict())
    return run


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
    epoch_lines: bool = False,
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
    replaces the validation accuracy; ``checkpoint`` ranks the results, decides which weights
    are kept and when to stop, and where a resumable checkpoint goes (default:
    ``CheckpointPolicy(patience=config.patience)``).

    Progress is a bar on a terminal; with ``epoch_lines``, output that is not a terminal (a CI
    log, a file) gets one line per epoch on stderr instead: epoch, train loss, validation
    result, seconds. ``NETSHRINK_PROGRESS=0`` silences both.

    ``seed`` seeds torch and the shuffling. Returns the history: ``loss`` and ``val_acc`` (what
    ``validate`` returned) per epoch, ``start_val_acc`` (the incoming weights'), and
    ``best_val_acc`` and ``best_epoch`` of the weights kept (0: the incoming ones).
    """
    torch.manual_seed(seed)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.epochs == 0 or not (params or optimizer):
        return {"val_acc": [], "loss": []}
    opt = optimizer(model) if optimizer else _optimizer(params, config)
    sched = None if optimizer else CosineAnnealingLR(opt, T_max=config.epochs)
    policy = checkpoint or CheckpointPolicy(patience=config.patience)
    state = TrainState(model, data.loader("train", batch_size=config.batch_size, seed=seed))
    val_loader = data.loader("val", batch_size=256)
    validate = validate or (lambda state: evaluate(state.model, val_loader, device))
    path = Path(policy.path) if policy.path is not None else None
    fingerprint = _fingerprint(policy, config, seed, optimizer is not None)
    run = _load_checkpoint(path, fingerprint, state, opt, sched) if path else None
    lines = epoch_lines and _bar_hidden()
    if run is not None:
        if policy.keep != "best":
            run.best_state = None
        note = f"{desc}: resuming from {path} after epoch {state.epoch}/{config.epochs}"
        log.info("%s", note)
        if lines:
            print(note, file=sys.stderr, flush=True)
    history = run.history if run is not None else {"val_acc": [], "loss": []}
    run = run or _Progress(history)

    def consider(result: Any) -> bool:
        """Rank a validation result; True (and its weights kept) if it is a new best."""
        score = result if policy.key is None else policy.key(result, state)
        if score is None or (run.best is not None and not score > run.best[0]):
            return False
        run.best = (score, result, state.epoch)
        if policy.keep == "best":
            run.best_state = copy.deepcopy(model.state_dict())
        return True

    if "start_val_acc" not in history:
        history["start_val_acc"] = validate(state)
        consider(history["start_val_acc"])
    if teacher is not None:
        teacher.eval()
    first = state.epoch
    for epoch in progress(range(first, config.epochs), desc=desc, total=config.epochs,
                          initial=first):
        started = time.perf_counter()
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
        stale = state.epoch - max(run.best[2] if run.best else 0, policy.warmup_epochs)
        stop = not consider(result) and policy.patience is not None and stale >= policy.patience
        if lines:
            print(_epoch_line(desc, state.epoch, config.epochs, history["loss"][-1], result,
                              time.perf_counter() - started), file=sys.stderr, flush=True)
        if stop:
            break
        if path is not None and state.epoch < config.epochs:
            _save_checkpoint(path, fingerprint, state, opt, sched, run)
    if policy.keep == "last":
        history["best_val_acc"], history["best_epoch"] = history["val_acc"][-1], state.epoch
    elif run.best is not None and run.best_state is not None:
        model.load_state_dict(run.best_state)
        history["best_val_acc"], history["best_epoch"] = run.best[1], run.best[2]
    if path is not None:
        path.unlink(missing_ok=True)
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
    quantized/clustered tensors are frozen; then the encodings are refitted. Shows a bar on a
    terminal and one line per epoch otherwise (``NETSHRINK_PROGRESS=0`` silences both)."""
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
            epoch_lines=True,  # a line per epoch when stderr is not a terminal (CI logs)
        )
    finally:
        for p in frozen:
            p.requires_grad_(True)
    encodings.reconcile(model)
    return history
