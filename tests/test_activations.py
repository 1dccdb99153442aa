"""Static int8 activations in ``quantize`` (issue 21, part 2): observers, BatchNorm folding,
stored bytes, load equality (dense and packed), ONNX Q/DQ export, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import netshrink as ns
from netshrink.context import CompressionContext
from netshrink.errors import ConfigError, DataError
from netshrink.modules import Int8InputConv2d, Int8InputLinear, build, describe, quantize_input
from netshrink.plugins.quantize import Quantize
from netshrink.plugins.quantize.activations import (
    RangeObserver,
    fake_quant,
    fold_batchnorm,
    following_batchnorms,
    following_relus,
    scale_zero_point,
)
from netshrink.runtime import PACKED_RTOL
from netshrink.testing import conformance_cases

pytestmark = pytest.mark.usefixtures("single_thread")

W8A8 = {"bits": 8, "activations": "int8", "calibration_batches": 2}


def _step(**config):
    return [{"compressor": "quantize", "config": {**W8A8, **config}}]


@pytest.fixture(scope="module")
def w8a8(lenet, digits):
    """LeNet-5 on the 8x8 digits after W8A8 (min-max observer)."""
    return ns.compress(copy.deepcopy(lenet), _step(), digits)


@pytest.fixture(scope="module")
def saved(w8a8, tmp_path_factory):
    return w8a8.save(tmp_path_factory.mktemp("act") / "w8a8.nsk", report=False)


def _val(digits, n=256):
    x, y = next(iter(digits.loader("val", n, False)))
    return x, y


# -- observers -----------------------------------------------------------------------------------


def _observed(values: torch.Tensor) -> RangeObserver:
    obs = RangeObserver()
    for chunk in values.split(values.numel() // 4):
        obs.update(chunk)
    return obs


def test_minmax_observer_keeps_the_range_seen_and_zero():
    obs = _observed(torch.linspace(0.5, 3.0, 4000))
    assert obs.range("minmax", 99.9) == (0.0, 3.0)  # widened to include 0
    obs = _observed(torch.linspace(-2.0, 1.0, 4000))
    lo, hi = obs.range("minmax", 99.9)
    assert lo == pytest.approx(-2.0) and hi == pytest.approx(1.0)


def test_percentile_and_mse_observers_clip_an_outlier():
    values = torch.randn(40000, generator=torch.Generator().manual_seed(0)).abs()
    values[7] = 100.0  # one outlier that min-max must cover
    obs = _observed(values)
    _, hi_minmax = obs.range("minmax", 99.9)
    _, hi_pct = obs.range("percentile", 99.9)
    _, hi_mse = obs.range("mse", 99.9)
    assert hi_minmax == 100.0
    assert hi_pct == pytest.approx(float(torch.quantile(values, 0.999)), rel=1e-3)
    assert hi_mse < 100.0

    def error(hi):
        scale, zp = scale_zero_point(0.0, hi)
        return float((fake_quant(values, scale, zp) - values).pow(2).mean())

    assert error(hi_mse) < error(hi_minmax)


def test_percentile_observer_subsamples_long_calibrations(monkeypatch):
    monkeypatch.setattr("netshrink.plugins.quantize.activations.MAX_SAMPLES", 1000)
    obs = _observed(torch.linspace(0.0, 1.0, 40000))
    lo, hi = obs.range("percentile", 99.0)
    assert lo == 0.0 and hi == pytest.approx(0.99, abs=0.01)


def test_grid_represents_zero_exactly_and_saturates():
    scale, zp = scale_zero_point(-1.0, 3.0)
    assert 0 <= zp <= 255 and scale == pytest.approx(4.0 / 255)
    x = torch.tensor([0.0, -5.0, 10.0])
    q = quantize_input(x, torch.tensor(scale), torch.tensor(zp, dtype=torch.uint8))
    assert q[0] == 0.0 and q[1] == pytest.approx(-zp * scale) and q[2] == pytest.approx(
        (255 - zp) * scale)
    assert scale_zero_point(0.0, 0.0) == (1.0, 0)  # an all-zero input: any grid is exact


def test_observer_without_inputs_is_refused():
    with pytest.raises(ConfigError, match="no calibration inputs"):
        RangeObserver().range("minmax", 99.9)


# -- BatchNorm folding ---------------------------------------------------------------------------


class ConvBN(nn.Module):
    def __init__(self, track: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6, track_running_stats=track)
        self.head = nn.Linear(6 * 8 * 8, 10)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv2(torch.relu(self.conv1(x))))).flatten(1))


def _with_stats(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8))
        model.bn.weight.uniform_(0.5, 2.0)
        model.bn.bias.uniform_(-1.0, 1.0)
    return model.eval()


def test_batchnorm_folds_into_the_conv_before_it():
    model = _with_stats(ConvBN())
    x = torch.randn(8, 1, 8, 8)
    before = model(x).detach()
    assert following_batchnorms(model, ["conv1", "conv2"]) == {"conv2": "bn"}
    fold_batchnorm(model, "conv2", "bn")
    assert isinstance(model.bn, nn.Identity) and model.conv2.bias is not None
    assert torch.allclose(model(x), before, atol=1e-5)


def test_batchnorm_without_running_stats_is_refused():
    model = ConvBN(track=False).eval()
    with pytest.raises(ConfigError, match="track_running_stats"):
        fold_batchnorm(model, "conv2", "bn")


def test_compress_folds_batchnorm_and_records_it(digits, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 8 * 8, 10))
    with torch.no_grad():
        model.train()(torch.randn(16, 1, 8, 8))
    ns.set_model_info(model.eval(), ns.ModelInfo(spec="", input_shape=(1, 8, 8), head="6"))
    result = ns.compress(model, _step(), digits)
    out = result.model
    assert isinstance(out[3], nn.Identity)
    assert type(out[2]) is Int8InputConv2d and out[2].bias is not None
    assert type(out[0]) is nn.Conv2d  # the first selected layer keeps float inputs
    rows = {row.name: row for row in result.report.rows}
    assert rows["2"].details["folded_batchnorm"] == "3"
    path = result.save(tmp_path / "bn.nsk", report=False)
    x, _ = _val(digits, 32)
    with torch.no_grad():
        assert torch.equal(ns.load(path)(x), out.eval()(x))


def test_relu_after_a_layer_is_found_through_a_folded_batchnorm():
    model = _with_stats(ConvBN())
    assert following_relus(model, ["conv1", "conv2", "head"]) == {"conv1"}  # conv2 feeds bn
    fold_batchnorm(model, "conv2", "bn")  # bn becomes nn.Identity, then the ReLU
    assert following_relus(model, ["conv1", "conv2", "head"]) == {"conv1", "conv2"}


def test_a_first_layer_without_bias_gets_its_batchnorm_folded_and_reloads(digits, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.Flatten(),
        nn.Linear(6 * 8 * 8, 10))
    with torch.no_grad():
        model.train()(torch.randn(16, 1, 8, 8))
    ns.set_model_info(model.eval(), ns.ModelInfo(spec="", input_shape=(1, 8, 8), head="7"))
    result = ns.compress(model, _step(), digits)
    out = result.model
    # the first layer keeps float inputs, but its BatchNorm is folded (it gains a bias)
    assert type(out[0]) is nn.Conv2d and out[0].bias is not None
    assert isinstance(out[1], nn.Identity)
    assert {r.name: r.details.get("folded_batchnorm") for r in result.report.rows}["0"] == "1"
    # the output grid of a layer feeding a ReLU starts at 0, so quantizing onto it is the ReLU
    assert int(out[3].out_zero_point) == 0 and int(out[5].out_zero_point) > 0
    path = result.save(tmp_path / "first.nsk", report=False)
    x, _ = _val(digits, 32)
    with torch.no_grad():
        assert torch.equal(ns.load(path)(x), out.eval()(x))


# -- the compressed model ------------------------------------------------------------------------


def test_selected_layers_get_int8_inputs_but_not_the_first_or_the_head(w8a8):
    model = w8a8.model
    assert type(model.conv1) is nn.Conv2d  # activation_skip_first: 1
    assert type(model.conv2) is Int8InputConv2d and type(model.fc1) is Int8InputLinear
    assert type(model.fc2) is nn.Linear  # the head: the selector's protect_head
    assert float(model.fc1.act_scale) > 0 and float(model.fc1.out_scale) > 0


def test_the_in_memory_model_simulates_the_quantized_activations(w8a8, digits):
    x, _ = _val(digits)
    model = w8a8.model.eval()
    with torch.no_grad():
        fc1_in = []
        handle = model.fc1.register_forward_pre_hook(lambda _m, a: fc1_in.append(a[0]))
        model(x)
        handle.remove()
    layer = model.fc1
    expected = fake_quant(
        fake_quant(fc1_in[0], float(layer.act_scale), int(layer.act_zero_point)) @ layer.weight.T
        + layer.bias, float(layer.out_scale), int(layer.out_zero_point))
    assert torch.allclose(layer(fc1_in[0]), expected, atol=1e-5)
    codes = (layer(fc1_in[0]) / layer.out_scale).detach()  # on the output grid
    assert torch.allclose(codes, codes.round(), atol=1e-3)


def test_accuracy_stays_close(w8a8):
    assert w8a8.report.accuracy_after >= w8a8.report.accuracy_before - 0.03


def test_activation_scales_are_stored_and_counted(w8a8, saved):
    manifest = ns.read_manifest(saved)
    for layer in ("conv2", "fc1"):
        for name, (kind, nbytes) in {"act_scale": ("F32", 4), "act_zero_point": ("U8", 1),
                                     "out_scale": ("F32", 4), "out_zero_point": ("U8", 1)}.items():
            record = manifest["t"][f"{layer}.{name}"]
            assert record["k"] == "dense" and record["a"]["data"][0] == kind
            assert record["a"]["data"][2] == nbytes
    assert "conv1.act_scale" not in manifest["t"]
    assert saved.stat().st_size == w8a8.report.storage_bytes


def test_load_rebuilds_the_same_outputs(w8a8, saved, digits):
    x, _ = _val(digits)
    with torch.no_grad():
        expected = w8a8.model.eval()(x)
        dense = ns.load(saved)(x)
        packed_model = ns.load(saved, runtime="packed")
        packed = packed_model(x)
    assert torch.equal(dense, expected)
    assert float((packed - expected).abs().max()) <= PACKED_RTOL * float(
        expected.abs().max()) + 1e-5
    assert float(packed_model.fc1.act_scale) == float(w8a8.model.fc1.act_scale)


def test_int8_input_layers_are_allow_listed_and_rebuild():
    layer = Int8InputLinear(5, 3)
    rebuilt = build(describe(layer))
    assert type(rebuilt) is Int8InputLinear
    assert set(dict(rebuilt.named_buffers())) == {
        "act_scale", "act_zero_point", "out_scale", "out_zero_point"}


# -- the ONNX export -----------------------------------------------------------------------------


def test_export_emits_qdq_pairs_and_matches_the_packed_runtime(saved, digits, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from netshrink.export import QDQ_RTOL, export_onnx, has_int8_activations, ort_session

    path = export_onnx(saved, tmp_path / "w8a8.onnx")
    assert has_int8_activations(ns.load(saved))
    graph = onnx.load(str(path)).graph
    quantized = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    assert len(quantized) == 4  # the inputs and outputs of conv2 and fc1
    # conv2's and fc1's outputs feed ReLUs: their grids start at 0, and the ReLUs after their
    # DequantizeLinear are gone (the one after the float conv1 stays)
    relu_inputs = [n.input[0] for n in graph.node if n.op_type == "Relu"]
    producers = {o: n.op_type for n in graph.node for o in n.output}
    assert [producers[i] for i in relu_inputs] == ["Conv"]
    types = {i.name: i.data_type for i in graph.initializer}
    # int8-activation layers' symmetric 8-bit weights: INT8 codes (u8s8 kernels); others UINT8
    assert types["conv2.weight/codes"] == types["fc1.weight/codes"] == onnx.TensorProto.INT8
    assert types["conv1.weight/codes"] == onnx.TensorProto.UINT8
    session = ort_session(path)
    x, y = _val(digits, 360)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        packed = ns.load(saved, runtime="packed")(x)
    # onnxruntime requantizes in integers: an activation on a rounding boundary moves a step
    assert float((got - packed).abs().max()) <= QDQ_RTOL * float(packed.abs().max()) + 1e-5
    assert float((got.argmax(1) == packed.argmax(1)).float().mean()) >= 0.99
    accuracy = {name: float((out.argmax(1) == y).float().mean())
                for name, out in (("onnx", got), ("packed", packed))}
    assert accuracy["onnx"] == pytest.approx(accuracy["packed"], abs=1.5 / len(y))


# -- refusals ------------------------------------------------------------------------------------


def test_refused_without_data(lenet):
    with pytest.raises(DataError, match="needs data"):
        ns.compress(copy.deepcopy(lenet), _step(), latency=False)
    model = copy.deepcopy(lenet)
    ctx = CompressionContext()
    layers = [(n, m) for n, m in model.named_modules() if n in ("conv2", "fc1")]
    with pytest.raises(DataError, match="needs data"):
        Quantize(W8A8).compress(model, layers, ctx)


def test_config_bounds_are_checked():
    for bad in ({"activations": "int4"}, {"observer": "kl"}, {"activation_percentile": 40},
                {"activation_skip_first": -1}):
        with pytest.raises(Exception, match=r"activation|observer"):
            Quantize.Config(**bad)


# -- conformance ---------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [
    {"bits": 8, "activations": "int8", "calibration_batches": 1},
    {"bits": 4, "activations": "int8", "observer": "mse", "calibration_batches": 1,
     "activation_skip_first": 0},
], ids=["w8a8-minmax", "w4a8-mse"])
@pytest.mark.parametrize("layer_type", ["Linear", "Conv2d"])
def test_conformance(config, layer_type):
    cases = [c for c in conformance_cases(Quantize, config=config)
             if c.layer_type in (None, layer_type)]
    assert cases
    for case in cases:
        case.run()
