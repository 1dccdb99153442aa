"""``magnitude``: unstructured magnitude pruning, per layer or global (Han et al. 2015,
https://arxiv.org/abs/1506.02626). The baseline every pruning method is compared with."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from netshrink import (
    Capabilities,
    CompressionContext,
    Compressor,
    CompressorConfig,
    ConfigError,
    Dense,
    LayerRecord,
    Sparse,
    StepResult,
    hookimpl,
)


class MagnitudeConfig(CompressorConfig):
    """Configuration of :class:`Magnitude`."""

    sparsity: float = Field(
        0.5,
        ge=0.0,
        lt=1.0,
        description="Fraction of weights to remove (per layer, or over all selected layers).",
    )
    scope: Literal["layer", "global"] = Field(
        "layer",
        description="'layer': every layer loses `sparsity` of its weights; 'global': "
        "one threshold over all selected layers (layers lose different fractions).",
    )
    include_bias: bool = Field(False, description="Also prune biases (rarely worth it).")


class Magnitude(Compressor):
    """Unstructured magnitude pruning: zero the smallest weights, store the rest sparsely."""

    name = "magnitude"
    Config = MagnitudeConfig
    capabilities = Capabilities(handles=("Linear", "Conv1d", "Conv2d", "Conv3d"))
    paper = ('Han, Pool, Tran, Dally, "Learning both Weights and Connections for Efficient '
             'Neural Networks", NeurIPS 2015, https://arxiv.org/abs/1506.02626')
    config: MagnitudeConfig
    # Per-layer sparsity (a search's choice, or a hand-written override); 'layer' scope only.
    layer_fields = ("sparsity",)
    #: Sparsities a search offers per layer.
    search_sparsities = (0.5, 0.75, 0.9, 0.95)

    @classmethod
    def override_configs(cls, config, overrides, where=""):
        """Refuse per-layer sparsities with ``scope: global`` (one threshold for all layers),
        then validate the overrides as every compressor does."""
        if overrides and config.scope == "global":
            prefix = f"{where}: " if where else ""
            raise ConfigError(
                f"{prefix}field 'overrides': per-layer sparsity needs scope 'layer' (one global "
                "threshold gives each layer its own fraction); set config.scope: layer or drop "
                "the overrides"
            )
        return super().override_configs(config, overrides, where)

    @classmethod
    def layer_options(cls, module, name):
        """One option per sparsity of :attr:`search_sparsities`; bytes from the sparse
        encoding of the pruned weight (bias dense)."""
        weight = module.weight.detach().cpu()
        bias = getattr(module, "bias", None)
        bias_bytes = Dense(bias.detach().cpu()).payload_bytes if bias is not None else 0
        options = []
        for sparsity in cls.search_sparsities:
            mask = weight.abs() > _kth(weight.abs().reshape(-1), sparsity)
            stored = Sparse.from_dense(weight * mask, mask=mask).payload_bytes + bias_bytes
            options.append(cls.option({"sparsity": sparsity}, bytes=stored))
        return options

    def compress(self, model, layers, ctx) -> StepResult:
        cfg = self.config
        targets = []  # (layer name, tensor name, parameter)
        for lname, module in layers:
            names = ["weight"] + (["bias"] if cfg.include_bias and module.bias is not None else [])
            for pname in names:
                targets.append((lname, f"{lname}.{pname}", getattr(module, pname)))
        if cfg.scope == "global":
            magnitudes = torch.cat([p.detach().abs().reshape(-1) for _, _, p in targets])
            threshold = _kth(magnitudes, cfg.sparsity)
        records: dict[str, LayerRecord] = {}
        for lname, tname, param in ctx.progress(targets, desc="prune"):
            weight = param.detach()
            if cfg.scope == "layer":
                threshold = _kth(weight.abs().reshape(-1), self.config_for(lname).sparsity)
            mask = ctx.prune(model, tname, weight.abs() > threshold)
            rec = records.setdefault(lname, LayerRecord(lname, {"sparsity": 0.0}))
            if tname.endswith(".weight"):
                rec.details["sparsity"] = round(1 - float(mask.float().mean()), 6)
        if cfg.scope == "global":
            _warn_emptied(ctx, records)
        return StepResult(model, list(records.values()))


#: Under ``scope: global``, a layer left with less than 1% of its weights is named in a warning:
#: one threshold over layers of different scales can all but empty a layer (e.g. timm
#: MobileNetV3's ``conv_head`` keeps 0.08% at 90% global, docs/methods/baselines.md).
EMPTIED_SPARSITY = 0.99


def _warn_emptied(ctx: CompressionContext, records: dict[str, LayerRecord]) -> None:
    """Warn about the layers that the global threshold left with almost no weights."""
    emptied = sorted((rec.details["sparsity"], name) for name, rec in records.items()
                     if rec.details["sparsity"] >= EMPTIED_SPARSITY)
    if not emptied:
        return
    names = ", ".join(f"{name} ({sparsity:.2%})" for sparsity, name in reversed(emptied[-5:]))
    more = f" and {len(emptied) - 5} more" if len(emptied) > 5 else ""
    ctx.logger.warning(
        "magnitude: scope 'global' removed at least %.0f%% of the weights of %d layer(s): "
        "%s%s; such layers pass little but their bias. Use scope 'layer', a lower sparsity, "
        "or leave them out of the selection", EMPTIED_SPARSITY * 100, len(emptied), names, more)


def _kth(values: torch.Tensor, fraction: float) -> float:
    """The magnitude below or at which ``fraction`` of ``values`` lie (-1 when nothing goes)."""
    k = round(fraction * values.numel())
    if k <= 0:
        return -1.0
    return float(torch.kthvalue(values.float().cpu(), k).values)


@hookimpl
def register_compressors(register):
    register(Magnitude)
