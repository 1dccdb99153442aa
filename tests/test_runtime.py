"""The packed runtime: every encoding kind loads packed, matches the dense decode, stays small."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import netshrink as ns
from netshrink.artifact import artifact_bytes
from netshrink.encodings.packing import pack_bits, unpack_bits
from netshrink.runtime import (
    PACKED_RTOL,
    CsrLinear,
    Int4WeightLinear,
    Int8WeightLinear,
    StoredTensor,
    resident_bytes,
    unpack_codes,
)


def _Net() -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, 20, 3, padding=1),
        relu1=nn.ReLU(),
        flat=nn.Flatten(),
        fc=nn.Linear(20 * 4 * 4, 50),  # neither a multiple of 16 rows nor of 32 columns
        relu2=nn.ReLU(),
        out=nn.Linear(50, 10),
    ))


def _quant(bits: int, symmetric: bool, per_channel: bool):
    return lambda w: ns.Quantized.quantize(w, bits, symmetric=symmetric, per_channel=per_channel)


def _codebook(perturbed: bool):
    def encode(w: torch.Tensor) -> ns.Encoding:
        flat = w.reshape(-1)
        edges = torch.quantile(flat, torch.linspace(0, 1, 17)[1:-1])
        index = torch.bucketize(flat, edges)
        centroids = torch.stack([flat[index == i].mean() for i in range(16)])
        if not perturbed:
            return ns.Codebook(index, centroids, shape=w.shape)
        spreads = torch.stack([flat[index == i].std() for i in range(16)])
        return ns.Codebook(index, centroids, shape=w.shape, seed=7, noise_scale=0.5,
                           spreads=spreads)

    return encode


def _sparse(keep: float, values: str):
    def encode(w: torch.Tensor) -> ns.Encoding:
        cut = w.abs().reshape(-1).kthvalue(int((1 - keep) * w.numel())).values
        pruned = torch.where(w.abs() > cut, w, torch.zeros_like(w))
        if values == "dense":
            return ns.Sparse.from_dense(pruned)
        return ns.Sparse.from_dense(pruned, value_encoder=lambda v, p, s: ns.Quantized.quantize(
            v, 4, per_channel=True, positions=p, full_shape=s))

    return encode


ENCODERS = {
    **{f"q{b}-{'sym' if s else 'asym'}-{'ch' if c else 't'}": _quant(b, s, c)
       for b in (1, 2, 3, 4, 5, 6, 8) for s in (True, False) for c in (True, False)},
    "codebook": _codebook(False),
    "codebook-perturbed": _codebook(True),
    "sparse10-dense": _sparse(0.1, "dense"),
    "sparse10-q4": _sparse(0.1, "q4"),
    "sparse60-dense": _sparse(0.6, "dense"),
}


def _saved(tmp_path, encode) -> tuple[nn.Module, nn.Module, torch.Tensor, int]:
    torch.manual_seed(0)
    model = _Net().eval()
    table = ns.EncodingTable()
    for name in ("conv.weight", "fc.weight"):
        table.apply(model, name, encode(model.get_parameter(name).detach()))
    info = ns.ModelInfo(spec="", input_shape=(3, 4, 4), num_classes=10, head="out")
    path = tmp_path / "m.nsk"
    path.write_bytes(artifact_bytes(model, table, info))
    x = torch.randn(5, 3, 4, 4)
    return ns.load(path), ns.load(path, runtime="packed"), x, path.stat().st_size


@pytest.mark.parametrize("kind", list(ENCODERS))
def test_packed_matches_dense_and_stays_small(tmp_path, kind):
    dense, packed, x, _ = _saved(tmp_path, ENCODERS[kind])
    with torch.no_grad():
        expected, got = dense(x), packed(x)
    allowed = PACKED_RTOL * float(expected.abs().max()) + 1e-5
    assert float((got - expected).abs().max()) <= allowed
    assert resident_bytes(packed) < resident_bytes(dense)
    # The convolution keeps its stored arrays and decodes them in forward.
    assert isinstance(packed.conv.parametrizations.weight[0], StoredTensor)
    fc = packed.fc
    if kind.startswith("q"):
        bits = int(kind[1])
        assert isinstance(fc, Int4WeightLinear if bits <= 4 else Int8WeightLinear)
    elif kind == "sparse10-dense":  # quantized values stay stored: CSR would widen them
        assert isinstance(fc, CsrLinear)
    else:
        assert isinstance(fc.parametrizations.weight[0], StoredTensor)


def test_stored_tensors_hold_exactly_the_artifact_arrays(tmp_path):
    """A codebook conv in the packed model holds its packed indices and centroids, nothing
    dense: its bytes are the artifact's bytes for that tensor."""
    _, packed, _, _ = _saved(tmp_path, _codebook(False))
    stored = packed.conv.parametrizations.weight[0]
    held = sum(b.numel() * b.element_size() for b in stored.buffers())
    numel = packed.conv.weight.numel()
    assert held == (numel * 4 + 7) // 8 + 16 * 4  # 4-bit indices + 16 fp32 centroids
    assert packed.conv.parametrizations.weight.original.numel() == 0


@pytest.mark.parametrize("bits", range(1, 9))
def test_unpack_codes_matches_numpy(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=1001)
    packed = torch.from_numpy(pack_bits(codes, bits))
    assert torch.equal(unpack_codes(packed, bits, 1001).long(),
                       torch.from_numpy(unpack_bits(pack_bits(codes, bits), bits, 1001)))


def test_unknown_runtime_is_refused(tmp_path):
    path = tmp_path / "m.nsk"
    path.write_bytes(artifact_bytes(_Net(), ns.EncodingTable(), None))
    with pytest.raises(ns.ConfigError, match="field 'runtime'"):
        ns.load(path, runtime="fast")


def test_vgg_small_4bit_is_a_sixth_of_dense_in_memory(tmp_path):
    """Issue 15's bar: a 4-bit quantize artifact of zoo:vgg_small holds at most 1/6 of the dense
    model's bytes once loaded packed, and computes the same outputs."""
    torch.manual_seed(0)
    model = ns.load_model("zoo:vgg_small", num_classes=10, in_chans=3, input_size=32)
    result = ns.compress(model, [ns.step("quantize", bits=4)], latency=False)
    path = result.save(tmp_path / "vgg.nsk", report=False)
    dense, packed = ns.load(path), ns.load(path, runtime="packed")
    assert resident_bytes(packed) * 6 <= resident_bytes(dense)
    assert result.report.resident_bytes_packed == resident_bytes(packed)
    assert result.report.resident_bytes_dense == resident_bytes(dense)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected, got = dense(x), packed(x)
    assert float((got - expected).abs().max()) <= PACKED_RTOL * float(expected.abs().max()) + 1e-5


def test_report_memory_shows_packed_below_dense(tmp_path):
    import re

    from click.testing import CliRunner

    from netshrink.cli import cli

    torch.manual_seed(0)
    model = ns.load_model("zoo:lenet300", num_classes=10, in_chans=1, input_size=8)
    path = ns.compress(model, [ns.step("quantize", bits=4)], latency=False).save(
        tmp_path / "q4.nsk", report=False)
    out = CliRunner().invoke(cli, ["report", str(path), "--memory"], terminal_width=200).output
    rows = re.findall(r"(packed|dense)\s*│\s*([\d,]+)", out)
    held = {runtime: int(number.replace(",", "")) for runtime, number in rows}
    assert held["packed"] == resident_bytes(ns.load(path, runtime="packed"))
    assert held["dense"] == resident_bytes(ns.load(path))
    assert held["packed"] * 4 < held["dense"]
