"""The packed runtime: a loaded model that stays as small in memory as it is on disk.

``netshrink.load(path, runtime="packed")`` builds the model and then, instead of decoding every
encoded tensor to a dense fp32 tensor, keeps each in its stored form:

- **Linear weights quantized to 5–8 bits** run through torch's CPU weight-only int8 kernel
  (``aten._weight_int8pack_mm``): codes as int8 (one byte each) plus one fp32 scale per output
  channel. A zero point other than the symmetric 128 is folded in exactly as
  ``y += sum(x) * scale * (128 - zero_point)``.
- **Linear weights quantized to 1–4 bits** run through torch's CPU int4 kernel
  (``aten._weight_int4pack_mm_for_cpu``): codes packed two per byte plus a scale and an offset per
  group of input columns, where the input width is a multiple of 32 (other widths: below).
  Weights with group scales (``Quantized.group_size``) a multiple of 32 use the stored groups
  as they are.
- **Linear weights with group scales** of another group size, or of 5–8 bits, decode on the
  fly like the convolutions below (the int8 kernel has one scale per output channel).
- **Sparse Linear weights with plain (fp32/fp16) values** whose density is at most
  :data:`SPARSE_MAX_DENSITY` run as a torch sparse CSR matrix (fp32 values, int32 indices).
  Sparse weights whose values are quantized or clustered stay in their stored form (CSR would
  widen each value to 4 bytes plus a 4-byte index).
- **Everything else that is encoded** (convolutions, codebooks, sparse tensors above the
  threshold, any kind a plugin registers) keeps exactly the arrays the artifact stores and
  decodes them on the fly each time the module reads the tensor (a ``torch.nn.utils.parametrize``
  parametrization): memory stays packed, and the dense tensor exists only during that forward.
- Dense-encoded tensors (biases, norms, layers no step touched) are dense, as stored.
- **Layers with int8 inputs** (``Int8InputLinear`` / ``Int8InputConv*``, from ``quantize``
  with ``activations: int8``) keep their own forward, which puts the input and the output on
  the stored uint8 grids, and their encoded weights decode on the fly as above (never through
  the Linear kernels: a kernel sums in another order, and an output on a rounding boundary of
  the grid would move a whole step). Their outputs equal the dense load's exactly; the int8
  speed-up is onnxruntime's, through the ONNX export (docs/export.md).

Outputs match the dense decode up to float rounding (the kernels sum in another order): within
:data:`PACKED_RTOL` of the output's magnitude, checked for every encoding kind and every
built-in compressor by the conformance suite. The packed model is for inference: its encoded
tensors have no gradients.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from netshrink.encodings import Encoding, Quantized, Sparse
from netshrink.errors import ArtifactError

#: Sparse Linear weights at or below this density (non-zeros / elements) run as CSR. Measured
#: with ``python -m benchmarks runtime``: at batch 1 CSR beat the dense fp32 matmul below about
#: a third of the entries on this project's machine; above it, CSR also costs more memory
#: (8 bytes per non-zero) than the packed form.
SPARSE_MAX_DENSITY = 0.3

#: Documented tolerance: ``|packed - dense| <= PACKED_RTOL * max|dense| + 1e-5`` per output.
PACKED_RTOL = 1e-4

#: Runtimes :func:`netshrink.load` accepts.
RUNTIMES = ("dense", "packed")

_INT4_GROUPS = (256, 128, 64, 32)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Unpack ``count`` MSB-first ``bits``-bit codes from a uint8 tensor, in torch (as int32).

    The same layout as :func:`netshrink.encodings.packing.pack_bits`, without leaving torch, so
    a forward pass does not round-trip through numpy.
    """
    packed = packed.reshape(-1)
    if bits == 8:
        return packed[:count].to(torch.int32)
    if 8 % bits == 0:
        shifts = torch.arange(8 - bits, -1, -bits, dtype=torch.int32)
        codes = (packed.to(torch.int32)[:, None] >> shifts) & ((1 << bits) - 1)
        return codes.reshape(-1)[:count]
    shifts = torch.arange(7, -1, -1, dtype=torch.int32)
    stream = ((packed.to(torch.int32)[:, None] >> shifts) & 1).reshape(-1)[: count * bits]
    weights = 1 << torch.arange(bits - 1, -1, -1, dtype=torch.int32)
    return (stream.reshape(count, bits) * weights).sum(1, dtype=torch.int32)


class StoredTensor(nn.Module):
    """A tensor kept as its artifact arrays and decoded on the fly (a parametrization).

    Holds the encoding's record (kind, shape and fields) and its stored arrays as buffers, so
    the module's memory is the artifact's bytes for this tensor. Quantized and codebook tensors
    decode in torch; other kinds rebuild their :class:`~netshrink.Encoding` and call ``decode``.
    """

    def __init__(self, record: dict[str, Any], arrays: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.record = record
        self.roles: dict[str, str] = {}
        for i, (path, array) in enumerate(arrays.items()):
            self.register_buffer(f"a{i}", array)
            self.roles[path] = f"a{i}"

    def _array(self, path: str) -> torch.Tensor:
        return getattr(self, self.roles[path])

    def forward(self, placeholder: torch.Tensor) -> torch.Tensor:
        kind = self.record["k"]
        if kind == "quant" and "fs" not in self.record and self.record["s"]:
            return self._quantized()
        if kind == "codebook" and "spreads" not in self.roles:
            return self._codebook()
        return self._generic()

    def _quantized(self) -> torch.Tensor:
        rec, shape = self.record, tuple(self.record["s"])
        numel = int(np.prod(shape)) if shape else 1
        codes = unpack_codes(self._array("codes"), int(rec["b"]), numel).reshape(shape[0], -1)
        if "scale" in self.roles:
            scale = self._array("scale")
            scale = scale.reshape(shape[0], -1) if "g" in rec else scale.reshape(-1, 1)
        else:
            scale = torch.tensor([[float(np.float32(rec["sc"]))]])
        zp = self._array("zp").to(torch.int32) if "zp" in self.roles else rec["zp"]
        if isinstance(zp, torch.Tensor):
            zp = zp.reshape(scale.shape)
        if "g" in rec:  # one scale per row and group of g columns: widen to one per column
            scale, zp = _per_column(scale, int(rec["g"]), codes.shape[1]), _per_column(
                zp, int(rec["g"]), codes.shape[1]
            )
        return ((codes - zp).to(torch.float32) * scale).reshape(shape)

    def _codebook(self) -> torch.Tensor:
        shape = tuple(self.record["s"])
        numel = int(np.prod(shape)) if shape else 1
        centroids = self._array("centroids")
        bits = max(1, int(np.ceil(np.log2(max(centroids.numel(), 1)))))
        index = unpack_codes(self._array("idx"), bits, numel)
        return centroids[index.long()].reshape(shape)

    def _generic(self) -> torch.Tensor:
        def read(ref: Any) -> torch.Tensor:
            return self._array(ref)

        return Encoding.from_record(_with_refs(self.record, self.roles), read).decode()


def _per_column(values: Any, group: int, columns: int) -> Any:
    """Per-(row, group) values of shape ``(rows, groups)`` repeated to ``(rows, columns)``."""
    if not isinstance(values, torch.Tensor):
        return values
    # Gather by column (not repeat_interleave): a group wider than the row allocates nothing.
    return values[:, torch.arange(columns) // group]


def _with_refs(record: dict[str, Any], roles: dict[str, str], prefix: str = "") -> dict[str, Any]:
    """``record`` with each array reference replaced by its path (the key into ``roles``)."""
    out = dict(record)
    if "a" in record:
        out["a"] = {role: f"{prefix}{role}" for role in record["a"]}
    if "c" in record:
        children = record["c"].items()
        out["c"] = {name: _with_refs(c, roles, f"{prefix}{name}/") for name, c in children}
    return out


def _stored_arrays(record: dict[str, Any], read, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every array of ``record`` (children included) by path, read with ``read``."""
    arrays = {f"{prefix}{role}": read(ref) for role, ref in record.get("a", {}).items()}
    for name, child in record.get("c", {}).items():
        arrays.update(_stored_arrays(child, read, f"{prefix}{name}/"))
    return arrays


def _strip_refs(record: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in record.items() if k not in ("a", "c")}
    if "a" in record:
        out["a"] = dict.fromkeys(record["a"], None)
    if "c" in record:
        out["c"] = {name: _strip_refs(child) for name, child in record["c"].items()}
    return out


class Int8WeightLinear(nn.Module):
    """``nn.Linear`` with int8 weight codes through ``aten._weight_int8pack_mm``."""

    def __init__(self, linear: nn.Linear, enc: Quantized) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        n = self.out_features
        codes = enc.codes.reshape(n, -1)
        self.register_buffer("codes", (codes - 128).to(torch.int8).contiguous())
        scale = enc.scale.expand(n).contiguous() if enc.scale.numel() == 1 else enc.scale
        self.register_buffer("scale", scale.to(torch.float32).contiguous())
        zp = enc.zero_point.expand(n) if enc.zero_point.numel() == 1 else enc.zero_point
        offset = scale * (128 - zp).to(torch.float32)
        self.register_buffer("offset", offset if bool(offset.any()) else None)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features).to(torch.float32).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(flat, self.codes, self.scale)
        if self.offset is not None:
            y = y + flat.sum(-1, keepdim=True) * self.offset
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


class Int4WeightLinear(nn.Module):
    """``nn.Linear`` with codes of at most 4 bits through ``aten._weight_int4pack_mm_for_cpu``.

    The kernel computes ``(q - 8) * scale + offset`` per group of input columns, so a code ``c``
    with zero point ``zp`` maps exactly to ``q = c`` and ``offset = (8 - zp) * scale``. The
    kernel wants a multiple of 16 output rows and of 32 input columns: other shapes are padded
    (rows with zero scale, whose outputs are dropped; columns that meet zero inputs).
    """

    def __init__(self, linear: nn.Linear, enc: Quantized) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        n, k = self.out_features, self.in_features
        n_pad = -n % 16
        if enc.group_size is not None:  # the largest kernel group inside one stored group
            self.group = next(g for g in _INT4_GROUPS if enc.group_size % g == 0)
        else:
            # The group size (and the column padding it implies) that takes the fewest bytes:
            # half a byte per padded code plus 8 bytes of scale and offset per group and row.
            self.group = min(_INT4_GROUPS, key=lambda g: -(-k // g) * g / 2 + -(-k // g) * 8)
        self.k_padded = -(-k // self.group) * self.group
        k_pad = self.k_padded - k
        codes = enc.codes.reshape(n, k).to(torch.int32)
        codes = torch.nn.functional.pad(codes, (0, k_pad, 0, n_pad), value=8).contiguous()
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        scale = (enc.scale.expand(n) if enc.scale.numel() == 1 else enc.scale).to(torch.float32)
        zp = enc.zero_point.expand(n) if enc.zero_point.numel() == 1 else enc.zero_point
        offset = (8 - zp).to(torch.float32) * scale
        groups = self.k_padded // self.group
        pairs = torch.stack([scale, offset], dim=-1)  # (n, 2) or, grouped, (n * stored, 2)
        if enc.group_size is not None:
            # Kernel group j lies inside stored group j * group // group_size of each row.
            stored = pairs.reshape(n, -1, 2)
            which = torch.arange(groups) * self.group // enc.group_size
            pairs = stored[:, which.clamp(max=stored.shape[1] - 1)].transpose(0, 1)
            pairs = torch.nn.functional.pad(pairs, (0, 0, 0, n_pad))
        else:
            pairs = torch.nn.functional.pad(pairs, (0, 0, 0, n_pad)).expand(groups, -1, -1)
        self.register_buffer("scales_and_offsets", pairs.contiguous())
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features).to(torch.float32)
        if self.k_padded != self.in_features:
            flat = torch.nn.functional.pad(flat, (0, self.k_padded - self.in_features))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat.contiguous(), self.packed, self.group, self.scales_and_offsets
        )[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"int4 weights, group={self.group}"
        )


class CsrLinear(nn.Module):
    """``nn.Linear`` whose weight is a torch sparse CSR matrix (fp32 values, int32 indices)."""

    def __init__(self, linear: nn.Linear, weight: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            csr = weight.detach().to(torch.float32).to_sparse_csr()
        self.register_buffer("crow", csr.crow_indices().to(torch.int32))
        self.register_buffer("col", csr.col_indices().to(torch.int32))
        self.register_buffer("values", csr.values())
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features).to(torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            weight = torch.sparse_csr_tensor(
                self.crow, self.col, self.values, (self.out_features, self.in_features)
            )
        y = torch.sparse.mm(weight, flat.T).T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"CSR weights, {self.values.numel()} non-zeros"
        )


def _linear_kernel(module: nn.Module, attr: str, enc: Encoding) -> nn.Module | None:
    """A kernel-backed replacement for a Linear whose ``attr`` is encoded as ``enc``, or None."""
    if type(module) is not nn.Linear or attr != "weight":
        return None
    if isinstance(enc, Quantized) and enc.full_shape == enc.shape:
        if enc.group_size is not None:
            # Group scales: the int4 kernel takes groups of 32..256 columns; other group sizes
            # (and 5-8 bits, whose kernel has one scale per row) decode on the fly instead.
            if enc.bits <= 4 and enc.group_size % _INT4_GROUPS[-1] == 0:
                return Int4WeightLinear(module, enc)
            return None
        if enc.bits > 4:
            return Int8WeightLinear(module, enc)
        return Int4WeightLinear(module, enc)
    sparse = isinstance(enc, Sparse) and not enc.is_value_encoded
    if sparse and len(enc.positions) <= SPARSE_MAX_DENSITY * enc.numel:
        return CsrLinear(module, enc.decode())
    return None


def pack_tensor(
    model: nn.Module, name: str, record: dict[str, Any], read, decode: Encoding
) -> None:
    """Install tensor ``name`` of ``model`` in packed form (see the module docstring).

    ``record`` is the tensor's manifest record and ``read`` its array reader; ``decode`` is the
    rebuilt encoding (used for kernel layouts; its dense value is not kept).
    """
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    replacement = _linear_kernel(owner, attr, decode)
    if replacement is not None:
        _replace(model, owner_name, replacement)
        return
    arrays = _stored_arrays(record, read)
    stored = StoredTensor(_strip_refs(record), arrays)
    placeholder = torch.empty(0)
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(placeholder, requires_grad=False)
    elif attr in owner._buffers:
        owner._buffers[attr] = placeholder
    else:
        raise ArtifactError(f"model has no parameter or buffer {name!r}")
    parametrize.register_parametrization(owner, attr, stored, unsafe=True)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    if not name:
        raise ArtifactError("the packed runtime cannot replace the root module")
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def is_packable(enc: Encoding) -> bool:
    """True when the packed runtime keeps ``enc`` in a form other than a dense tensor."""
    return enc.kind != "dense"


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor storage the model holds (parameters and buffers,
    parametrization arrays included): what the model keeps in memory, measured.

    Sparse tensors count their index and value arrays; tensor subclasses (torchao's quantized
    weights) count the plain tensors they are made of."""
    seen: set[tuple[int, int]] = set()

    def count(tensor: torch.Tensor) -> int:
        if tensor.device.type == "meta":
            return 0
        if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (
            torch.Tensor,
            nn.Parameter,
        ):
            names, _ = tensor.__tensor_flatten__()
            return sum(count(getattr(tensor, name)) for name in names)
        if tensor.layout == torch.sparse_coo:
            return count(tensor._indices()) + count(tensor._values())
        if tensor.layout == torch.sparse_csr:
            parts = (tensor.crow_indices(), tensor.col_indices(), tensor.values())
            return sum(count(part) for part in parts)
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()

    return sum(count(t) for t in (*model.parameters(), *model.buffers()))


__all__ = [
    "PACKED_RTOL",
    "RUNTIMES",
    "SPARSE_MAX_DENSITY",
    "CsrLinear",
    "Int4WeightLinear",
    "Int8WeightLinear",
    "StoredTensor",
    "is_packable",
    "pack_tensor",
    "resident_bytes",
    "unpack_codes",
]
