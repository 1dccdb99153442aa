"""``quantize``: uniform post-training quantization of weights to 2-8 bits (per tensor, per
channel or per group of input columns, symmetric or asymmetric), stored as packed integer codes
(Jacob et al. 2018, https://arxiv.org/abs/1712.05877); optional clipping search and GPTQ
rounding on calibration data (Frantar et al. 2022, https://arxiv.org/abs/2210.17323); optional
static int8 activations (W8A8 / W4A8) calibrated on the validation split (``activations.py``).
Composes with pruning: zeros stay unstored."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from netshrink import (
    Capabilities,
    Compressor,
    CompressorConfig,
    Dense,
    LayerRecord,
    Quantized,
    Sparse,
    StepResult,
    encode_values,
    hookimpl,
)

from .activations import (
    calibrate,
    fold_batchnorm,
    following_batchnorms,
    following_relus,
    quantizable,
    with_int8_input,
)
from .gptq import gptq_codes, hessians, unsupported
from .options import layer_options as _search_options


class QuantizeConfig(CompressorConfig):
    """Configuration of :class:`Quantize`."""

    bits: int = Field(8, ge=2, le=8, description="Bits per weight code.")
    per_channel: bool = Field(True, description="One scale per output channel (else per tensor).")
    symmetric: bool = Field(
        True, description="Symmetric range around zero (else min/max with a zero point)."
    )
    group_size: int | None = Field(
        None,
        ge=1,
        le=2**20,
        description="One scale (and zero point) per output channel and group of this many "
        "consecutive input columns of the weight seen as (out, in*kh*kw); the last group may "
        "be shorter. Costs 4 bytes (+1 asymmetric) per group; overrides per_channel. "
        "null: per channel or per tensor.",
    )
    clip: Literal["none", "mse", "percentile"] = Field(
        "none",
        description="Range of each scale's group: 'none' (its min/max), 'mse' (the clipping "
        "ratio in 0.5..1.0, step 0.025, with the smallest squared weight error; 21 quantize "
        "passes) or 'percentile' (the 'percentile'-th percentile of the magnitudes).",
    )
    percentile: float = Field(
        99.9, gt=0, le=100, description="Percentile of |w| per group for clip: percentile."
    )
    rounding: Literal["nearest", "gptq"] = Field(
        "nearest",
        description="'nearest', or 'gptq': round columns in order with Hessian-based error "
        "feedback from calibration inputs (Linear and Conv2d; other layers round to nearest). "
        "Needs data.",
    )
    calibration_batches: int = Field(
        4, ge=1, le=1024,
        description="Validation batches whose layer inputs GPTQ and the activation observers "
        "use.",
    )
    calibration_batch_size: int = Field(
        64, ge=1, le=4096,
        description="Examples per calibration batch (rounding: gptq, activations: int8).",
    )
    damp: float = Field(
        0.01,
        gt=0,
        le=1,
        description="GPTQ damping: added to the Hessian's diagonal, as a fraction of its mean.",
    )
    bias_fp16: bool = Field(True, description="Store biases as float16 instead of float32.")
    activations: Literal["none", "int8"] = Field(
        "none",
        description="'none' (weights only), or 'int8': static uint8 quantization of each "
        "selected layer's input and output (one scale and zero point per tensor each, "
        "calibrated on the validation split; 10 stored bytes per layer; W8A8 with bits 8, "
        "W4A8 with bits 4). A BatchNorm right after a selected layer is folded into it. "
        "Needs data.",
    )
    observer: Literal["minmax", "percentile", "mse"] = Field(
        "minmax",
        description="Activation range (activations: int8): 'minmax' (what calibration saw), "
        "'percentile' (activation_percentile), or 'mse' (the clipping ratio in 0.5..1.0 with "
        "the smallest squared error).",
    )
    activation_percentile: float = Field(
        99.99, gt=50, le=100,
        description="Upper percentile of the inputs for observer: percentile (the lower one is "
        "100 minus it).",
    )
    activation_skip_first: int = Field(
        1, ge=0, le=2**20,
        description="The first this many selected layers (in model order) keep float inputs "
        "(the model's input, e.g. raw pixels, is the least robust to int8). The classifier "
        "head is left alone by the selector's protect_head.",
    )


class Quantize(Compressor):
    """Uniform post-training weight quantization with packed b-bit codes."""

    name = "quantize"
    Config = QuantizeConfig
    capabilities = Capabilities(
        handles=("Linear", "Conv1d", "Conv2d", "Conv3d"), encodes_values=True
    )
    paper = ('Jacob, Kligys, Chen, Zhu, Tang, Howard, Adam, Kalenichenko, "Quantization and '
             'Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", '
             'CVPR 2018, https://arxiv.org/abs/1712.05877; rounding "gptq": Frantar, '
             'Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for '
             'Generative Pre-trained Transformers", ICLR 2023, https://arxiv.org/abs/2210.17323')
    config: QuantizeConfig
    #: Per-layer bit-widths a search (netshrink.search) can choose, with their exact bytes.
    layer_options = classmethod(_search_options)

    def compress(self, model, layers, ctx) -> StepResult:
        cfg = self.config
        layers = list(layers)
        act_layers, folded = [], {}
        if cfg.activations == "int8":
            ctx.require_data()
            layers, act_layers, folded = self._fold(model, layers, ctx)
        calib = {}
        if cfg.rounding == "gptq":
            ctx.require_data()
            able = {name: m for name, m in layers if unsupported(m) is None}
            for name, module in layers:
                if name not in able:
                    ctx.logger.warning(
                        "quantize: layer %s rounds to nearest: GPTQ does not handle %s",
                        name, unsupported(module),
                    )
            loader = ctx.loader("val", batch_size=cfg.calibration_batch_size, shuffle=False)
            calib = hessians(model, able, loader, cfg.calibration_batches, ctx.device)
        records = []
        for lname, module in ctx.progress(layers, desc="quantize"):
            tname = f"{lname}.weight"
            before = module.weight.detach().clone()
            enc = self._encode(before, ctx.encoding_of(tname), calib.get(lname), lname)
            ctx.encode(model, tname, enc)
            if cfg.bias_fp16 and getattr(module, "bias", None) is not None:
                ctx.encode(
                    model,
                    f"{lname}.bias",
                    Dense(
                        module.bias.detach(), storage_dtype=torch.float16, dtype=module.bias.dtype
                    ),
                )
            err = float((module.weight.detach() - before).pow(2).mean().sqrt())
            details = {"bits": cfg.bits, "rmse": round(err, 6)}
            if cfg.group_size is not None:
                details["group_size"] = cfg.group_size
            if cfg.rounding == "gptq":
                details["rounding"] = "gptq" if lname in calib else "nearest"
            if lname in folded:
                details["folded_batchnorm"] = folded[lname]
            records.append(LayerRecord(lname, details))
        if act_layers:
            self._quantize_inputs(model, act_layers, records, ctx)
        return StepResult(model, records)

    def _fold(self, model, layers, ctx):
        """The layers whose inputs become int8 (all selected but the first
        ``activation_skip_first`` and those that cannot), with the BatchNorm after every selected
        layer folded in: ``(layers refreshed, names, {layer: batchnorm})``."""
        act = []
        for lname, module in layers[self.config.activation_skip_first:]:
            why = quantizable(module)
            if why is None:
                act.append(lname)
            else:
                ctx.logger.warning("quantize: layer %s keeps float inputs: %s", lname, why)
        # Every selected layer's BatchNorm is folded (not only the int8 ones): an exported
        # float layer whose weights come from DequantizeLinear cannot be fused with it later.
        folded = following_batchnorms(model, [n for n, _ in layers])
        for lname, bn in folded.items():
            fold_batchnorm(model, lname, bn)
        return [(n, model.get_submodule(n)) for n, _ in layers], act, folded

    def _quantize_inputs(self, model, names, records, ctx) -> None:
        """Calibrate the input and output grids of each of ``names`` and swap in its
        Int8Input layer."""
        cfg = self.config
        loader = ctx.loader("val", batch_size=cfg.calibration_batch_size, shuffle=False)
        grids = calibrate(
            model, {n: model.get_submodule(n) for n in names}, loader,
            cfg.calibration_batches, ctx.device, cfg.observer, cfg.activation_percentile,
            relu_outputs=following_relus(model, names),
        )
        by_name = {r.name: r for r in records}
        for name in names:
            grid_in, grid_out = grids[name]
            with_int8_input(model, name, grid_in, grid_out)
            details = by_name[name].details
            details.update(act_bits=8, act_scale=round(grid_in[0], 8),
                           act_zero_point=grid_in[1], out_scale=round(grid_out[0], 8),
                           out_zero_point=grid_out[1])

    def _encode(self, weight, previous, h, layer: str):
        """The weight's encoding: nearest codes on the configured grid, or GPTQ codes on the
        same grid when ``h`` (the layer's calibration Hessian) is given."""
        cfg = self.config

        def nearest(values, positions, full_shape):
            return Quantized.quantize(
                values,
                cfg.bits,
                symmetric=cfg.symmetric,
                per_channel=cfg.per_channel,
                positions=positions,
                full_shape=full_shape,
                group_size=cfg.group_size,
                clip=cfg.clip,
                percentile=cfg.percentile,
            )

        enc = encode_values(weight, previous, nearest)
        if h is None:
            return enc
        grid = enc.values if isinstance(enc, Sparse) else enc
        keep = previous.mask() if isinstance(previous, Sparse) else None
        codes = gptq_codes(weight, h, grid, cfg.damp, layer, keep).reshape(-1)

        def on_grid(values, positions, full_shape):
            picked = codes if positions is None else codes[positions]
            shape = tuple(full_shape) if positions is None else (values.numel(),)
            return Quantized(picked, cfg.bits, grid.scale, grid.zero_point,
                             full_shape=full_shape, shape=shape, group_size=grid.group_size)

        return encode_values(weight, previous, on_grid)


@hookimpl
def register_compressors(register):
    register(Quantize)
