"""The ``normsparse`` compressor: reparametrise, L1-train, fold, remove."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from netshrink import (
    Capabilities,
    CompressionContext,
    Compressor,
    LayerRecord,
    SelectionError,
    Sparse,
    StepResult,
    model_tensors,
)
from netshrink.plugins.normsparse.config import NormSparseConfig
from netshrink.plugins.normsparse.removal import (
    check_traceable,
    encode_kernel_sparse,
    remove_dead_units,
)
from netshrink.plugins.normsparse.reparam import Reparam, attach, dead_mask, fold
from netshrink.plugins.normsparse.train import Constraints, l1_train

PAPER = (
    '"Research on Deep Neural Network Compression Based on Matrix Sparsity" '
    "(基于矩阵稀疏化的深度神经网络压缩研究), master's thesis (applied statistics), 2019; author "
    "and university not given in the available text"
)


class NormSparse(Compressor):
    """Norm x direction reparametrisation with L1 on the norms: removes whole FC neurons and
    conv kernel slices (and empty filters)."""

    name = "normsparse"
    Config = NormSparseConfig
    capabilities = Capabilities(
        handles=("Linear", "Conv2d"), needs_data=True, changes_structure=True, needs_finetune=True
    )
    paper = PAPER
    config: NormSparseConfig

    def compress(
        self, model: nn.Module, layers: list[tuple[str, nn.Module]], ctx: CompressionContext
    ) -> StepResult:
        cfg = self.config
        head_name = ctx.info.head if ctx.info else None
        head = dict(model.named_modules()).get(head_name) if head_name else None
        work = [(n, m) for n, m in layers if m is not head]
        if not work:
            raise SelectionError(
                f"normsparse never removes the outputs of the classifier head {head_name!r}, and "
                "the selector picked nothing else; select Linear or Conv2d layers before the head"
            )
        for name, module in work:
            if parametrize.is_parametrized(module, "weight"):
                raise SelectionError(f"layer {name!r} already has a parametrization on 'weight'")
            enc = ctx.encoding_of(f"{name}.weight")
            if enc is not None and enc.is_value_encoded:
                raise SelectionError(
                    f"layer {name!r} is already {enc.describe()}-encoded; normsparse retrains "
                    "weights, so run it before quantizing/clustering steps"
                )
        ctx.require_data()
        check_traceable(model, ctx, cfg.time_limit)
        params_before = {n: sum(p.numel() for p in m.parameters()) for n, m in layers}
        model_params_before = sum(p.numel() for p in model.parameters())
        reference_acc = ctx.evaluate(model, "val")
        constraints = _constraints(model, work, ctx)

        reps = [attach(n, m) for n, m in work]
        try:
            history = l1_train(model, reps, ctx, cfg, constraints, reference_acc)
            deads = {rep.name: dead_mask(rep.r, cfg.threshold, cfg.min_keep) for rep in reps}
            magnitudes = {rep.name: rep.r.detach().clone() for rep in reps}
        finally:
            # Always leave plain weights behind, even if training failed.
            for rep in reps:
                if parametrize.is_parametrized(rep.module, "weight"):
                    fold(rep, torch.zeros_like(rep.r, dtype=torch.bool))
        for rep in reps:  # zero the removed units exactly in the folded weights
            with torch.no_grad():
                weight = rep.module.weight
                mask = deads[rep.name].reshape(
                    *deads[rep.name].shape, *([1] * (weight.dim() - deads[rep.name].dim()))
                )
                weight.masked_fill_(mask.expand_as(weight), 0.0)
        pruned_val_acc = ctx.evaluate(model, "val")

        skipped: dict[str, str] = {}
        removed = remove_dead_units(
            model, ctx, work, head, cfg.min_keep, cfg.remove_filters, skipped=skipped,
            seconds=cfg.time_limit,
        )
        records = []
        for rep in reps:
            record = self._record(
                model,
                rep,
                deads[rep.name],
                magnitudes[rep.name],
                removed[rep.name],
                params_before[rep.name],
                ctx,
            )
            if rep.name in skipped:
                record.details["skipped"] = skipped[rep.name]
            records.append(record)
        if head is not None and any(m is head for _, m in layers):
            records.append(
                LayerRecord(head_name, {"protected_head": True})
            )
        model_params_after = sum(p.numel() for p in model.parameters())
        summary: dict[str, Any] = {
            "reference_val_acc": reference_acc,
            "pruned_val_acc": pruned_val_acc,
            "epochs_run": history["epochs_run"],
            "best_epoch": history["best_epoch"],
            "admissible": history["admissible"],
            "params_before": model_params_before,
            "params_after": model_params_after,
            "history": {k: history[k] for k in ("val_acc", "removed", "l1")},
        }
        if history["admissible"] and history["best_epoch"] == 0 and len(history["val_acc"]) > 1:
            # Only the starting point was admissible: hours of L1 training may return the model
            # unchanged, which must not pass silently.
            accs = history["val_acc"][1:]
            i = max(range(len(accs)), key=accs.__getitem__)
            ctx.logger.warning(
                "normsparse: no L1 epoch kept the pruned validation accuracy within "
                "val_tolerance %.3f of %.4f (the best, epoch %d, reached %.4f with %.1f%% of "
                "the penalised weights removed); the model is returned unpruned: raise "
                "val_tolerance, lower l1 or threshold, or fine-tune after the step",
                cfg.val_tolerance,
                reference_acc,
                i + 1,
                accs[i],
                100 * history["removed"][i + 1],
            )
        if not history["admissible"]:
            ctx.logger.warning(
                "normsparse: no checkpoint kept validation accuracy within %.3f of %.4f; kept the "
                "most accurate one (lower l1 or raise val_tolerance)",
                cfg.val_tolerance,
                reference_acc,
            )
        return StepResult(model, records, summary)

    def _record(
        self,
        model: nn.Module,
        rep: Reparam,
        dead: torch.Tensor,
        r: torch.Tensor,
        removed_units: int,
        params_before: int,
        ctx: CompressionContext,
    ) -> LayerRecord:
        details: dict[str, Any] = {
            "kind": rep.kind,
            "units": dead.numel(),
            "units_removed": int(dead.sum()),
            "r_max": round(float(r.max()), 6),
            "r_median": round(float(r.median()), 6),
        }
        if rep.kind == "linear":
            details["neurons_removed"] = removed_units
            details["neurons_left"] = int(rep.module.weight.shape[0])
        else:
            live, total = encode_kernel_sparse(model, ctx, rep.name, rep.module)
            details.update(
                filters_removed=removed_units,
                filters_left=int(rep.module.weight.shape[0]),
                slices_left=live,
                slice_sparsity=round(1 - live / max(total, 1), 6),
            )
        details["params_after"] = sum(p.numel() for p in rep.module.parameters())
        return LayerRecord(rep.name, details)


def _constraints(
    model: nn.Module, work: list[tuple[str, nn.Module]], ctx: CompressionContext
) -> Constraints:
    """Masks and frozen tensors from earlier steps' encodings (looked up before the wrapper
    renames the selected weights)."""
    out = Constraints()
    selected_weights = {f"{n}.weight": n for n, _ in work}
    tensors = model_tensors(model)
    for tname, enc in ctx.encodings.items():
        tensor = tensors.get(tname)
        if not isinstance(tensor, nn.Parameter):
            continue
        if enc.is_value_encoded:
            out.frozen.append(tensor)
        elif isinstance(enc, Sparse):
            mask = enc.mask().to(tensor.device, tensor.dtype)
            if tname in selected_weights:
                out.direction_masks[selected_weights[tname]] = mask
            else:
                out.masks[id(tensor)] = (tensor, mask)
    return out
