"""The pipeline: validate a recipe against a model before any work, then run its steps."""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from netshrink.adapters import ModelInfo, last_linear, model_info, set_model_info
from netshrink.artifact import artifact_bytes, save_model
from netshrink.compressor import Compressor, CompressorConfig, LayerRecord
from netshrink.config import format_validation_error
from netshrink.context import CompressionContext
from netshrink.data import DataSplits
from netshrink.datasets import load as load_data
from netshrink.encodings import EncodingTable
from netshrink.errors import (
    ConfigError,
    ModelSpecError,
    NetshrinkError,
    RecipeError,
    SelectionError,
    StepError,
    first_line,
)
from netshrink.fileio import FileGroup, locked
from netshrink.models import load_model, reference_model
from netshrink.recipe import Recipe, Step, as_recipe
from netshrink.registry import get_compressor, get_selector_preset
from netshrink.report import Report, build_report
from netshrink.selector import LayerSelector, name_matches
from netshrink.training import FinetuneConfig, evaluate
from netshrink.training import finetune as run_finetune

log = logging.getLogger("netshrink")

_FINETUNE_HINT = "lower the learning rate (finetune.lr) or check the data for NaN"


@dataclass
class PlannedStep:
    """A validated step: the compressor class, its config, its selector and the layers it
    selected on the model as it was before the run."""

    index: int
    step: Step
    compressor: type[Compressor]
    config: CompressorConfig
    selector: LayerSelector
    layers: list[str]

    @property
    def title(self) -> str:
        """How errors and reports name this step."""
        return self.step.title(self.index)


@dataclass
class CompressionResult:
    """What :func:`compress` returns: the compressed model, its report, its encodings and the
    artifact's bytes (``len(artifact) == report.storage_bytes``)."""

    model: nn.Module
    report: Report
    encodings: EncodingTable
    recipe: Recipe
    info: ModelInfo
    artifact: bytes
    records: list[LayerRecord] = field(default_factory=list)

    def save(self, path: str | Path, *, report: bool = True) -> Path:
        """Write the artifact (its size equals ``report.storage_bytes``); with ``report=True``
        also ``<stem>.report.json`` and ``<stem>.report.png`` next to it.

        Nothing is lost or mixed: every file is written under a temp name first, then all are
        renamed into place while holding :func:`~netshrink.fileio.locked` on ``path`` (a
        second save to the same path waits, and a reader that takes the lock sees no mix), the
        report first and the artifact last: once the artifact is in place its report is too,
        and a report that does not match the artifact on disk means a save is under way (or
        was killed between its renames; the next save mends it). A
        failure raises :class:`~netshrink.errors.WriteError` naming the file and leaves the old
        files as they were.
        """
        path = Path(path)
        with FileGroup(lock=path) as group:
            if report:
                group.write_with(path.with_suffix(".report.json"), self.report.save_json)
                png = path.with_suffix(".report.png")
                try:
                    group.write_with(png, self.report.plot)
                except Exception as exc:  # a missing font or backend must not lose the artifact
                    log.warning("could not draw the report plot: %s", exc)
                    group.remove(png)  # an old plot must not sit beside the new report
            group.write(path, self.artifact)
        return path


def save(obj: CompressionResult | nn.Module, path: str | Path, *, report: bool = True) -> Path:
    """Save a :class:`CompressionResult` (see :meth:`CompressionResult.save`), or a model
    built from a spec (every tensor stored dense), as one artifact file, atomically and under
    the same lock; a failure raises :class:`~netshrink.errors.WriteError`."""
    if isinstance(obj, CompressionResult):
        return obj.save(path, report=report)
    if isinstance(obj, nn.Module):
        with locked(path):  # not mid-way through another save's group
            return save_model(obj, path)
    raise TypeError(f"save() takes a CompressionResult or an nn.Module, got {type(obj).__name__}")


def _selector(step: Step, title: str) -> LayerSelector:
    if step.select is None:
        return LayerSelector()
    if isinstance(step.select, str):
        try:
            return get_selector_preset(step.select)
        except KeyError as exc:
            raise RecipeError(f"{title}: field 'select': {exc}") from None
    return step.select


def plan(
    recipe: Recipe, model: nn.Module, info: ModelInfo, data: DataSplits | None
) -> list[PlannedStep]:
    """Validate every step against ``model`` and ``data`` before any work is done.

    Checks: the model's parameters and buffers are finite; with data, no split is empty, two
    samples go through the model (eval mode, no gradients) and its output width is the number
    of classes; the compressor exists (with did-you-mean), its config validates (errors name
    the step and field), so does each per-layer override merged into it
    (``overrides.<pattern>``), the selector selects something the compressor handles, data is
    given when needed, and no step rewrites values that an earlier step quantized or clustered.
    """
    _check_finite_model(model, info)
    if data is not None:
        data.check_nonempty()
        data.check_model(model, _model_name(model, info))
    if recipe.finetune and data is None:
        raise RecipeError("recipe field 'finetune': fine-tuning needs data; pass data=...")
    planned: list[PlannedStep] = []
    for index, step in enumerate(recipe.steps):
        title = step.title(index)
        try:
            cls = get_compressor(step.compressor)
        except KeyError as exc:
            raise RecipeError(f"{title}: field 'compressor': {exc}") from None
        try:
            config = cls.Config.model_validate(step.config)
        except ValidationError as exc:
            msg = format_validation_error(exc, title).replace("field '", "field 'config.")
            raise RecipeError(msg) from None
        try:
            cls.override_configs(config, step.overrides, where=title)
        except ConfigError as exc:
            raise RecipeError(str(exc)) from None
        selector = _selector(step, title)
        try:
            layers = selector.resolve(
                model,
                head=info.head,
                default_types=cls.capabilities_for(config).selected_by_default,
            )
            cls.check_layers(layers)
        except SelectionError as exc:
            raise SelectionError(f"{title}: field 'select': {exc}") from None
        caps = cls.capabilities_for(config)
        if (caps.needs_data or step.finetune) and data is None:
            why = "it evaluates or trains on data" if caps.needs_data else "it fine-tunes"
            raise RecipeError(f"{title}: needs data ({why}); pass data=... or --data")
        for earlier in planned:
            if not earlier.compressor.capabilities_for(earlier.config).encodes_values:
                continue
            if caps.changes_structure:
                raise RecipeError(
                    f"{title}: '{cls.name}' changes the model's structure after {earlier.title} "
                    f"quantized/clustered values; put structural steps first"
                )
            overlap = sorted(set(earlier.layers) & {n for n, _ in layers})
            if overlap:
                raise RecipeError(
                    f"{title}: '{cls.name}' would rewrite layers whose values {earlier.title} "
                    f"already quantized/clustered ({', '.join(overlap[:4])}); reorder the steps "
                    "or exclude those layers"
                )
        _warn_unused_overrides(title, step.overrides, [n for n, _ in layers])
        planned.append(PlannedStep(index, step, cls, config, selector, [n for n, _ in layers]))
    _warn_unfinetuned(recipe, planned)
    return planned


def _warn_unused_overrides(title: str, overrides: dict[str, Any], names: list[str]) -> None:
    """Log a warning for an override pattern that no selected layer gets (a typo, or an
    earlier pattern matches first). Not an error: one recipe may serve several models."""
    used = {next((p for p in overrides if name_matches(p, n)), None) for n in names}
    for pattern in overrides:
        if pattern not in used:
            matched = any(name_matches(pattern, n) for n in names)
            log.warning(
                "%s: field 'overrides.%s' applies to no selected layer (%s); selected: %s",
                title,
                pattern,
                "an earlier pattern matches them first" if matched else "it matches none",
                ", ".join(names[:8]) + (", ..." if len(names) > 8 else ""),
            )


def _warn_unfinetuned(recipe: Recipe, planned: list[PlannedStep]) -> None:
    """Log a warning for a step that declares ``needs_finetune`` when nothing fine-tunes after
    it (neither the step, nor a later step, nor the recipe)."""
    if recipe.finetune is not None and recipe.finetune.epochs > 0:
        return
    tuned_after = False
    for item in reversed(planned):
        tuned_after = tuned_after or bool(item.step.finetune and item.step.finetune.epochs > 0)
        if item.compressor.capabilities_for(item.config).needs_finetune and not tuned_after:
            log.warning(
                "%s: '%s' usually needs fine-tuning afterwards and none is configured; add "
                "'finetune' to this step or to the recipe",
                item.title,
                item.compressor.name,
            )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _resolve_model(model: nn.Module | str, data: DataSplits | None, seed: int) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if data is not None:
        # The architecture reference training would build, checked first: training must not
        # start on NaN weights (a file: spec) or on data the model cannot take.
        bare = load_model(model, **data.model_options())
        _check_finite_model(bare, model_info(bare))
        data.check_model(bare, _model_name(bare, model_info(bare)))
        return reference_model(model, data, seed=seed)
    return load_model(model)


def _settled(model: nn.Module) -> nn.Module:
    """``model`` in the state a run starts from: eval mode, no gradients held. A reference
    model just trained and the same one loaded from the cache must start the run identically
    (a method that reads ``.grad`` or runs a forward must not see what training left)."""
    for tensor in model.parameters():
        tensor.grad = None
    return model.eval()


def _info_for(model: nn.Module, data: DataSplits | None) -> ModelInfo:
    info = model_info(model)
    if info is not None:
        if info.input_shape is None and data is not None:
            info = copy.copy(info)
            info.input_shape = data.input_shape
        return info
    return ModelInfo(
        spec="",
        input_shape=data.input_shape if data else None,
        num_classes=data.num_classes if data else None,
        head=last_linear(model),
    )


def _model_name(model: nn.Module, info: ModelInfo | None) -> str:
    """How errors name the model: its spec and options, else its class."""
    if info is None or not info.spec:
        return f"{type(model).__name__} (a module without a spec)"
    options = ", ".join(f"{k}={v}" for k, v in sorted(info.options.items()))
    return f"{info.spec}" + (f" ({options})" if options else "")


def _nonfinite(model: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers holding a NaN or an infinity."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [
        name
        for name, t in tensors
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.detach()).all())
    ]


def _tensor_list(names: list[str], shown: int = 4) -> str:
    count = f"{len(names)} tensor{'s' if len(names) != 1 else ''}"
    return f"{count}: {', '.join(names[:shown])}" + (", ..." if len(names) > shown else "")


def _check_finite_model(model: nn.Module, info: ModelInfo | None) -> None:
    """Refuse a model whose weights hold NaN or inf (compressing it would only hide that)."""
    bad = _nonfinite(model)
    if bad:
        raise ModelSpecError(
            f"model {_model_name(model, info)} has non-finite values (NaN or inf) in "
            f"{_tensor_list(bad)}; netshrink compresses only finite weights: check the "
            "checkpoint or the training that produced it"
        )


def _check_finite_after(model: nn.Module, where: str, hint: str) -> None:
    """Raise :class:`StepError` if ``where`` (a step, or its fine-tuning) left non-finite
    values in ``model``."""
    bad = _nonfinite(model)
    if bad:
        raise StepError(
            f"{where} left non-finite values (NaN or inf) in {_tensor_list(bad)}; {hint}"
        )


@contextmanager
def _step_errors(title: str, what: str, model_name: str) -> Iterator[None]:
    """Name the step in errors raised inside it: a netshrink error keeps its type (and extra
    attributes) with ``title`` prefixed; any other exception (a plugin's bug, the model's own
    forward) becomes a :class:`StepError` chained to it. Running out of memory and
    interrupts pass through untouched."""
    try:
        yield
    except NetshrinkError as exc:
        exc.args = (f"{title}: {exc}", *exc.args[1:])
        raise
    except (MemoryError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as exc:
        raise StepError(
            f"{title}: {what} failed on model {model_name}: {first_line(exc)} "
            "(the full traceback is chained above)"
        ) from exc


def compress(
    model: nn.Module | str | None,
    steps: Recipe | list[Step | dict[str, Any]] | Step | str | Path,
    data: DataSplits | str | None = None,
    *,
    seed: int | None = None,
    finetune: FinetuneConfig | dict[str, Any] | None = None,
    latency: bool | None = None,
    device: str = "cpu",
) -> CompressionResult:
    """Compress ``model`` with ``steps`` and return a :class:`CompressionResult`.

    ``finetune`` (a :class:`FinetuneConfig` or dict) fine-tunes after the last step.
    ``model`` is an ``nn.Module`` (left untouched: a copy is compressed), a spec string (with
    ``data``, the cached reference model trained on it), or None to use the recipe's ``model``.
    ``steps`` is a list of :func:`netshrink.step` results, a :class:`Recipe`, or a recipe file.
    Everything is validated before any work (:func:`plan`: finite weights, data that fits the
    model, every step). Each stage starts from a seeded state, so the artifact's bytes depend
    only on the inputs and ``seed``, not on whether a reference model was just trained or
    loaded from the cache. A failure inside a step raises an error naming the step.
    """
    recipe = as_recipe(steps, seed=seed, latency=latency, finetune=finetune)
    data_name = data if isinstance(data, str) else recipe.data
    splits = load_data(data if data is not None else data_name) if (data or data_name) else None
    if splits is not None:
        splits.check_nonempty()  # before a reference model trains on it
    source = model if model is not None else recipe.model
    if source is None:
        raise RecipeError("no model: pass a model or a spec, or set 'model' in the recipe")
    original = _resolve_model(source, splits, recipe.seed)
    info = _info_for(original, splits)
    work = _settled(copy.deepcopy(original))
    set_model_info(work, info)
    _seed_everything(recipe.seed)
    planned = plan(recipe, work, info, splits)
    model_name = _model_name(work, info)

    started = time.perf_counter()
    dev = torch.device(device)
    work.to(dev)
    teacher = _settled(copy.deepcopy(original)).to(dev)
    for p in teacher.parameters():
        p.requires_grad_(False)
    table = EncodingTable()
    stored_recipe = recipe.model_dump(exclude_defaults=True)
    records: list[LayerRecord] = []
    step_summaries: list[dict[str, Any]] = []
    for item in planned:
        _seed_everything(recipe.seed + item.index)
        ctx = CompressionContext(
            data=splits,
            encodings=table,
            info=info,
            seed=recipe.seed,
            device=dev,
            step_index=item.index,
            step_name=item.step.label or item.compressor.name,
            teacher=teacher,
            recipe=stored_recipe,
        )
        layers = item.selector.filter(
            work,
            head=info.head,
            default_types=item.compressor.capabilities_for(item.config).selected_by_default,
        )
        if not layers:
            raise SelectionError(
                f"{item.title}: field 'select': selected no layers once earlier "
                "steps had run (they renamed or removed the layers)"
            )
        item.compressor.check_layers(layers, where=f"{item.title}: ")
        params_before = {
            name: sum(p.numel() for p in module.parameters())
            for name, module in work.named_modules()
        }
        t0 = time.perf_counter()
        method = f"'{item.compressor.name}'"
        with _step_errors(item.title, f"compressor {method}", model_name):
            # Overrides only when the step has some: a compressor that takes none may define
            # __init__(config) without the keyword.
            extra = {"overrides": item.step.overrides} if item.step.overrides else {}
            out = item.compressor(item.config, **extra).compress(work, layers, ctx)
        work = out.model
        _check_finite_after(
            work, f"{item.title}: compressor {method}", "the method produced them (a bug to report)"
        )
        set_model_info(work, info)
        table.reconcile(work)
        summary: dict[str, Any] = {
            "step": item.index,
            "compressor": item.compressor.name,
            "layers": len(layers),
            **out.summary,
        }
        if item.step.finetune is not None and item.step.finetune.epochs > 0:
            where = f"fine-tuning after compressor {method}"
            with _step_errors(item.title, where, model_name):
                hist = run_finetune(
                    work,
                    splits,
                    table,
                    item.step.finetune,
                    teacher=teacher,
                    seed=recipe.seed,
                    device=dev,
                    desc=f"[{item.index}] fine-tune",
                )
            _check_finite_after(work, f"{item.title}: {where}", _FINETUNE_HINT)
            summary["finetune_best_val_acc"] = hist.get("best_val_acc")
            # 0: no epoch beat the step's own weights on validation, so they were kept
            summary["finetune_best_epoch"] = hist.get("best_epoch")
            summary["finetune_epochs"] = item.step.finetune.epochs
            summary["finetune_start_val_acc"] = hist.get("start_val_acc")
        summary["wall_time_s"] = round(time.perf_counter() - t0, 3)
        for rec in out.records:
            rec.method = item.compressor.name
            rec.params_before = params_before.get(rec.name, 0)
            rec.details.setdefault("step", item.index)
        records.extend(out.records)
        step_summaries.append(summary)
    if recipe.finetune is not None and recipe.finetune.epochs > 0:
        _seed_everything(recipe.seed + len(planned))
        last = "fine-tuning after the last step"
        with _step_errors("recipe field 'finetune'", last, model_name):
            run_finetune(
                work,
                splits,
                table,
                recipe.finetune,
                teacher=teacher,
                seed=recipe.seed,
                device=dev,
                desc="fine-tune",
            )
        _check_finite_after(work, "recipe field 'finetune': fine-tuning", _FINETUNE_HINT)
    wall = time.perf_counter() - started
    work.eval()
    work.to("cpu")
    artifact = artifact_bytes(work, table, info, stored_recipe)
    _seed_everything(recipe.seed)
    report = build_report(
        original=original.cpu(),
        model=work,
        encodings=table,
        artifact=artifact,
        records=records,
        info=info,
        data=splits,
        recipe=recipe,
        steps=step_summaries,
        wall_time_s=wall,
        measure_latency=recipe.latency,
    )
    return CompressionResult(
        model=work,
        report=report,
        encodings=table,
        recipe=recipe,
        info=info,
        artifact=artifact,
        records=records,
    )


def accuracy(model: nn.Module, data: DataSplits | str, split: str = "test") -> float:
    """Top-1 accuracy of ``model`` on a split of ``data``."""
    splits = load_data(data)
    return evaluate(model, splits.loader(split, batch_size=256, shuffle=False))
