"""Layer encodings: how each tensor is stored, and honest byte counts from what is stored.

Kinds: :class:`Dense` (a dtype), :class:`Sparse` (bitmask or relative indices + a nested value
encoding), :class:`Quantized` (b-bit codes + per-tensor/per-channel scale and zero point),
:class:`Codebook` (k centroids + packed indices + an optional seeded perturbation). Structured
pruning and factorisation need no kind of their own: they produce physically smaller or extra
tensors, each with its own encoding.
"""

from netshrink.encodings.base import DTYPE_NAMES, DTYPES, Encoding
from netshrink.encodings.kinds import Codebook, Dense, Quantized, Sparse
from netshrink.encodings.packing import pack_bits, packed_nbytes, unpack_bits
from netshrink.encodings.table import EncodingTable, model_tensors, refit


def encode_values(tensor, existing: Encoding | None, value_encoder) -> Encoding:
    """Encode ``tensor``'s values with ``value_encoder(values, positions, full_shape)``, keeping
    an existing sparse structure: pruned zeros stay unstored and only the kept values are
    encoded (so prune → quantize composes into one sparse+quantized record)."""
    if isinstance(existing, Sparse):
        return Sparse.from_dense(tensor, mask=existing.mask(), value_encoder=value_encoder)
    flat = tensor.detach().cpu().reshape(-1)
    enc = value_encoder(flat, None, tuple(tensor.shape))
    enc.shape = tuple(tensor.shape)
    return enc


__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "Codebook",
    "Dense",
    "Encoding",
    "EncodingTable",
    "Quantized",
    "Sparse",
    "encode_values",
    "model_tensors",
    "pack_bits",
    "packed_nbytes",
    "refit",
    "unpack_bits",
]
