"""``joint``: adaptive joint sparsity + bit-width compression (Yao, Peng, Yu, Liu, Peng,
"Adaptive joint compression method for deep neural networks", Chinese Journal of Scientific
Instrument 44(5):21-32, 2023).

Each selected layer gets its own sparsity and weight bit-width (1-8), chosen under a global
budget on the *artifact file* size; then masks (gradual magnitude pruning) and fake
quantization (straight-through estimator) are trained together, and the result is exported as
packed low-bit sparse tensors. See ``docs/methods/joint.md``.
"""

from __future__ import annotations

import math

import torch

from netshrink import (
    Capabilities,
    Compressor,
    ConfigError,
    LayerRecord,
    Sparse,
    StepResult,
    hookimpl,
)
from netshrink.plugins.joint.allocate import (
    Candidate,
    allocate_fisher,
    allocate_uniform,
    calibrate,
    candidates,
    magnitude_mask,
    predicted_dloss,
)
from netshrink.plugins.joint.budget import dense_bytes, fixed_bytes
from netshrink.plugins.joint.config import DEFAULT_RATIO, JointConfig
from netshrink.plugins.joint.quant import encode_bias, encode_weight
from netshrink.plugins.joint.train import (
    LayerPlan,
    attach,
    detach,
    joint_train,
    latent_weights,
)

__all__ = ["Joint", "JointConfig"]

PAPER = (
    'Yao Bowen, Peng Xiyuan, Yu Ximing, Liu Liansheng, Peng Yu, "Adaptive joint compression '
    'method for deep neural networks", Chinese Journal of Scientific Instrument (仪器仪表学报) '
    "44(5):21-32, 2023"
)


class Joint(Compressor):
    """Joint pruning + quantization with per-layer sparsity and bits under a size budget."""

    name = "joint"
    Config = JointConfig
    capabilities = Capabilities(
        handles=("Linear", "Conv1d", "Conv2d", "Conv3d"), needs_data=True, encodes_values=True
    )
    paper = PAPER
    # The allocator's choices per layer: a step's overrides fix them, e.g. {"conv1":
    # {"min_bits": 8, "max_bits": 8}} or {"fc3": {"sparsities": [0.5]}}.
    layer_fields = ("sparsities", "min_bits", "max_bits")
    config: JointConfig

    def compress(self, model, layers, ctx) -> StepResult:
        cfg = self.config
        seed = ctx.seed if cfg.seed is None else cfg.seed
        weights = {name: module.weight for name, module in layers}
        priors = {name: _prior(ctx.encoding_of(f"{name}.weight")) for name, _ in layers}

        # 1. Budget: the whole file, minus what does not depend on the allocation.
        target = cfg.target_bytes or math.floor(
            dense_bytes(model) / (cfg.target_ratio or DEFAULT_RATIO)
        )
        for name, module in layers:
            if getattr(module, "bias", None) is not None:
                ctx.encode(model, f"{name}.bias", encode_bias(module.bias, cfg.bias))
        placeholders = {
            f"{name}.weight": _placeholder(w, priors[name]) for name, w in weights.items()
        }
        fixed = fixed_bytes(model, ctx, placeholders)
        budget = int(target * (1 - cfg.margin)) - fixed
        if budget <= 0:
            raise ConfigError(
                f"target_ratio/target_bytes: the target of {target} bytes leaves no room for the "
                f"selected weights: the rest of the artifact (manifest, biases, unselected "
                f"tensors) already takes {fixed} bytes; lower the target or select more layers "
                "(e.g. protect_head: false)"
            )

        # 2. Allocation from a Gauss-Newton sensitivity and a knapsack (see allocate.py for why).
        def allocate(current: dict[str, torch.Tensor], desc: str) -> dict[str, Candidate]:
            return self._allocate(model, layers, current, priors, budget, ctx, seed, desc)

        choice = allocate(weights, "sensitivity")
        history = {name: [_entry(0, c)] for name, c in choice.items()}

        # 3. Joint training with masks and fake quantization.
        plans = [
            LayerPlan(
                name,
                module,
                choice[name].sparsity,
                choice[name].bits,
                priors[name],
                _channels(module.weight) if cfg.per_channel else 1,
            )
            for name, module in layers
        ]

        def reallocate(step: int) -> None:
            """Sensitivity of the model as it trains now, and a new choice under the budget."""
            new = allocate(latent_weights(plans), f"re-allocation after step {step}")
            for plan in plans:
                c = choice[plan.name] = new[plan.name]
                plan.sparsity, plan.bits = c.sparsity, c.bits
                history[plan.name].append(_entry(step, c))

        attach(plans, cfg.bias)
        try:
            trained = joint_train(
                model, plans, ctx, cfg, seed, reallocate if cfg.reallocate else None
            )
        finally:
            exported = detach(plans)

        # 4. Export: packed low-bit sparse weights, then trim if the file overshoots the target.
        for plan in plans:
            latent, mask, scale = exported[plan.name]
            ctx.encode(model, f"{plan.name}.weight", encode_weight(latent, mask, plan.bits, scale))
            if getattr(plan.module, "bias", None) is not None:
                ctx.encode(model, f"{plan.name}.bias", encode_bias(plan.module.bias, cfg.bias))
        size, trimmed = _trim(model, ctx, plans, exported, target)

        records = []
        for plan in plans:
            enc = ctx.encoding_of(f"{plan.name}.weight")
            kept = enc.values.numel if isinstance(enc, Sparse) else enc.numel
            records.append(
                LayerRecord(
                    plan.name,
                    {
                        "sparsity": round(1 - kept / enc.numel, 6),
                        "bits": plan.bits,
                        "target_sparsity": plan.sparsity,
                        "weight_bytes": enc.payload_bytes,
                        "predicted_dloss": float(f"{choice[plan.name].dloss:.4g}"),
                        # One entry per allocation: before training (step 0), then each
                        # re-allocation; the last one is the allocation exported.
                        "allocation_history": history[plan.name],
                    },
                )
            )
        summary = {
            "allocation": cfg.allocation,
            "target_bytes": target,
            "weight_budget_bytes": budget,
            "estimated_artifact_bytes": size,
            "trimmed_weights": trimmed,
            "joint_best_val_acc": trained.get("best_val_acc"),
            "reallocated_at_steps": trained.get("reallocated_at", []),
        }
        return StepResult(model, records, summary)

    def _allocate(
        self,
        model: torch.nn.Module,
        layers: list[tuple[str, torch.nn.Module]],
        weights: dict[str, torch.Tensor],
        priors: dict[str, torch.Tensor | None],
        budget: int,
        ctx,
        seed: int,
        desc: str,
    ) -> dict[str, Candidate]:
        """Per-layer (sparsity, bits) under ``budget``: the sensitivity of ``model`` as it is now
        (calibration batches of the training split), candidates cut from ``weights``."""
        cfg = self.config
        loader = ctx.require_data().loader("train", batch_size=32, seed=seed)
        calib = calibrate(model, dict(layers), loader, cfg.calib_batches, ctx.device, seed)
        options: dict[str, list[Candidate]] = {}
        for name, module in ctx.progress(layers, desc=desc, total=len(layers)):
            lcfg = self.config_for(name)
            options[name] = candidates(
                weights[name],
                lambda d, m=module, c=calib[name]: predicted_dloss(m, c, d),
                lcfg.sparsities,
                lcfg.bit_choices(),
                cfg.per_channel,
                priors[name],
            )
        if cfg.allocation == "uniform":
            return allocate_uniform(options, budget)
        return allocate_fisher(options, budget)


def _entry(step: int, choice: Candidate) -> dict[str, float | int]:
    """One allocation of one layer, as the layer record keeps it."""
    return {
        "step": step,
        "sparsity": choice.sparsity,
        "bits": choice.bits,
        "bytes": choice.bytes,
        "predicted_dloss": float(f"{choice.dloss:.4g}"),
    }


def _prior(encoding) -> torch.Tensor | None:
    """The mask of an earlier sparse step, kept pruned."""
    return encoding.mask() if isinstance(encoding, Sparse) else None


def _channels(weight: torch.Tensor) -> int:
    return int(weight.shape[0]) if weight.dim() > 1 else 1


def _placeholder(weight: torch.Tensor, prior: torch.Tensor | None) -> Sparse:
    """A stand-in encoding with the manifest record shape of the real export."""
    mask = magnitude_mask(weight.detach().cpu(), 0.99, prior)
    from netshrink.plugins.joint.quant import fit_scale

    masked = weight.detach().cpu().float() * mask
    return encode_weight(masked, mask, 4, fit_scale(masked[mask], 4))


def _trim(model, ctx, plans: list[LayerPlan], exported, target: int) -> tuple[int, int]:
    """Drop the smallest kept weights of the largest layers until the artifact fits ``target``
    (masks move a little during training, so the allocation's estimate can be off by a few
    hundred bytes). Returns the final artifact size (exact, from ``ctx.artifact_size``) and the
    number of weights dropped."""
    dropped = 0
    size = ctx.artifact_size(model)
    for _ in range(10):
        if size <= target:
            break
        plan = max(plans, key=lambda p: ctx.encoding_of(f"{p.name}.weight").payload_bytes)
        name = f"{plan.name}.weight"
        enc = ctx.encoding_of(name)
        latent, _, scale = exported[plan.name]
        mask = enc.mask()
        kept = int(mask.sum())
        per_weight = enc.payload_bytes / max(kept, 1)
        drop = min(kept, math.ceil((size - target) / per_weight * 1.1) + 1)
        if drop <= 0 or kept == 0:
            break
        mask = magnitude_mask(latent * mask, 1 - (kept - drop) / mask.numel(), mask)
        ctx.encode(model, name, encode_weight(latent, mask, plan.bits, scale))
        dropped += drop
        size = ctx.artifact_size(model)
    return size, dropped


@hookimpl
def register_compressors(register):
    register(Joint)
