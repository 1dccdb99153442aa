"""Vectorised bit packing of unsigned integer codes (1 to 16 bits each), MSB first."""

from __future__ import annotations

import numpy as np

from netshrink.errors import EncodingError


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes needed to pack ``count`` codes of ``bits`` bits."""
    return (count * bits + 7) // 8


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integer ``codes`` into a uint8 array using ``bits`` bits per code."""
    if not 1 <= bits <= 16:
        raise EncodingError(f"bits must be in [1, 16], got {bits}")
    codes = np.asarray(codes).reshape(-1)
    if codes.size == 0:
        return np.zeros(0, dtype=np.uint8)
    if codes.min() < 0 or codes.max() >= (1 << bits):
        raise EncodingError(
            f"codes out of range for {bits}-bit packing: min {codes.min()}, max {codes.max()}"
        )
    codes = codes.astype(np.uint32)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint32)
    bit_matrix = ((codes[:, None] >> shifts[None, :]) & 1).astype(np.uint8)
    return np.packbits(bit_matrix.reshape(-1))


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` codes as int64."""
    if not 1 <= bits <= 16:
        raise EncodingError(f"bits must be in [1, 16], got {bits}")
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size < packed_nbytes(count, bits):
        raise EncodingError(
            f"packed array too short: {packed.size} bytes for {count} codes of {bits} bits"
        )
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    bit_stream = np.unpackbits(packed)[: count * bits].reshape(count, bits).astype(np.int64)
    weights = 1 << np.arange(bits - 1, -1, -1, dtype=np.int64)
    return bit_stream @ weights
