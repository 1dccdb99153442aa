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


class Quantized(Encoding):
    """Uniform quantization: ``value = (code - zero_point) * scale`` with b-bit packed codes.

    Scales and zero points are per tensor or per output channel (axis 0 of ``full_shape``). When
    nested in :class:`Sparse`, the decoded values are the non-zeros of a tensor of ``full_shape``
    and each value's channel is found from its position.

    Costs ``ceil(numel * bits / 8)`` bytes of codes; per channel, plus 4 bytes of fp32 scale per
    channel and 1 byte of zero point per channel when the zero points differ. A per-tensor scale
    and zero point live in the manifest. Build one with :meth:`quantize` unless you already have
    codes on your own grid.
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
    ) -> None:
        """Wrap codes already on a grid (:meth:`quantize` computes them from floats).

        Args:
            codes: integer codes in ``[0, 2**bits - 1]``, any shape (stored flat).
            bits: bits per code, 1 to 8.
            scale: one float (per tensor) or one per output channel (``full_shape[0]`` of them).
            zero_point: integer codes that decode to 0, as many as ``scale`` (each in
                ``[0, 2**bits - 1]``).
            full_shape: the shape of the whole tensor, whose axis 0 the per-channel scales
                follow. Give it when these codes are the kept values of a :class:`Sparse`
                tensor (``codes`` then has one code per kept value); default: ``shape``.
            shape: the decoded shape (default: ``codes.shape``); ``(nnz,)`` inside a Sparse.
        """
        super().__init__(shape or tuple(codes.shape))
        if not 1 <= bits <= 8:
            raise EncodingError(f"quantization bits must be in [1, 8], got {bits}")
        self.bits = int(bits)
        self.codes = codes.reshape(-1).to(torch.int64)
        self.scale = scale.reshape(-1).to(torch.float32)
        self.zero_point = zero_point.reshape(-1).to(torch.int64)
        self.full_shape = tuple(full_shape or self.shape)
        if self.scale.numel() not in (1, self.full_shape[0] if self.full_shape else 1):
            raise EncodingError(
                f"{self.scale.numel()} scales for a tensor of shape {self.full_shape}"
            )

    @property
    def per_channel(self) -> bool:
        """True if scales are per output channel."""
        return self.scale.numel() > 1

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

        The returned encoding's shape is ``values.shape``.
        """
        values = values.detach().float().cpu()
        full_shape = tuple(full_shape or values.shape)
        flat = values.reshape(-1)
        channels = full_shape[0] if per_channel and len(full_shape) > 1 else 1
        group = _channel_of(positions, flat.numel(), full_shape, channels)
        levels = (1 << bits) - 1
        if symmetric:
            absmax = torch.zeros(channels).scatter_reduce(0, group, flat.abs(), "amax")
            half = max((1 << (bits - 1)) - 1, 1)
            scale = absmax / half
            zero_point = torch.full((channels,), 1 << (bits - 1) if bits > 1 else 0)
            if bits == 1:  # {0, +s}: magnitude-only 1-bit codes
                scale = absmax
        else:
            lo = torch.zeros(channels).scatter_reduce(0, group, flat, "amin").clamp(max=0)
            hi = torch.zeros(channels).scatter_reduce(0, group, flat, "amax").clamp(min=0)
            scale = (hi - lo) / levels
            zero_point = torch.round(-lo / torch.where(scale > 0, scale, torch.ones_like(scale)))
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = zero_point.to(torch.int64).clamp(0, levels)
        codes = torch.round(flat / scale[group]) + zero_point[group]
        codes = codes.clamp(0, levels).to(torch.int64)
        return cls(codes, bits, scale, zero_point, full_shape=full_shape, shape=tuple(values.shape))

    def decode(self, positions: torch.Tensor | None = None) -> torch.Tensor:
        group = _channel_of(positions, self.codes.numel(), self.full_shape, self.scale.numel())
        values = (self.codes - self.zero_point[group]).float() * self.scale[group]
        return values.reshape(self.shape)

    def arrays(self) -> dict[str, torch.Tensor]:
        out = {"codes": _u8(pack_bits(self.codes.numpy(), self.bits))}
        if self.per_channel:
            out["scale"] = self.scale
            if bool((self.zero_point != self.zero_point[0]).any()):
                out["zp"] = self.zero_point.to(torch.uint8)
        return out

    def meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"b": self.bits}
        if not self.per_channel:
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
        else:
            scale = torch.tensor([np.float32(meta["sc"])], dtype=torch.float32)
        _require_finite(scale, "scale")
        channels = scale.numel()
        if "zp" in arrays:
            zero_point = arrays["zp"].to(torch.int64)
        else:
            zero_point = torch.full((channels,), int(meta["zp"]), dtype=torch.int64)
        return cls(codes, bits, scale, zero_point, full_shape=full_shape, shape=shape)

    def describe(self) -> str:
        return f"q{self.bits}{'/ch' if self.per_channel else ''}"


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
