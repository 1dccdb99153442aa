"""``quantize``: uniform post-training quantization of weights to 2-8 bits (per channel or per
tensor, symmetric or asymmetric), stored as packed integer codes (Jacob et al. 2018,
https://arxiv.org/abs/1712.05877). Composes with pruning: zeros stay unstored."""

from __future__ import annotations

import torch
from pydantic import Field

from netshrink import (
    Capabilities,
    Compressor,
    CompressorConfig,
    Dense,
    LayerRecord,
    Quantized,
    StepResult,
    encode_values,
    hookimpl,
)


class QuantizeConfig(CompressorConfig):
    """Configuration of :class:`Quantize`."""

    bits: int = Field(8, ge=2, le=8, description="Bits per weight code.")
    per_channel: bool = Field(True, description="One scale per output channel (else per tensor).")
    symmetric: bool = Field(
        True, description="Symmetric range around zero (else min/max with a zero point)."
    )
    bias_fp16: bool = Field(True, description="Store biases as float16 instead of float32.")


class Quantize(Compressor):
    """Uniform post-training weight quantization with packed b-bit codes."""

    name = "quantize"
    Config = QuantizeConfig
    capabilities = Capabilities(
        handles=("Linear", "Conv1d", "Conv2d", "Conv3d"), encodes_values=True
    )
    paper = ('Jacob, Kligys, Chen, Zhu, Tang, Howard, Adam, Kalenichenko, "Quantization and '
             'Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", '
             'CVPR 2018, https://arxiv.org/abs/1712.05877')
    config: QuantizeConfig

    def compress(self, model, layers, ctx) -> StepResult:
        cfg = self.config
        records = []
        for lname, module in ctx.progress(layers, desc="quantize"):
            tname = f"{lname}.weight"
            weight = module.weight.detach()
            before = weight.clone()

            def encoder(values, positions, full_shape, _cfg=cfg):
                return Quantized.quantize(
                    values,
                    _cfg.bits,
                    symmetric=_cfg.symmetric,
                    per_channel=_cfg.per_channel,
                    positions=positions,
                    full_shape=full_shape,
                )

            enc = encode_values(weight, ctx.encoding_of(tname), encoder)
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
            records.append(
                LayerRecord(lname, {"bits": cfg.bits, "rmse": round(err, 6)})
            )
        return StepResult(model, records)


@hookimpl
def register_compressors(register):
    register(Quantize)
