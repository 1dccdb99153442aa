"""The built-in encodings: dense, quantized, codebook and sparse (which nests a value encoding)."""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch

from netshrink.encodings.base import DTYPE_NAMES, DTYPES, Encoding, f32
from netshrink.encodings.packing import pack_bits, packed_nbytes, unpack_bits
from netshrink.errors import EncodingError


def _u8(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.uint8))


class Dense(Encoding):
    """A plain tensor stored in ``storage_dtype`` (e.g. fp16) and decoded to ``dtype``.

    Costs ``numel * storage_dtype.itemsize`` bytes. Example: ``Dense(w, torch.float16)`` stores
    an fp32 weight in half the bytes and decodes it to fp32 again.
    """

    kind = "dense"

    def __init__(
        self,
        tensor: torch.Tensor,
        storage_dtype: torch.dtype | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Store a copy of ``tensor`` (any shape; the decoded shape).

        Args:
            tensor: the values; copied, so training the parameter later does not change it.
            storage_dtype: the dtype written to the artifact (default: ``tensor.dtype``); one of
                :data:`netshrink.encodings.DTYPES` (F32, F16, BF16, F64, I64 ... BOOL).
            dtype: the dtype :meth:`decode` returns (default: ``tensor.dtype``).
        """
        super().__init__(tuple(tensor.shape))
        self.dtype = dtype or tensor.dtype
        storage_dtype = storage_dtype or tensor.dtype
        if storage_dtype not in DTYPE_NAMES:
            raise EncodingError(f"unsupported storage dtype {storage_dtype}")
        # A copy: the encoding must not change when the model's parameter is trained further.
        self.data = tensor.detach().to("cpu", storage_dtype, copy=True).contiguous()

    def decode(self, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.data.to(self.dtype).reshape(self.shape)

    def arrays(self) -> dict[str, torch.Tensor]:
        return {"data": self.data.reshape(-1)}

    def meta(self) -> dict[str, Any]:
        return {} if self.dtype == self.data.dtype else {"d": DTYPE_NAMES[self.dtype]}

    @classmethod
    def from_parts(cls, shape, meta, arrays, children):
        data = arrays["data"]
        if data.numel() != int(np.prod(shape)):
            raise EncodingError(f"dense data has {data.numel()} elements for shape {shape}")
        dtype = DTYPES[meta["d"]] if "d" in meta else data.dtype
        return cls(data.reshape(shape), dtype=dtype)

    def describe(self) -> str:
        return f"dense-{DTYPE_NAMES[self.data.dtype].lower()}"


#: Largest ``group_size`` an artifact may declare (the manifest schema refuses more).
MAX_GROUP_SIZE = 2**20

#: Clipping ratios ``clip="mse"`` tries per group (1.0 first, so ties keep the full range).
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(21))

ClipMethod = Literal["none", "mse", "percentile"]


class Quantized(Encoding):
    """Uniform quantization: ``value = (code - zero_point) * scale`` with b-bit packed codes.

    Scales and zero points are per tensor, per output channel (axis 0 of ``full_shape``), or
    per output channel and group of ``group_size`` consecutive input columns: the tensor seen
    as ``(out, K)`` with ``K = prod(full_shape[1:])`` has ``ceil(K / group_size)`` groups per
    row (the last one may be shorter). When nested in :class:`Sparse`, the decoded values are
    the non-zeros of a tensor of ``full_shape`` and each value's channel and group are found
    from its position.

    Costs ``ceil(numel * bits / 8)`` bytes of codes; per channel or per group, plus 4 bytes of
    fp32 scale per channel (group) and 1 byte of zero point per channel (group) when the zero
    points differ. A per-tensor scale and zero point live in the manifest, as does the group
    size. Build one with :meth:`quantize` unless you already have codes on your own grid.
    """

    kind = "quant"
    value_encoded = True

    def __init__(
        self,
        codes: torch.Tensor,
        bits: int,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        full_shape: tuple[int, ...] | None = None,
        shape: tuple[int, ...] | None = None,
        group_size: int | None = None,
    ) -> None:
        """Wrap codes already on a grid (:meth:`quantize` computes them from floats).

        Args:
            codes: integer codes in ``[0, 2**bits - 1]``, any shape (stored flat).
            bits: bits per code, 1 to 8.
            scale: one float (per tensor), one per output channel (``full_shape[0]`` of them),
                or with ``group_size`` one per row and group, row-major
                (``full_shape[0] * ceil(K / group_size)``).
            zero_point: integer codes that decode to 0, as many as ``scale`` or one for all
                (each in ``[0, 2**bits - 1]``).
            full_shape: the shape of the whole tensor, whose axis 0 the per-channel scales
                follow. Give it when these codes are the kept values of a :class:`Sparse`
                tensor (``codes`` then has one code per kept value); default: ``shape``.
            shape: the decoded shape (default: ``codes.shape``); ``(nnz,)`` inside a Sparse.
            group_size: input columns per scale (1 to :data:`MAX_GROUP_SIZE`), for a
                ``full_shape`` of at least 2 dimensions; ``None``: per tensor or per channel.
        """
        super().__init__(shape or tuple(codes.shape))
        if not 1 <= bits <= 8:
            raise EncodingError(f"quantization bits must be in [1, 8], got {bits}")
        self.bits = int(bits)
        self.codes = codes.reshape(-1).to(torch.int64)
        self.scale = scale.reshape(-1).to(torch.float32)
        self.full_shape = tuple(full_shape or self.shape)
        self.group_size = _check_group_size(group_size, self.full_shape)
        zero_point = zero_point.reshape(-1).to(torch.int64)
        if zero_point.numel() == 1 and self.scale.numel() > 1:
            zero_point = zero_point.expand(self.scale.numel()).clone()
        self.zero_point = zero_point
        if self.scale.numel() not in _scale_counts(self.full_shape, self.group_size):
            valid = " or ".join(map(str, sorted(_scale_counts(self.full_shape, self.group_size))))
            raise EncodingError(
                f"{self.scale.numel()} scales for a tensor of shape {self.full_shape}"
                + (f" with group_size {self.group_size}" if self.group_size else "")
                + f" (expected {valid})"
            )
        if self.zero_point.numel() != self.scale.numel():
            raise EncodingError(
                f"{self.zero_point.numel()} zero points for {self.scale.numel()} scales"
            )

    @property
    def per_channel(self) -> bool:
        """True if there is more than one scale: per output channel, or per channel and group
        of columns when :attr:`group_size` is set."""
        return self.scale.numel() > 1

    @property
    def grouped(self) -> bool:
        """True if scales are per output channel and group of ``group_size`` input columns."""
        return self.group_size is not None

    def scale_index(self, positions: torch.Tensor | None = None) -> torch.Tensor:
        """For each flat position of the full tensor (default: all of them, in order), the
        index of its scale and zero point."""
        if positions is None:
            positions = torch.arange(int(np.prod(self.full_shape)) if self.full_shape else 1)
        return _scale_index(positions, positions.numel(), self.full_shape,
                            self.scale.numel(), self.group_size)

    @classmethod
    def quantize(
        cls,
        values: torch.Tensor,
        bits: int,
        *,
        symmetric: bool = True,
        per_channel: bool = False,
        positions: torch.Tensor | None = None,
        full_shape: tuple[int, ...] | None = None,
        group_size: int | None = None,
        clip: ClipMethod = "none",
        percentile: float = 99.9,
    ) -> Quantized:
        """Quantize ``values`` (a full tensor, or non-zeros at ``positions`` of ``full_shape``).

        Zero is always exactly representable, so pruned zeros stay zeros.

        Args:
            values: the floats to quantize: a whole tensor, or the flat kept values of a sparse
                tensor (then also pass ``positions`` and ``full_shape``).
            bits: bits per code, 1 to 8.
            symmetric: a grid symmetric around 0 (``zero_point = 2**(bits-1)``, codes
                ``-(2**(bits-1) - 1)..2**(bits-1) - 1`` around it); else an asymmetric grid from
                each group's min and max, zero included. Symmetric 1-bit codes are ``{0, +max}``
                (magnitudes only: negative values become 0); store signs with a two-entry
                :class:`Codebook` instead.
            per_channel: one scale (and zero point) per output channel (axis 0 of
                ``full_shape``); ignored for 1-D tensors.
            positions: flat indices of ``values`` in the full tensor (the ``positions`` a
                ``value_encoder`` receives), so each value finds its channel.
            full_shape: the whole tensor's shape (default: ``values.shape``).
            group_size: one scale (and zero point) per output channel and group of this many
                consecutive input columns of the tensor flattened to ``(out, K)`` (overrides
                ``per_channel``; ignored for 1-D tensors). Costs 4 bytes (+1 asymmetric) per
                ``out * ceil(K / group_size)`` groups.
            clip: how each group's range is chosen: ``"none"`` (its min/max), ``"mse"`` (the
                ratio of :data:`CLIP_RATIOS` whose de-quantized values have the smallest squared
                error; 21 quantize passes) or ``"percentile"`` (the ``percentile``-th percentile
                of the group's magnitudes; one sort).
            percentile: for ``clip="percentile"``, in (0, 100].

        The returned encoding's shape is ``values.shape``.
        """
        if clip not in ("none", "mse", "percentile"):
            raise EncodingError(f"clip must be 'none', 'mse' or 'percentile', got {clip!r}")
        if not 0.0 < percentile <= 100.0:
            raise EncodingError(f"percentile must be in (0, 100], got {percentile}")
        if not 1 <= bits <= 8:
            raise EncodingError(f"quantization bits must be in [1, 8], got {bits}")
        values = values.detach().float().cpu()
        full_shape = tuple(full_shape or values.shape)
        flat = values.reshape(-1)
        group_size = group_size if len(full_shape) > 1 else None
        _check_group_size(group_size, full_shape)
        if group_size is not None:
            count = full_shape[0] * -(-int(np.prod(full_shape[1:])) // group_size)
        else:
            count = full_shape[0] if per_channel and len(full_shape) > 1 else 1
        index = _scale_index(positions, flat.numel(), full_shape, count, group_size)
        lo, hi = _ranges(flat, index, count, symmetric)
        if clip == "mse":
            ratio = _mse_ratio(flat, index, lo, hi, bits, symmetric)
        elif clip == "percentile":
            ratio = _percentile_ratio(flat, index, count, percentile)
        else:
            ratio = torch.ones(count)
        scale, zero_point = _grid(lo * ratio, hi * ratio, bits, symmetric)
        codes = _round_codes(flat, scale[index], zero_point[index], bits)
        return cls(codes, bits, scale, zero_point, full_shape=full_shape,
                   shape=tuple(values.shape), group_size=group_size)

    @staticmethod
    def round_codes(
        values: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int
    ) -> torch.Tensor:
        """Nearest codes of ``values`` on the grid ``(code - zero_point) * scale`` (elementwise
        ``scale`` and ``zero_point``, e.g. ``enc.scale[enc.scale_index()]``), clamped to
        ``[0, 2**bits - 1]``: how :meth:`quantize` rounds, for methods that choose their own
        values on a fixed grid (GPTQ)."""
        return _round_codes(values, scale, zero_point, bits)

    def decode(self, positions: torch.Tensor | None = None) -> torch.Tensor:
        index = _scale_index(positions, self.codes.numel(), self.full_shape, self.scale.numel(),
                             self.group_size)
        values = (self.codes - self.zero_point[index]).float() * self.scale[index]
        return values.reshape(self.shape)

    def arrays(self) -> dict[str, torch.Tensor]:
        out = {"codes": _u8(pack_bits(self.codes.numpy(), self.bits))}
        if self.per_channel or self.grouped:
            out["scale"] = self.scale
            if bool((self.zero_point != self.zero_point[0]).any()):
                out["zp"] = self.zero_point.to(torch.uint8)
        return out

    def meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"b": self.bits}
        if self.grouped:
            meta["g"] = self.group_size
        elif not self.per_channel:
            meta["sc"] = f32(float(self.scale[0]))
        if "zp" not in self.packed():
            meta["zp"] = int(self.zero_point[0])
        if self.full_shape != self.shape:
            meta["fs"] = list(self.full_shape)
        return meta

    @classmethod
    def from_parts(cls, shape, meta, arrays, children):
        bits = int(meta["b"])
        numel = int(np.prod(shape))
        codes = torch.from_numpy(unpack_bits(arrays["codes"].numpy(), bits, numel))
        full_shape = tuple(meta.get("fs", shape))
        if "scale" in arrays:
            scale = arrays["scale"]
        elif "g" in meta:
            raise EncodingError("a grouped quantized tensor needs its scale array")
        else:
            scale = torch.tensor([np.float32(meta["sc"])], dtype=torch.float32)
        _require_finite(scale, "scale")
        channels = scale.numel()
        if "zp" in arrays:
            zero_point = arrays["zp"].to(torch.int64)
        else:
            zero_point = torch.full((channels,), int(meta["zp"]), dtype=torch.int64)
        return cls(codes, bits, scale, zero_point, full_shape=full_shape, shape=shape,
                   group_size=meta.get("g"))

    def describe(self) -> str:
        if self.grouped:
            return f"q{self.bits}/g{self.group_size}"
        return f"q{self.bits}{'/ch' if self.per_channel else ''}"


def _round_codes(
    values: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int
) -> torch.Tensor:
    """See :meth:`Quantized.round_codes`."""
    codes = torch.round(values / scale) + zero_point
    return codes.clamp(0, (1 << bits) - 1).to(torch.int64)


def _check_group_size(group_size: int | None, full_shape: tuple[int, ...]) -> int | None:
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        raise EncodingError(f"group_size must be a whole number, got {group_size!r}")
    if not 1 <= group_size <= MAX_GROUP_SIZE:
        raise EncodingError(f"group_size must be in [1, {MAX_GROUP_SIZE}], got {group_size}")
    if len(full_shape) < 2:
        raise EncodingError(
            f"group_size needs a tensor of at least 2 dimensions (out, in, ...), got shape "
            f"{full_shape}"
        )
    return int(group_size)


def _scale_counts(full_shape: tuple[int, ...], group_size: int | None) -> set[int]:
    """How many scales a tensor of ``full_shape`` may have."""
    if group_size is not None:
        return {full_shape[0] * -(-int(np.prod(full_shape[1:])) // group_size)}
    return {1, full_shape[0] if full_shape else 1}


def _ranges(
    flat: torch.Tensor, index: torch.Tensor, count: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's range, zero included: ``(-absmax, absmax)`` symmetric, else (min, max)."""
    if symmetric:
        absmax = torch.zeros(count).scatter_reduce(0, index, flat.abs(), "amax")
        return -absmax, absmax
    lo = torch.zeros(count).scatter_reduce(0, index, flat, "amin").clamp(max=0)
    hi = torch.zeros(count).scatter_reduce(0, index, flat, "amax").clamp(min=0)
    return lo, hi


def _grid(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points of the grids covering ``[lo, hi]`` per group."""
    levels = (1 << bits) - 1
    if symmetric:
        half = max((1 << (bits - 1)) - 1, 1)
        scale = hi / half if bits > 1 else hi.clone()  # 1 bit: {0, +s}, magnitudes only
        zero_point = torch.full((hi.numel(),), 1 << (bits - 1) if bits > 1 else 0)
    else:
        scale = (hi - lo) / levels
        zero_point = torch.round(-lo / torch.where(scale > 0, scale, torch.ones_like(scale)))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, zero_point.to(torch.int64).clamp(0, levels)


def _mse_ratio(
    flat: torch.Tensor,
    index: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    bits: int,
    symmetric: bool,
) -> torch.Tensor:
    """Per group, the ratio of :data:`CLIP_RATIOS` whose grid reconstructs its values with the
    smallest squared error (ties keep the larger ratio)."""
    best = torch.ones(lo.numel())
    best_err = torch.full((lo.numel(),), float("inf"))
    for ratio in CLIP_RATIOS:
        scale, zero_point = _grid(lo * ratio, hi * ratio, bits, symmetric)
        s, z = scale[index], zero_point[index]
        recon = (_round_codes(flat, s, z, bits) - z).float() * s
        err = torch.zeros(lo.numel(), dtype=torch.float64).scatter_add(
            0, index, (recon - flat).double() ** 2
        )
        better = err < best_err.double()
        best = torch.where(better, torch.tensor(ratio, dtype=torch.float32), best)
        best_err = torch.where(better, err.float(), best_err)
    return best


def _percentile_ratio(
    flat: torch.Tensor,
    index: torch.Tensor,
    count: int,
    percentile: float,
) -> torch.Tensor:
    """Per group, ``percentile(|values|) / max|values|`` (nearest rank; 1 for empty groups)."""
    mags = flat.abs()
    order = torch.argsort(mags, stable=True)
    order = order[torch.argsort(index[order], stable=True)]  # by group, ascending within
    sizes = torch.bincount(index, minlength=count)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = (torch.ceil(sizes.double() * percentile / 100.0).long() - 1).clamp(min=0)
    pick = (starts + rank).clamp(max=max(flat.numel() - 1, 0))
    top = mags[order][pick] if flat.numel() else torch.zeros(count)
    absmax = torch.zeros(count).scatter_reduce(0, index, mags, "amax")
    ratio = torch.where((sizes > 0) & (absmax > 0), top / absmax.clamp(min=1e-30), 1.0)
    return ratio.clamp(min=1e-6, max=1.0).float()


class Codebook(Encoding):
    """Weight sharing: ``ceil(log2 k)``-bit indices into ``k`` centroids, plus an optional
    perturbation regenerated from a seed (so it costs no storage):
    ``value = centroid[i] + scale * spread[i] * noise(seed)``.

    Costs ``ceil(numel * max(1, ceil(log2 k)) / 8)`` bytes of indices plus ``4 * k`` bytes of
    fp32 centroids, and ``2 * k`` bytes of fp16 spreads when perturbed; the seed and the noise
    scale live in the manifest. ``k`` is at most ``2**16``.
    """

    kind = "codebook"
    value_encoded = True

    def __init__(
        self,
        indices: torch.Tensor,
        centroids: torch.Tensor,
        *,
        shape: tuple[int, ...] | None = None,
        seed: int | None = None,
        noise_scale: float = 0.0,
        spreads: torch.Tensor | None = None,
        distribution: Literal["normal", "uniform"] = "normal",
    ) -> None:
        """Index ``centroids`` with ``indices``.

        Args:
            indices: the centroid index of every element, integers in ``[0, k)``; any shape,
                stored flat (e.g. k-means labels over ``w.reshape(-1)``).
            centroids: the ``k`` shared values (stored as fp32).
            shape: the decoded shape; needed when ``indices`` is flat and the tensor is not
                (``shape=w.shape``). Default: ``indices.shape``. Inside a :class:`Sparse` or a
                ``value_encoder``, leave it flat: ``(n_values,)``.
            seed: with a non-zero ``noise_scale``, regenerate a perturbation from this seed:
                ``value = centroids[i] + noise_scale * spreads[i] * noise``.
            noise_scale: the perturbation's scale (0: none).
            spreads: one per-cluster spread per centroid (stored as fp16; required when
                perturbed), e.g. the within-cluster standard deviation.
            distribution: the noise: ``"normal"`` (standard normal) or ``"uniform"`` (in
                ``[-1, 1)``), drawn from ``torch.Generator().manual_seed(seed)``.
        """
        super().__init__(shape or tuple(indices.shape))
        self.indices = indices.reshape(-1).to(torch.int64)
        self.centroids = centroids.reshape(-1).to(torch.float32)
        k = self.centroids.numel()
        if k < 1:
            raise EncodingError("a codebook needs at least one centroid")
        if self.indices.numel() and int(self.indices.max()) >= k:
            raise EncodingError(f"codebook index {int(self.indices.max())} out of range for k={k}")
        self.bits = max(1, math.ceil(math.log2(k)))
        if distribution not in ("normal", "uniform"):
            raise EncodingError(f"distribution must be 'normal' or 'uniform', got {distribution!r}")
        self.seed = seed
        self.noise_scale = float(np.float32(noise_scale))
        # Spreads are stored as fp16: round them now so in-memory decoding matches the artifact.
        self.spreads = (
            None if spreads is None else spreads.reshape(-1).to(torch.float16).to(torch.float32)
        )
        self.distribution = distribution
        if self.seed is not None and self.noise_scale != 0.0 and self.spreads is None:
            raise EncodingError("a perturbed codebook needs per-cluster spreads")

    @property
    def perturbed(self) -> bool:
        """True if a seeded perturbation is added to the centroids."""
        return self.seed is not None and self.noise_scale != 0.0

    def noise(self) -> torch.Tensor:
        """The regenerated perturbation (zeros when unperturbed)."""
        n = self.indices.numel()
        if not self.perturbed:
            return torch.zeros(n)
        gen = torch.Generator(device="cpu").manual_seed(int(self.seed))
        if self.distribution == "normal":
            return torch.randn(n, generator=gen)
        return torch.rand(n, generator=gen) * 2 - 1

    def decode(self, positions: torch.Tensor | None = None) -> torch.Tensor:
        values = self.centroids[self.indices]
        if self.perturbed:
            values = (
                values + np.float32(self.noise_scale) * self.spreads[self.indices] * self.noise()
            )
        return values.reshape(self.shape)

    def arrays(self) -> dict[str, torch.Tensor]:
        out = {
            "idx": _u8(pack_bits(self.indices.numpy(), self.bits)),
            "centroids": self.centroids,
        }
        if self.perturbed:
            out["spreads"] = self.spreads.to(torch.float16)
        return out

    def meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"n": self.centroids.numel()}
        if self.perturbed:
            meta.update(seed=int(self.seed), ns=f32(self.noise_scale))
            if self.distribution != "normal":
                meta["dist"] = self.distribution
        return meta

    @classmethod
    def from_parts(cls, shape, meta, arrays, children):
        centroids = arrays["centroids"]
        _require_finite(centroids, "centroids")
        if "spreads" in arrays:
            _require_finite(arrays["spreads"], "spreads")
        seed = meta.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise EncodingError(f"codebook seed must be an integer, got {str(seed)[:40]!r}")
        _require_finite(torch.tensor([float(np.float32(meta.get("ns", 0.0)))]), "noise scale")
        k = int(meta["n"])
        if centroids.numel() != k:
            raise EncodingError(f"codebook has {centroids.numel()} centroids, manifest says {k}")
        bits = max(1, math.ceil(math.log2(k)))
        indices = torch.from_numpy(unpack_bits(arrays["idx"].numpy(), bits, int(np.prod(shape))))
        spreads = arrays.get("spreads")
        return cls(
            indices,
            centroids,
            shape=shape,
            seed=meta.get("seed"),
            noise_scale=float(np.float32(meta.get("ns", 0.0))),
            spreads=None if spreads is None else spreads.float(),
            distribution=meta.get("dist", "normal"),
        )

    def describe(self) -> str:
        return f"codebook{self.centroids.numel()}{'+seed' if self.perturbed else ''}"


def _require_finite(values: torch.Tensor, what: str) -> None:
    """Refuse NaN or infinite stored values: they would load as a silently broken model."""
    if values.is_floating_point() and not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise EncodingError(f"{what} not finite: {bad} of {values.numel()} values are NaN or inf")


def _channel_of(
    positions: torch.Tensor | None, count: int, full_shape: tuple[int, ...], channels: int
) -> torch.Tensor:
    """The output-channel index of each of ``count`` values (0 for per-tensor)."""
    if channels <= 1:
        return torch.zeros(count, dtype=torch.int64)
    per_channel = int(np.prod(full_shape[1:])) if len(full_shape) > 1 else 1
    flat = positions if positions is not None else torch.arange(count)
    return torch.div(flat, per_channel, rounding_mode="floor").to(torch.int64)


def _scale_index(
    positions: torch.Tensor | None,
    count: int,
    full_shape: tuple[int, ...],
    scales: int,
    group_size: int | None,
) -> torch.Tensor:
    """The scale index of each of ``count`` values: its group's (row-major over rows and groups
    of ``group_size`` columns of the tensor seen as ``(out, K)``), else its channel's."""
    if group_size is None:
        return _channel_of(positions, count, full_shape, scales)
    k = int(np.prod(full_shape[1:]))
    groups = -(-k // group_size)
    flat = positions.to(torch.int64) if positions is not None else torch.arange(count)
    row = torch.div(flat, k, rounding_mode="floor")
    return row * groups + torch.div(flat - row * k, group_size, rounding_mode="floor")


# -- sparse ---------------------------------------------------------------------------------


def _relative_codes(positions: np.ndarray, bits: int) -> np.ndarray:
    """Gap codes with escapes: code 0 advances ``2**bits - 1`` without a value; code c > 0
    advances c and places the next value."""
    step = (1 << bits) - 1
    gaps = np.diff(positions, prepend=-1)
    escapes = (gaps - 1) // step
    remainder = gaps - escapes * step
    total = int(escapes.sum()) + len(gaps)
    codes = np.zeros(total, dtype=np.int64)
    value_slots = np.arange(len(gaps)) + np.cumsum(escapes)
    codes[value_slots] = remainder
    return codes


def _positions_from_relative(codes: np.ndarray, bits: int) -> np.ndarray:
    step = (1 << bits) - 1
    advance = np.where(codes == 0, step, codes)
    ends = np.cumsum(advance) - 1
    return ends[codes > 0]


class Sparse(Encoding):
    """Zeros are not stored: a bitmask or relative indices (whichever is smaller) locate the
    non-zeros, whose values are stored by a nested encoding (dense, quantized, codebook).

    Costs the index, ``ceil(numel / 8)`` bytes as a bitmask or ``ceil(n_codes * b / 8)`` bytes
    of ``b``-bit gaps (``n_codes``: one per kept value plus ``(gap - 1) // (2**b - 1)`` escape
    codes per gap), plus the nested value encoding's bytes. Build one with :meth:`from_dense`.
    """

    kind = "sparse"

    def __init__(
        self,
        shape: tuple[int, ...],
        positions: torch.Tensor,
        values: Encoding,
        index_bits: int | None = None,
    ) -> None:
        """Assemble from parts (:meth:`from_dense` builds them from a tensor and a mask).

        Args:
            shape: the decoded (full) tensor's shape.
            positions: flat indices of the kept values into ``shape``, unique and ascending.
            values: the encoding of the kept values, with ``len(positions)`` elements in
                ``positions`` order (e.g. ``Dense(kept)``, or a ``Quantized`` given
                ``full_shape=shape``).
            index_bits: 0 for a bitmask, 1 to 8 for relative indices of that width; default:
                whichever stores the positions in the fewest bytes.
        """
        super().__init__(shape)
        self.positions = positions.reshape(-1).to(torch.int64)
        if values.numel != self.positions.numel():
            raise EncodingError(
                f"sparse tensor has {self.positions.numel()} positions but {values.numel} values"
            )
        self.values = values
        self.index_bits = self._best_index_bits() if index_bits is None else index_bits

    @classmethod
    def from_dense(
        cls, tensor: torch.Tensor, mask: torch.Tensor | None = None, value_encoder=None
    ) -> Sparse:
        """Sparse encoding of ``tensor`` keeping ``mask`` (default: its non-zeros).

        ``value_encoder(values, positions, full_shape) -> Encoding`` encodes the kept values
        (default: dense in the tensor's dtype). It receives the kept values as a flat tensor,
        their flat indices into ``tensor`` and ``tensor.shape``, and must return an encoding of
        ``len(values)`` elements, e.g.
        ``lambda v, p, s: Quantized.quantize(v, 4, positions=p, full_shape=s)``.

        A kept position whose value is 0 is still stored (``mask`` decides, not the values).
        """
        flat = tensor.detach().cpu().reshape(-1)
        keep = (flat != 0) if mask is None else mask.detach().cpu().reshape(-1).bool()
        positions = torch.nonzero(keep).reshape(-1)
        values = flat[positions]
        enc = (value_encoder or _dense_values)(values, positions, tuple(tensor.shape))
        return cls(tuple(tensor.shape), positions, enc)

    def mask(self) -> torch.Tensor:
        """Boolean mask of stored positions, shaped like the tensor."""
        mask = torch.zeros(self.numel, dtype=torch.bool)
        mask[self.positions] = True
        return mask.reshape(self.shape)

    def _index_bytes(self, bits: int) -> int:
        if bits == 0:
            return packed_nbytes(self.numel, 1)
        codes = _relative_codes(self.positions.numpy(), bits) if self.positions.numel() else []
        return packed_nbytes(len(codes), bits)

    def _best_index_bits(self) -> int:
        """0 = bitmask; otherwise the relative-index width with the fewest bytes."""
        costs = {bits: self._index_bytes(bits) for bits in range(0, 9)}
        return min(costs, key=lambda b: (costs[b], b))

    def decode(self, positions: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.zeros(self.numel, dtype=torch.float32)
        values = self.values.decode(positions=self.positions).reshape(-1)
        out = out.to(values.dtype)
        out[self.positions] = values
        return out.reshape(self.shape)

    @property
    def nonzeros(self) -> int:
        return int(torch.count_nonzero(self.values.decode(positions=self.positions)))

    def arrays(self) -> dict[str, torch.Tensor]:
        if self.index_bits == 0:
            return {"mask": _u8(np.packbits(self.mask().reshape(-1).numpy()))}
        codes = _relative_codes(self.positions.numpy(), self.index_bits)
        return {"rel": _u8(pack_bits(codes, self.index_bits))}

    def meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"ib": self.index_bits}
        if self.index_bits:
            meta["nr"] = len(_relative_codes(self.positions.numpy(), self.index_bits))
        return meta

    def children(self) -> dict[str, Encoding]:
        return {"v": self.values}

    @classmethod
    def from_parts(cls, shape, meta, arrays, children):
        bits = int(meta["ib"])
        numel = int(np.prod(shape))
        if bits == 0:
            mask = np.unpackbits(arrays["mask"].numpy())[:numel].astype(bool)
            positions = np.nonzero(mask)[0]
        else:
            codes = unpack_bits(arrays["rel"].numpy(), bits, int(meta["nr"]))
            positions = _positions_from_relative(codes, bits)
            if positions.size and (positions[-1] >= numel or positions[0] < 0):
                raise EncodingError(f"sparse positions exceed the tensor of shape {shape}")
        return cls(shape, torch.from_numpy(positions.astype(np.int64)), children["v"], bits)

    def describe(self) -> str:
        index = "mask" if self.index_bits == 0 else f"rel{self.index_bits}"
        return f"sparse({index})+{self.values.describe()}"


def _dense_values(values: torch.Tensor, positions: torch.Tensor, full_shape) -> Encoding:
    return Dense(values)
