"""Group-wise quantization scales, clipping search and GPTQ rounding (issue 21, part 1):
exact storage, schema checks, old artifacts, the packed runtime, and measured gains."""

from __future__ import annotations

import copy
import json
import math
import struct
import zlib
from collections import OrderedDict

import pytest
import torch
from click.testing import CliRunner
from pydantic import ValidationError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

import netshrink as ns
from netshrink.artifact import artifact_bytes
from netshrink.encodings import Encoding, EncodingTable, Quantized, Sparse, packed_nbytes
from netshrink.errors import ArtifactError, DataError, EncodingError
from netshrink.plugins.quantize import Quantize, QuantizeConfig
from netshrink.plugins.quantize.gptq import gptq_codes, hessians
from netshrink.runtime import PACKED_RTOL, Int4WeightLinear, StoredTensor
from netshrink.testing import conformance_cases
from netshrink.testing.fast_configs import BUILTIN_OPTION_CONFIGS


def roundtrip(enc: Encoding) -> Encoding:
    """Serialise through a list of arrays and back, as the artifact does."""
    store: list[torch.Tensor] = []

    def write(arr: torch.Tensor) -> int:
        store.append(arr.clone())
        return len(store) - 1

    return Encoding.from_record(enc.to_record(write), lambda ref: store[ref])


def _weight(shape, seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# -- the encoding ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,group", [((6, 10), 4), ((4, 3, 3, 3), 8), ((5, 7), 7),
                                         ((3, 5), 100), ((2, 9), 1)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_grouped_roundtrip_and_exact_bytes(shape, group, symmetric, bits):
    w = _weight(shape)
    enc = Quantized.quantize(w, bits, symmetric=symmetric, group_size=group)
    columns = math.prod(shape[1:])
    groups = shape[0] * -(-columns // group)  # the last group of a row may be shorter
    assert enc.scale.numel() == groups and enc.grouped and enc.group_size == group
    back = roundtrip(enc)
    assert torch.equal(back.decode(), enc.decode()) and back.group_size == group
    zp_bytes = groups if bool((enc.zero_point != enc.zero_point[0]).any()) else 0
    assert enc.payload_bytes == packed_nbytes(w.numel(), bits) + 4 * groups + zp_bytes
    # Each value is within one step of its own group's grid.
    step = enc.scale[enc.scale_index()].reshape(shape)
    assert bool(((enc.decode() - w).abs() <= step * 0.5 + 1e-6).all())
    assert enc.describe() == f"q{bits}/g{group}"


def test_groups_follow_the_columns_of_each_row():
    """Row 0's first group holds a large value; its other groups and row 1 keep fine steps."""
    w = torch.full((2, 8), 0.01)
    w[0, 0] = 10.0
    enc = Quantized.quantize(w, 4, group_size=4)
    assert enc.scale.tolist()[0] == pytest.approx(10.0 / 7)
    assert enc.scale.tolist()[1:] == pytest.approx([0.01 / 7] * 3)
    assert torch.allclose(enc.decode()[0, 4:], w[0, 4:])


def test_grouped_values_inside_sparse_find_their_groups():
    w = _weight((6, 20), seed=1)
    w[w.abs() < 0.5] = 0
    sparse = Sparse.from_dense(w, value_encoder=lambda v, p, s: Quantized.quantize(
        v, 4, symmetric=False, positions=p, full_shape=s, group_size=8))
    dense = Quantized.quantize(w, 4, symmetric=False, group_size=8)
    # Zeros do not change a group's range (it always includes 0): the same grid and values.
    assert torch.equal(sparse.values.scale, dense.scale)
    assert torch.equal(sparse.decode(), dense.decode())
    assert torch.equal(roundtrip(sparse).decode(), sparse.decode())


def test_constructor_refuses_bad_groups():
    codes = torch.zeros(2, 10, dtype=torch.int64)
    with pytest.raises(EncodingError, match=r"5 scales for a tensor of shape \(2, 10\) with "
                       r"group_size 4 \(expected 6\)"):
        Quantized(codes, 4, torch.ones(5), torch.zeros(5), group_size=4)
    for bad in (0, 2**20 + 1, 2.5, True):
        with pytest.raises(EncodingError, match="group_size"):
            Quantized(codes, 4, torch.ones(6), torch.zeros(6), group_size=bad)
    with pytest.raises(EncodingError, match="at least 2 dimensions"):
        Quantized(torch.zeros(10), 4, torch.ones(3), torch.zeros(3), group_size=4)
    # quantize ignores group_size for a 1-D tensor (a bias), like per_channel.
    assert not Quantized.quantize(torch.randn(10), 4, group_size=4).grouped


# -- clipping search -----------------------------------------------------------------------------


def _heavy_tailed(shape=(32, 256)) -> torch.Tensor:
    """Student-t weights (2 degrees of freedom): a few large outliers per row."""
    torch.manual_seed(3)
    return torch.distributions.StudentT(2.0).sample(shape) * 0.05


@pytest.mark.parametrize("group", [None, 64])
def test_mse_clipping_lowers_the_reconstruction_error(group):
    w = _heavy_tailed()
    kw = {"per_channel": True, "group_size": group}
    plain = Quantized.quantize(w, 3, **kw)
    mse = Quantized.quantize(w, 3, clip="mse", **kw)
    err_plain = float((plain.decode() - w).pow(2).mean())
    err_mse = float((mse.decode() - w).pow(2).mean())
    assert err_mse < 0.9 * err_plain, (err_mse, err_plain)
    # Never worse group by group: the full range (ratio 1) is one of the candidates.
    per_plain = torch.zeros(plain.scale.numel()).scatter_add(
        0, plain.scale_index(), (plain.decode() - w).reshape(-1) ** 2)
    per_mse = torch.zeros(mse.scale.numel()).scatter_add(
        0, mse.scale_index(), (mse.decode() - w).reshape(-1) ** 2)
    assert bool((per_mse <= per_plain * (1 + 1e-5) + 1e-12).all())
    assert torch.equal(roundtrip(mse).decode(), mse.decode())


def test_percentile_clipping_shrinks_the_range_to_the_percentile():
    w = _heavy_tailed()
    enc = Quantized.quantize(w, 4, per_channel=True, clip="percentile", percentile=99.0)
    # scale = the nearest-rank 99th percentile of each row's magnitudes / 7.
    top = w.abs().sort(dim=1).values[:, math.ceil(0.99 * 256) - 1]
    assert torch.allclose(enc.scale * 7, top)
    assert bool((enc.scale * 7 < w.abs().amax(1)).all())
    with pytest.raises(EncodingError, match="percentile"):
        Quantized.quantize(w, 4, clip="percentile", percentile=0.0)
    with pytest.raises(EncodingError, match="clip"):
        Quantized.quantize(w, 4, clip="max")


# -- the manifest ------------------------------------------------------------------------------


def _tiny() -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, 8, 3, padding=1),
        relu1=nn.ReLU(),
        flat=nn.Flatten(),
        fc=nn.Linear(8 * 4 * 4, 48),  # 128 input columns
        relu2=nn.ReLU(),
        out=nn.Linear(48, 10),
    ))


def _artifact(encode, names=("conv.weight", "fc.weight")) -> tuple[nn.Module, bytes]:
    torch.manual_seed(0)
    model = _tiny().eval()
    table = EncodingTable()
    for name in names:
        table.apply(model, name, encode(model.get_parameter(name).detach()))
    info = ns.ModelInfo(spec="", input_shape=(3, 4, 4), num_classes=10, head="out")
    return model, artifact_bytes(model, table, info)


def _grouped(group=16, bits=4, symmetric=False):
    return lambda w: Quantized.quantize(w, bits, symmetric=symmetric, group_size=group)


def _split(data: bytes) -> tuple[dict, bytes]:
    tensors = st_load(data)
    return (json.loads(zlib.decompress(tensors["manifest"].numpy().tobytes())),
            tensors["blob"].numpy().tobytes())


def _write(path, manifest: dict, blob: bytes):
    text = zlib.compress(json.dumps(manifest, separators=(",", ":")).encode(), 9)
    tensors = {"manifest": torch.frombuffer(bytearray(text), dtype=torch.uint8),
               "blob": torch.frombuffer(bytearray(blob), dtype=torch.uint8)}
    path.write_bytes(st_save(tensors, metadata={"netshrink": "1;zlib"}))
    return path


def _edited(tmp_path, data: bytes, edit, blob_edit=None):
    manifest, blob = _split(data)
    manifest = copy.deepcopy(manifest)
    edit(manifest["t"]["fc.weight"])
    return _write(tmp_path / "bad.nsk", manifest, blob_edit(manifest, blob) if blob_edit else blob)


def test_grouped_artifact_size_is_the_file_and_loads_exactly(tmp_path):
    model, data = _artifact(_grouped())
    path = tmp_path / "g.nsk"
    path.write_bytes(data)
    record = _split(data)[0]["t"]["fc.weight"]
    assert record["g"] == 16 and "sc" not in record
    loaded = ns.load(path)
    for name in ("conv.weight", "fc.weight"):
        assert torch.equal(loaded.get_parameter(name), model.get_parameter(name))


@pytest.mark.parametrize("edit,message", [
    (lambda r: r.update(g=0), r"fc.weight'\]\.group_size: .*greater than or equal to 1"),
    (lambda r: r.update(g=2**20 + 1), r"group_size: .*less than or equal to 1048576"),
    (lambda r: r.update(g="16"), r"group_size: .*integer"),
    (lambda r: r.update(g=15.5), r"group_size"),
    (lambda r: r.update(g=32), r"arrays\['scale'\]: 384 scales for shape \[48, 128\] with "
     r"group_size 32 \(expected 48 rows x ceil\(128 / 32\) groups = 192\)"),
    (lambda r: r.update(g=7), r"expected 48 rows x ceil\(128 / 7\) groups = 912"),
    (lambda r: r["a"].pop("scale"), r"arrays\['scale'\]: required with a group_size"),
    (lambda r: r.update(sc=0.5), r"scale: a grouped record stores its scales in an array only"),
    (lambda r: r.update(s=[6144], fs=[6144]), r"group_size: needs a tensor of at least 2"),
])
def test_schema_refuses_bad_group_fields(tmp_path, edit, message):
    _, data = _artifact(_grouped())
    with pytest.raises(ArtifactError, match=message):
        ns.load(_edited(tmp_path, data, edit))


def test_schema_refuses_non_finite_group_scales(tmp_path):
    _, data = _artifact(_grouped())

    def poke(manifest, blob):
        offset = manifest["t"]["fc.weight"]["a"]["scale"][1]
        out = bytearray(blob)
        struct.pack_into("<f", out, offset + 4 * 37, math.inf)
        return bytes(out)

    with pytest.raises(ArtifactError, match=r"fc.weight'\]: .*scale.*not finite"):
        ns.load(_edited(tmp_path, data, lambda r: None, poke))


def test_grouped_sparse_values_need_the_sparse_shape(tmp_path):
    def encode(w):
        w = w.clone()
        w[w.abs() < 0.05] = 0
        return Sparse.from_dense(w, value_encoder=lambda v, p, s: Quantized.quantize(
            v, 4, positions=p, full_shape=s, group_size=16))

    model, data = _artifact(encode, names=("fc.weight",))
    path = tmp_path / "ok.nsk"
    path.write_bytes(data)
    assert torch.equal(ns.load(path).fc.weight, model.fc.weight)
    with pytest.raises(ArtifactError, match="full_shape"):
        ns.load(_edited(tmp_path, data, lambda r: r["c"]["v"].pop("fs")))


def test_old_artifacts_without_group_size_load_unchanged(tmp_path):
    """Records written before group scales (per tensor, per channel: no 'g') keep their format
    and decode by the same formula."""
    old = {"k": "quant", "s": [2, 3], "b": 4, "zp": 8, "a": {"codes": 0, "scale": 1}}
    codes = torch.tensor([8, 9, 15, 0, 8, 10])
    store = [torch.from_numpy(ns.encodings.pack_bits(codes.numpy(), 4)).to(torch.uint8),
             torch.tensor([0.5, 0.25])]
    enc = Encoding.from_record(old, lambda ref: store[ref])
    assert enc.group_size is None and enc.describe() == "q4/ch"
    assert enc.decode().tolist() == [[0.0, 0.5, 3.5], [-2.0, 0.0, 0.5]]
    # Whole artifacts: the writer emits no 'g' for these, and they load exactly.
    for encode in (lambda w: Quantized.quantize(w, 4, per_channel=True),
                   lambda w: Quantized.quantize(w, 6, symmetric=False)):
        model, data = _artifact(encode)
        assert all("g" not in r for r in _split(data)[0]["t"].values())
        path = tmp_path / "old.nsk"
        path.write_bytes(data)
        assert torch.equal(ns.load(path).fc.weight, model.fc.weight)


# -- the packed runtime ------------------------------------------------------------------------


@pytest.mark.parametrize("bits,group,kernel", [(4, 32, True), (4, 64, True), (3, 96, True),
                                               (4, 48, False), (4, 5, False), (8, 32, False)])
def test_packed_runtime_equals_dense_decode_for_groups(tmp_path, bits, group, kernel):
    _, data = _artifact(_grouped(group, bits))
    path = tmp_path / "g.nsk"
    path.write_bytes(data)
    dense, packed = ns.load(path), ns.load(path, runtime="packed")
    x = torch.randn(7, 3, 4, 4)
    with torch.no_grad():
        expected, got = dense(x), packed(x)
    assert float((got - expected).abs().max()) <= PACKED_RTOL * float(expected.abs().max()) + 1e-5
    assert isinstance(packed.conv.parametrizations.weight[0], StoredTensor)
    with torch.no_grad():  # the conv decodes its grouped scales exactly
        assert torch.equal(packed.conv.weight, dense.conv.weight)
    if kernel:
        assert isinstance(packed.fc, Int4WeightLinear)
    else:
        assert torch.equal(packed.fc.weight, dense.fc.weight)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_group_wider_than_the_row_is_one_group_per_row(tmp_path, bits):
    """The largest allowed group size on a small tensor: one scale per row, and loading it
    (dense or packed) allocates nothing group-sized."""
    model, data = _artifact(_grouped(2**20, bits, symmetric=True))
    assert _split(data)[0]["t"]["fc.weight"]["g"] == 2**20
    path = tmp_path / "wide.nsk"
    path.write_bytes(data)
    packed = ns.load(path, runtime="packed")
    x = torch.randn(3, 3, 4, 4)
    with torch.no_grad():
        expected, got = model(x), packed(x)
    assert float((got - expected).abs().max()) <= PACKED_RTOL * float(expected.abs().max()) + 1e-5


def test_int4_kernel_with_a_ragged_last_group(tmp_path):
    """80 input columns in groups of 32: the kernel pads the last group (16 columns)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(80, 20)).eval()
    table = EncodingTable()
    table.apply(model, "0.weight", _grouped(32, 4)(model[0].weight.detach()))
    path = tmp_path / "r.nsk"
    path.write_bytes(artifact_bytes(model, table, ns.ModelInfo(spec="", input_shape=(80,))))
    packed = ns.load(path, runtime="packed")
    assert isinstance(packed[0], Int4WeightLinear)
    x = torch.randn(5, 80)
    with torch.no_grad():
        expected, got = model(x), packed(x)
    assert float((got - expected).abs().max()) <= PACKED_RTOL * float(expected.abs().max()) + 1e-5


# -- GPTQ ----------------------------------------------------------------------------------------


def _output_error(layer_input: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return float((layer_input @ (w - q).T).pow(2).mean())


@pytest.mark.parametrize("group", [None, 16])
def test_gptq_lowers_the_linear_output_error(group):
    """Correlated inputs (as in real activations): GPTQ's codes, on the same grid, give a
    smaller layer output error on the calibration data than nearest rounding."""
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(64, 64, generator=gen)
    x = torch.randn(512, 64, generator=gen) @ mix
    layer = nn.Linear(64, 32)
    w = layer.weight.detach()
    h = hessians(layer, {"": layer}, [(x, None)], 1, torch.device("cpu"))[""]
    assert torch.allclose(h, (x.double().T @ x.double()) / 512)
    nearest = Quantized.quantize(w, 3, per_channel=True, group_size=group)
    codes = gptq_codes(w, h, nearest, 0.01, "fc")
    q = Quantized(codes, 3, nearest.scale, nearest.zero_point, group_size=nearest.group_size)
    err_nearest, err_gptq = _output_error(x, w, nearest.decode()), _output_error(x, w, q.decode())
    assert err_gptq < 0.8 * err_nearest, (err_gptq, err_nearest)


def test_gptq_lowers_the_conv_output_error_and_keeps_pruned_zeros():
    gen = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    x = torch.nn.functional.avg_pool2d(torch.randn(32, 4, 10, 10, generator=gen), 3, 1, 1)
    h = hessians(conv, {"c": conv}, [(x, None)], 1, torch.device("cpu"))["c"]
    w = conv.weight.detach().clone()
    keep = w.abs() > 0.05
    w = w * keep
    nearest = Quantized.quantize(w, 3, per_channel=True)
    codes = gptq_codes(w, h, nearest, 0.01, "c", keep=keep)
    q = (codes - nearest.zero_point[nearest.scale_index()].reshape(8, -1)) * nearest.scale[
        nearest.scale_index()].reshape(8, -1)
    q = q.reshape(w.shape) * keep

    def out_err(weight):
        return float((conv._conv_forward(x, w - weight, None)).pow(2).mean())

    assert out_err(q) < 0.8 * out_err(nearest.decode())


def test_gptq_through_the_pipeline_stays_on_the_stored_grid(tmp_path):
    torch.manual_seed(0)
    model = ns.load_model("zoo:lenet300", num_classes=10, in_chans=1, input_size=8)
    steps = [ns.step("magnitude", sparsity=0.5),
             ns.step("quantize", bits=4, group_size=16, rounding="gptq", calibration_batches=2,
                     calibration_batch_size=32)]
    result = ns.compress(model, steps, data="digits", seed=0, latency=False)
    path = result.save(tmp_path / "gptq.nsk", report=False)
    assert path.stat().st_size == result.report.storage_bytes
    loaded = ns.load(path)
    for name, param in result.model.named_parameters():
        assert torch.equal(loaded.get_parameter(name), param), name
    # Pruned zeros stay zeros: the record is sparse, with grouped codes inside.
    enc = result.encodings.get("fc1.weight")
    assert isinstance(enc, Sparse) and enc.values.group_size == 16
    assert float((result.model.fc1.weight == 0).float().mean()) >= 0.5
    record = _split(path.read_bytes())[0]["t"]["fc1.weight"]
    assert record["k"] == "sparse" and record["c"]["v"]["g"] == 16


def test_gptq_needs_data():
    model = ns.load_model("zoo:lenet300", num_classes=10, in_chans=1, input_size=8)
    with pytest.raises(DataError, match="needs data"):
        ns.compress(model, [ns.step("quantize", rounding="gptq")], latency=False)


# -- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [("group_size", 0), ("group_size", 2**20 + 1),
                                         ("clip", "max"), ("percentile", 0),
                                         ("percentile", 101), ("rounding", "adaround"),
                                         ("calibration_batches", 0), ("damp", 0),
                                         ("calibration_batch_size", 0)])
def test_config_bounds(field, value):
    with pytest.raises(ValidationError):
        QuantizeConfig(**{field: value})


def test_describe_lists_every_knob():
    from netshrink.cli import cli

    out = CliRunner().invoke(cli, ["describe", "quantize"], terminal_width=200).output
    for field in QuantizeConfig.model_fields:
        assert field in out, field
    assert "2210.17323" in out


# -- conformance -----------------------------------------------------------------------------


# 'config-invalid' checks the config class's bounds, the same for every config: the default
# suite (tests/test_conformance.py) runs it once.
OPTION_CASES = [case for config in BUILTIN_OPTION_CONFIGS["quantize"]
                for case in conformance_cases(Quantize, config=config)
                if case.layer_type in (None, "Linear", "Conv2d") and case.check != "config-invalid"]


@pytest.mark.parametrize("case", [
    pytest.param(case, id=f"{json.dumps(case.config, separators=(',', ':'))}-{case.id}")
    for case in OPTION_CASES])
def test_option_configs_conform(case):
    case.run()
