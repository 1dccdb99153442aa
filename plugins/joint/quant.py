"""Weight grids of the ``joint`` plugin: fake quantization (straight-through) during training
and the matching storage encodings at export.

Bits >= 2 use a symmetric uniform grid ``{-h..h} * scale`` with ``h = 2**(bits-1) - 1``: the
exact grid :class:`~netshrink.encodings.Quantized` decodes (zero point ``2**(bits-1)``), so the
values seen in training are the values stored. One bit cannot be done with a zero-point grid
(zero would take one of the two levels, and pruned weights are already zero), so 1-bit layers
use a two-entry :class:`~netshrink.encodings.Codebook` ``{c-, c+}``: a sign bit per kept weight.
"""

from __future__ import annotations

import torch

from netshrink import Codebook, Dense, Encoding, Quantized, Sparse

#: Clipping ratios (of the largest kept magnitude) tried when fitting a scale: clipping a few
#: outliers lowers the rounding error of all other weights at low bit-widths.
CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15)
#: At most this many values are rounded at once while fitting a scale (bounds the memory).
_CHUNK_VALUES = 1 << 22


def half_levels(bits: int) -> int:
    """Largest code magnitude ``h`` of the symmetric grid (codes ``-h..h``)."""
    return max((1 << (bits - 1)) - 1, 1)


def _grid(values: torch.Tensor, bits: int, scale: torch.Tensor) -> torch.Tensor:
    """Round ``values`` to the grid (no gradient). ``scale`` broadcasts against ``values``."""
    if bits == 1:
        # scale holds the two centroids [c-, c+]; zero stays zero (pruned or exactly zero).
        out = torch.where(values > 0, scale[1], scale[0])
        return torch.where(values == 0, torch.zeros_like(values), out)
    h = half_levels(bits)
    return torch.round(values / scale).clamp(-h, h) * scale


def fit_scale(values: torch.Tensor, bits: int, channels: int = 1) -> torch.Tensor:
    """The grid scale (or, for 1 bit, the two centroids) with the least squared error on
    ``values`` (the kept weights). ``channels > 1``: one scale per row of ``values``."""
    values = values.detach().float()
    if bits == 1:
        neg, pos = values[values < 0], values[values > 0]
        c_neg = float(neg.mean()) if neg.numel() else -1.0
        c_pos = float(pos.mean()) if pos.numel() else 1.0
        return torch.tensor([c_neg, c_pos], dtype=torch.float32, device=values.device)
    if values.numel() == 0:  # everything pruned: any scale decodes nothing
        return torch.ones(max(channels, 1), dtype=torch.float32, device=values.device)
    rows = values.reshape(channels, -1) if channels > 1 else values.reshape(1, -1)
    h = half_levels(bits)
    absmax = rows.abs().amax(dim=1).clamp_min(1e-12)
    ratios = torch.tensor(CLIP_RATIOS, dtype=torch.float32, device=rows.device)
    scales = (absmax[None, :] * ratios[:, None] / h).to(torch.float32)  # (ratios, rows)
    kept = rows != 0  # only non-zero inputs count: a zero is pruned and never stored
    # Every clip ratio at once (a few at a time for large layers): one error per (ratio, row).
    chunk = max(1, _CHUNK_VALUES // max(rows.numel(), 1))
    errors = torch.cat([
        ((_grid(rows, bits, part[:, :, None]) - rows) ** 2 * kept).sum(dim=2)
        for part in scales.split(chunk)
    ])
    # The first ratio with the least error (argmin keeps the first of equal values).
    return scales.gather(0, errors.argmin(dim=0, keepdim=True))[0]


def quantize(values: torch.Tensor, bits: int, scale: torch.Tensor) -> torch.Tensor:
    """``values`` rounded to the grid (per-tensor or per-output-channel ``scale``)."""
    if bits == 1 or scale.numel() == 1:
        return _grid(values, bits, scale if bits == 1 else scale.reshape(()))
    shape = (-1,) + (1,) * (values.dim() - 1)
    return _grid(values, bits, scale.reshape(shape))


def fake_quant(weight: torch.Tensor, bits: int | None, scale: torch.Tensor | None) -> torch.Tensor:
    """Straight-through fake quantization: forward rounds, backward passes the gradient as is."""
    if bits is None or scale is None:
        return weight
    return weight + (quantize(weight.detach(), bits, scale) - weight).detach()


def encode_weight(
    weight: torch.Tensor, mask: torch.Tensor, bits: int, scale: torch.Tensor
) -> Sparse:
    """The sparse, ``bits``-bit encoding of ``weight`` kept at ``mask``.

    Weights that round to zero are dropped from the mask (storing a zero costs an index and a
    code for nothing). The decoded tensor equals :func:`quantize` of the masked weight.
    """
    weight = weight.detach().float().cpu()
    scale = scale.detach().float().cpu()
    mask = mask.detach().cpu().bool() & (quantize(weight * mask, bits, scale) != 0)

    def encoder(values: torch.Tensor, positions: torch.Tensor, full_shape) -> Encoding:
        if bits == 1:
            indices = (values > 0).to(torch.int64)
            return Codebook(indices, scale.reshape(2), shape=(values.numel(),))
        h = half_levels(bits)
        zero_point = 1 << (bits - 1)
        if scale.numel() == 1:
            group = torch.zeros(values.numel(), dtype=torch.int64)
        else:
            per_row = int(torch.tensor(full_shape[1:]).prod()) if len(full_shape) > 1 else 1
            group = torch.div(positions, per_row, rounding_mode="floor")
        codes = torch.round(values / scale[group]).clamp(-h, h).to(torch.int64) + zero_point
        zp = torch.full((scale.numel(),), zero_point, dtype=torch.int64)
        return Quantized(
            codes,
            bits,
            scale.reshape(-1),
            zp,
            full_shape=tuple(full_shape),
            shape=(values.numel(),),
        )

    return Sparse.from_dense(weight * mask, mask=mask, value_encoder=encoder)


def encode_bias(bias: torch.Tensor, mode: str) -> Encoding:
    """A bias stored as 8-bit codes (``q8``) or plain floats (``fp16``/``fp32``)."""
    if mode == "q8":
        return Quantized.quantize(bias.detach(), 8, symmetric=True)
    dtype = torch.float16 if mode == "fp16" else torch.float32
    return Dense(bias.detach().cpu(), storage_dtype=dtype, dtype=bias.dtype)


def bias_fake_quant(bias: torch.Tensor, mode: str) -> torch.Tensor:
    """The bias as :func:`encode_bias` will store it, with a straight-through gradient."""
    with torch.no_grad():
        if mode == "q8":
            absmax = bias.abs().max()
            scale = absmax / 127 if float(absmax) > 0 else torch.ones(())
            q = torch.round(bias / scale).clamp(-127, 127) * scale
        elif mode == "fp16":
            q = bias.to(torch.float16).to(bias.dtype)
        else:
            return bias
    return bias + (q - bias).detach()
