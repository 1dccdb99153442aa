"""Round-trip property tests for bit packing and every encoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from netshrink.encodings import (
    Codebook,
    Dense,
    Encoding,
    EncodingTable,
    Quantized,
    Sparse,
    encode_values,
    pack_bits,
    packed_nbytes,
    unpack_bits,
)
from netshrink.errors import EncodingError

FAST = settings(max_examples=40, deadline=None)


def roundtrip(enc: Encoding) -> Encoding:
    """Serialise through a blob and back, as the artifact does."""
    store: list[torch.Tensor] = []

    def write(arr: torch.Tensor):
        store.append(arr.clone())
        return len(store) - 1

    record = enc.to_record(write)
    return Encoding.from_record(record, lambda ref: store[ref])


@FAST
@given(st.integers(1, 16), st.lists(st.integers(0, 2**16 - 1), max_size=300))
def test_pack_roundtrip(bits, values):
    codes = np.array([v % (1 << bits) for v in values], dtype=np.int64)
    packed = pack_bits(codes, bits)
    assert packed.size == packed_nbytes(len(codes), bits)
    assert np.array_equal(unpack_bits(packed, bits, len(codes)), codes)


def test_pack_rejects_out_of_range():
    with pytest.raises(EncodingError, match="out of range"):
        pack_bits(np.array([4]), 2)
    with pytest.raises(EncodingError, match="too short"):
        unpack_bits(np.zeros(1, dtype=np.uint8), 4, 3)


shapes = st.sampled_from([(7,), (3, 5), (4, 3, 3, 3), (10, 1)])


@FAST
@given(shapes, st.integers(0, 2**31 - 1), st.sampled_from([torch.float32, torch.float16]))
def test_dense_roundtrip(shape, seed, storage):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    enc = Dense(t, storage_dtype=storage, dtype=torch.float32)
    back = roundtrip(enc)
    assert torch.equal(back.decode(), enc.decode())
    assert back.decode().dtype == torch.float32
    assert enc.payload_bytes == t.numel() * (4 if storage == torch.float32 else 2)


@FAST
@given(shapes, st.integers(0, 2**31 - 1), st.integers(2, 8), st.booleans(), st.booleans())
def test_quantized_roundtrip(shape, seed, bits, symmetric, per_channel):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    enc = Quantized.quantize(t, bits, symmetric=symmetric, per_channel=per_channel)
    decoded = enc.decode()
    assert torch.equal(roundtrip(enc).decode(), decoded)
    # at most 2**bits distinct values per channel, and the error is bounded by the step size
    step = enc.scale.max()
    assert float((decoded - t).abs().max()) <= float(step) * (1.0 if not symmetric else 1.01) + 1e-6
    assert torch.equal(
        Quantized.quantize(torch.zeros(shape), bits, symmetric=symmetric).decode(),
        torch.zeros(shape),
    )


grouped_shapes = st.sampled_from([(3, 5), (4, 3, 3, 3), (10, 1), (2, 17)])


@FAST
@given(grouped_shapes, st.integers(0, 2**31 - 1), st.integers(2, 8), st.booleans(),
       st.integers(1, 40), st.sampled_from(["none", "mse", "percentile"]), st.booleans())
def test_grouped_quantized_roundtrip(shape, seed, bits, symmetric, group, clip, pruned):
    """Group scales (ragged last groups included), every clip rule, dense or inside Sparse:
    the record round trip is exact and the payload is codes + 4 B per group (+1 B zero point
    per group when they differ)."""
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if pruned:
        t[t.abs() < 0.5] = 0
    kwargs = {"symmetric": symmetric, "group_size": group, "clip": clip}
    if pruned:
        enc = Sparse.from_dense(t, value_encoder=lambda v, p, s: Quantized.quantize(
            v, bits, positions=p, full_shape=s, **kwargs))
        values = enc.values
    else:
        enc = values = Quantized.quantize(t, bits, **kwargs)
    columns = int(np.prod(shape[1:]))
    groups = shape[0] * -(-columns // group)
    assert values.scale.numel() == groups
    assert torch.equal(roundtrip(enc).decode(), enc.decode())
    zp = groups if bool((values.zero_point != values.zero_point[0]).any()) else 0
    assert values.payload_bytes == packed_nbytes(values.numel, bits) + 4 * groups + zp
    if clip == "none":  # within half a step of the value's own group grid
        step = values.scale[values.scale_index(enc.positions if pruned else None)]
        kept = t.reshape(-1)[enc.positions] if pruned else t.reshape(-1)
        assert bool(((values.decode(enc.positions if pruned else None).reshape(-1) - kept).abs()
                     <= step * 0.5 + 1e-6).all())


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(2, 64), st.booleans())
def test_codebook_roundtrip(seed, k, perturbed):
    gen = torch.Generator().manual_seed(seed)
    n = 200
    idx = torch.randint(0, k, (n,), generator=gen)
    centroids = torch.randn(k, generator=gen)
    spreads = torch.rand(k, generator=gen)
    enc = Codebook(
        idx,
        centroids,
        shape=(20, 10),
        seed=seed if perturbed else None,
        noise_scale=0.3 if perturbed else 0.0,
        spreads=spreads if perturbed else None,
    )
    back = roundtrip(enc)
    assert torch.equal(back.decode(), enc.decode())  # bit-for-bit, perturbation included
    assert enc.bits == max(1, int(np.ceil(np.log2(k))))
    if perturbed:
        assert not torch.equal(enc.decode(), centroids[idx].reshape(20, 10))


@FAST
@given(
    shapes,
    st.integers(0, 2**31 - 1),
    st.floats(0.0, 1.0),
    st.sampled_from(["dense", "quant", "codebook"]),
)
def test_sparse_roundtrip(shape, seed, density, inner):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=gen)
    t = t * (torch.rand(shape, generator=gen) < density)

    def encoder(values, positions, full_shape):
        if inner == "dense":
            return Dense(values)
        if inner == "quant":
            return Quantized.quantize(
                values, 4, per_channel=True, positions=positions, full_shape=full_shape
            )
        return Codebook(
            torch.zeros(values.numel(), dtype=torch.int64),
            torch.tensor([1.5]),
            shape=tuple(values.shape),
        )

    enc = Sparse.from_dense(t, value_encoder=encoder)
    back = roundtrip(enc)
    assert torch.equal(back.decode(), enc.decode())
    assert torch.equal(enc.mask(), t != 0)
    if inner == "dense":
        assert torch.equal(enc.decode(), t)


def test_sparse_picks_smaller_index():
    t = torch.zeros(10_000)
    t[::97] = 1.0  # ~1% dense: relative indices beat a 10,000-bit mask
    enc = Sparse.from_dense(t)
    assert enc.index_bits > 0
    assert enc.payload_bytes < 10_000 // 8
    dense = torch.ones(1000)
    dense[::2] = 0  # 50% dense: the bitmask wins
    assert Sparse.from_dense(dense).index_bits == 0


def test_encode_values_keeps_sparsity():
    t = torch.randn(8, 16)
    t[t.abs() < 0.8] = 0
    sparse = Sparse.from_dense(t)
    enc = encode_values(
        t, sparse, lambda v, p, s: Quantized.quantize(v, 3, positions=p, full_shape=s)
    )
    assert isinstance(enc, Sparse)
    assert torch.equal(enc.mask(), t != 0)
    assert enc.is_value_encoded
    plain = encode_values(t, None, lambda v, p, s: Quantized.quantize(v, 3, full_shape=s))
    assert isinstance(plain, Quantized) and plain.shape == (8, 16)


def test_table_refit_and_refusal():
    lin = torch.nn.Linear(4, 3)
    table = EncodingTable()
    w = lin.weight.detach().clone()
    w[0] = 0
    table.apply(lin, "weight", Sparse.from_dense(w))
    with torch.no_grad():
        lin.weight[1, 1] = 5.0  # new value at a kept position: sparse refits
    table.reconcile(lin)
    assert float(table["weight"].decode()[1, 1]) == 5.0
    table.apply(lin, "bias", Quantized.quantize(lin.bias.detach(), 4))
    with torch.no_grad():
        lin.bias.add_(0.123)
    with pytest.raises(EncodingError, match="cannot be refitted"):
        table.reconcile(lin)


def test_malformed_record_is_artifact_error():
    from netshrink.errors import ArtifactError

    with pytest.raises(ArtifactError):
        Encoding.from_record({"k": "nope", "s": [1]}, lambda r: torch.zeros(1))
    with pytest.raises(ArtifactError):
        Encoding.from_record({"k": "dense", "s": [3], "a": {"data": 0}}, lambda r: torch.zeros(2))
