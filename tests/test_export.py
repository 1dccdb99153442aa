"""netshrink.export: artifacts exported to ONNX keep their weights low-bit and run in
onnxruntime with the packed runtime's outputs; what cannot stay low-bit is warned about or
refused exactly as docs/export.md says."""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import netshrink as ns
from netshrink.artifact import artifact_bytes
from netshrink.errors import ExportError
from netshrink.export import (
    MSG_BLOCKED_OPSET,
    MSG_PERTURBED,
    MSG_UNKNOWN_KIND,
    MSG_UNMATCHED,
    ExportWarning,
    _to_onnx,
    export,
    lower_weights,
    ort_session,
)
from netshrink.runtime import PACKED_RTOL

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: faster on a busy box

DOCS = Path(__file__).resolve().parent.parent / "docs" / "export.md"

# One step per built-in method family, small enough for the 8x8 digits LeNet-5.
STEPS = {
    "quantize8": (ns.step("quantize", bits=8), None),
    "quantize4": (ns.step("quantize", bits=4), None),
    "bioclust": (ns.step("bioclust", noise_scale=0.0, population=1, generations=1,
                         kmeans_iterations=20, eval_limit=64), "digits"),
    "magnitude": (ns.step("magnitude", sparsity=0.8), None),
    "statprune": (ns.step("statprune"), None),
    "tucker": (ns.step("tucker"), None),
    "svd": (ns.step("svd"), None),
}


@pytest.fixture(scope="module")
def built(lenet, tmp_path_factory):
    """Artifact path -> (ONNX path, lowered forms), built once per method."""
    folder = tmp_path_factory.mktemp("export")
    cache: dict[str, tuple[Path, Path]] = {}

    def get(method: str) -> tuple[Path, Path]:
        if method not in cache:
            step, data = STEPS[method]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = ns.compress(lenet, [step], data=data, seed=0, latency=False)
            path = result.save(folder / f"{method}.nsk", report=False)
            cache[method] = (path, export(path, folder / f"{method}.onnx"))
        return cache[method]

    return get


def _inits(path: Path) -> dict[str, int]:
    return {i.name: i.data_type for i in onnx.load(path).graph.initializer}


def _dense_export_bytes(model: nn.Module) -> int:
    """Bytes of the plain fp32 ONNX export of ``model``."""
    x = torch.randn(2, *ns.model_info(model).input_shape)
    return len(_to_onnx(model, x, 21, "torchscript").SerializeToString())


@pytest.mark.parametrize("method", list(STEPS))
def test_export_runs_in_onnxruntime_like_the_packed_model(built, lenet, digits, method):
    path, onnx_path = built(method)
    onnx.checker.check_model(str(onnx_path), full_check=True)
    x = digits.test.tensors[0]
    got = _run(onnx_path, x)
    with torch.no_grad():
        expected = ns.load(path, runtime="packed")(x).numpy()
    allowed = PACKED_RTOL * float(np.abs(expected).max()) + 1e-5
    assert float(np.abs(got - expected).max()) <= allowed
    assert np.array_equal(got.argmax(1), expected.argmax(1))  # the whole test split
    # Smaller than the uncompressed model's fp32 export (structural methods: by their shapes).
    assert onnx_path.stat().st_size < _dense_export_bytes(lenet)


@pytest.mark.parametrize(("method", "kind", "ratio"), [
    ("quantize8", TensorProto.UINT8, 3), ("quantize4", TensorProto.UINT4, 5),
    ("bioclust", TensorProto.UINT4, 5),
])
def test_low_bit_initializers_and_size(built, method, kind, ratio):
    path, onnx_path = built(method)
    types = _inits(onnx_path)
    encoded = [n for n, e in ns.read_manifest(path)["t"].items() if e["k"] != "dense"]
    assert encoded
    role = "indices" if method == "bioclust" else "codes"
    for name in encoded:
        assert types[f"{name}/{role}"] == kind, name
        assert name not in types  # the dense initializer is gone
    # Much smaller than the dense fp32 export: about 4x at 8 bits, 6x+ at 4 bits (the fp32
    # head and biases stay dense).
    assert onnx_path.stat().st_size * ratio < _dense_export_bytes(ns.load(path))


def test_magnitude_sparse_is_stored_smaller_than_dense(built):
    path, onnx_path = built("magnitude")
    types = _inits(onnx_path)
    sparse = [n for n, e in ns.read_manifest(path)["t"].items() if e["k"] == "sparse"]
    assert sparse
    for name in sparse:
        assert name not in types
        assert any(k.startswith(f"{name}/") for k in types)
    assert onnx_path.stat().st_size * 3 < _dense_export_bytes(ns.load(path))


# -- every encoding kind, on a tiny model -----------------------------------------------------


def _Net() -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, 20, 3, padding=1), relu1=nn.ReLU(), flat=nn.Flatten(),
        fc=nn.Linear(20 * 4 * 4, 50), relu2=nn.ReLU(), out=nn.Linear(50, 10),
    ))


def _codebook(w: torch.Tensor, perturbed: bool = False, flat: bool = False) -> ns.Codebook:
    values = w.reshape(-1)
    edges = torch.quantile(values, torch.linspace(0, 1, 17)[1:-1])
    index = torch.bucketize(values, edges)
    centroids = torch.stack([values[index == i].mean() for i in range(16)])
    shape = (values.numel(),) if flat else w.shape
    if not perturbed:
        return ns.Codebook(index, centroids, shape=shape)
    spreads = torch.stack([values[index == i].std() for i in range(16)])
    return ns.Codebook(index, centroids, shape=shape, seed=7, noise_scale=0.5, spreads=spreads)


def _pruned(w: torch.Tensor, keep: float) -> torch.Tensor:
    cut = w.abs().reshape(-1).kthvalue(int((1 - keep) * w.numel())).values
    return torch.where(w.abs() > cut, w, torch.zeros_like(w))


def _sparse(keep: float, values: str):
    def encode(w: torch.Tensor) -> ns.Encoding:
        pruned = _pruned(w, keep)
        if values == "dense":
            return ns.Sparse.from_dense(pruned)
        if values == "codebook":
            return ns.Sparse.from_dense(
                pruned, value_encoder=lambda v, p, s: _codebook(v, flat=True))
        per_channel = values == "q4ch"
        group = 16 if values == "q4g" else None
        return ns.Sparse.from_dense(pruned, value_encoder=lambda v, p, s: ns.Quantized.quantize(
            v, 4, per_channel=per_channel, positions=p, full_shape=s, group_size=group))

    return encode


ENCODERS = {
    "q1-asym-ch": lambda w: ns.Quantized.quantize(w, 1, symmetric=False, per_channel=True),
    "q3-sym-t": lambda w: ns.Quantized.quantize(w, 3),
    "q6-asym-ch": lambda w: ns.Quantized.quantize(w, 6, symmetric=False, per_channel=True),
    "q8-sym-ch": lambda w: ns.Quantized.quantize(w, 8, per_channel=True),
    # Groups of 8 columns: conv rows of 27 end in a short group; fc rows of 320 do not.
    "q4-asym-g8": lambda w: ns.Quantized.quantize(w, 4, symmetric=False, group_size=8),
    "codebook": _codebook,
    "fp16": lambda w: ns.Dense(w, torch.float16),
    "bf16": lambda w: ns.Dense(w, torch.bfloat16),
    "sparse03-dense": _sparse(0.03, "dense"),
    "sparse30-dense": _sparse(0.3, "dense"),
    "sparse20-q4": _sparse(0.2, "q4"),
    "sparse20-q4ch": _sparse(0.2, "q4ch"),
    "sparse60-q4ch": _sparse(0.6, "q4ch"),
    "sparse20-q4g": _sparse(0.2, "q4g"),
    "sparse20-codebook": _sparse(0.2, "codebook"),
}


def _saved(tmp_path, encode, names=("conv.weight", "fc.weight"), net=_Net) -> Path:
    torch.manual_seed(0)
    model = net().eval()
    table = ns.EncodingTable()
    for name in names:
        table.apply(model, name, encode(model.get_parameter(name).detach()))
    info = ns.ModelInfo(spec="", input_shape=(3, 4, 4), num_classes=10, head="out")
    path = tmp_path / "m.nsk"
    path.write_bytes(artifact_bytes(model, table, info))
    return path


def _run(onnx_path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort_session(onnx_path)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("kind", list(ENCODERS))
def test_every_encoding_kind_exports_exactly(tmp_path, kind):
    path = _saved(tmp_path, ENCODERS[kind])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportWarning)
        onnx_path = export(path, tmp_path / "m.onnx", opset=21)
    x = torch.randn(7, 3, 4, 4)  # another batch size than the export's example
    with torch.no_grad():
        expected = ns.load(path, runtime="packed")(x).numpy()
    got = _run(onnx_path, x)
    assert float(np.abs(got - expected).max()) <= PACKED_RTOL * float(np.abs(expected).max()) + 1e-5
    types = _inits(onnx_path)
    if kind == "sparse03-dense":  # so sparse that 8-bit gaps + fp32 values win
        assert types["fc.weight/gaps"] == TensorProto.UINT8
    elif kind == "sparse60-q4ch":  # dense enough that one 4-bit code per entry wins
        assert types["fc.weight/codes"] == TensorProto.UINT4
        assert any(k.startswith("fc.weight/") for k in types) and "fc.weight" not in types
    elif kind.startswith("sparse"):
        assert types["fc.weight/mask"] == TensorProto.UINT8
    elif kind in ("fp16", "bf16"):
        expected_type = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[kind]
        assert types[f"fc.weight/{kind}"] == expected_type
    else:
        assert "fc.weight" not in types and "conv.weight" not in types


def test_batchnorm_is_not_folded_into_a_low_bit_conv(tmp_path):
    """The exporter must not fold BatchNorm into the quantized convolution (that would leave
    a dense weight in the file)."""
    def net() -> nn.Sequential:
        layers = _Net()
        layers.relu1 = nn.Sequential(nn.BatchNorm2d(20), nn.ReLU())
        return layers

    torch.manual_seed(1)
    path = _saved(tmp_path, ENCODERS["q3-sym-t"], net=net)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportWarning)
        onnx_path = export(path, tmp_path / "m.onnx")
    assert _inits(onnx_path)["conv.weight/codes"] == TensorProto.UINT4
    assert "BatchNormalization" in {n.op_type for n in onnx.load(onnx_path).graph.node}


def test_low_bits_fall_back_to_uint8_before_opset_21(tmp_path):
    path = _saved(tmp_path, lambda w: ns.Quantized.quantize(w, 4, per_channel=True))
    onnx_path = export(path, tmp_path / "m.onnx", opset=17)
    assert onnx.load(onnx_path).opset_import[0].version == 17
    assert _inits(onnx_path)["fc.weight/codes"] == TensorProto.UINT8


def test_blocked_scales_before_opset_21_warn_or_are_refused(tmp_path):
    path = _saved(tmp_path, ENCODERS["q4-asym-g8"], names=("fc.weight",))
    with pytest.warns(ExportWarning, match=re.escape(MSG_BLOCKED_OPSET)):
        onnx_path = export(path, tmp_path / "m.onnx", opset=20)
    assert _inits(onnx_path)["fc.weight"] == TensorProto.FLOAT
    with pytest.raises(ExportError, match=r"'fc.weight' \(q4/g8\)"):
        export(path, tmp_path / "m.onnx", opset=20, strict=True)


def test_perturbed_codebook_warns_or_is_refused(tmp_path):
    path = _saved(tmp_path, lambda w: _codebook(w, perturbed=True), names=("fc.weight",))
    with pytest.warns(ExportWarning, match=re.escape(MSG_PERTURBED)) as record:
        onnx_path = export(path, tmp_path / "m.onnx")
    assert "'fc.weight' (codebook16+seed)" in str(record[0].message)
    x = torch.randn(3, 3, 4, 4)
    with torch.no_grad():
        expected = ns.load(path)(x).numpy()
    assert np.allclose(_run(onnx_path, x), expected, rtol=0, atol=1e-5)
    with pytest.raises(ExportError, match=r"'fc.weight' \(codebook16\+seed\).*strict=False"):
        export(path, tmp_path / "strict.onnx", strict=True)
    assert not (tmp_path / "strict.onnx").exists()


def test_transposed_and_renamed_initializer_is_matched_by_value():
    """An exporter that stores a Linear weight transposed under another name (MatMul)."""
    torch.manual_seed(0)
    w = torch.randn(6, 5)
    enc = ns.Quantized.quantize(w, 4, per_channel=True)
    decoded = enc.decode().numpy()
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "renamed_t"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6])],
        [numpy_helper.from_array(np.ascontiguousarray(decoded.T), "renamed_t")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    forms = lower_weights(proto, {"fc.weight": enc}, opset=21)
    assert forms == {"fc.weight": "DequantizeLinear(UINT4)"}
    onnx.checker.check_model(proto, full_check=True)
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    got = ort_session(proto.SerializeToString()).run(None, {"x": x})[0]
    assert np.allclose(got, x @ decoded.T, atol=1e-5)
    # Without the exact setting onnxruntime fuses DequantizeLinear + MatMul into MatMulNBits
    # with int8 activations (docs/export.md says so): the difference is real, not rounding.
    fused = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    assert not np.allclose(fused, x @ decoded.T, atol=1e-5)


def test_unmatched_tensor_warns_or_is_refused():
    enc = ns.Quantized.quantize(torch.randn(4, 4), 8)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    with pytest.warns(ExportWarning, match=re.escape(MSG_UNMATCHED)):
        assert lower_weights(proto, {"w": enc}) == {"w": "dense"}
    with pytest.raises(ExportError, match=r"tensor 'w' \(q8\)"):
        lower_weights(proto, {"w": enc}, strict=True)


# -- arguments, files and the docs table --------------------------------------------------------


def test_bad_arguments_are_netshrink_errors(tmp_path):
    path = _saved(tmp_path, ENCODERS["q3-sym-t"])
    with pytest.raises(ns.ConfigError, match="field 'format'"):
        export(path, tmp_path / "m.x", format="tflite")
    with pytest.raises(ns.ConfigError, match="field 'opset'"):
        export(path, tmp_path / "m.onnx", opset=11)
    with pytest.raises(ns.ConfigError, match="field 'exporter'"):
        export(path, tmp_path / "m.onnx", exporter="jit")
    not_artifact = tmp_path / "junk.nsk"
    not_artifact.write_bytes(b"not an artifact")
    with pytest.raises(ns.ArtifactError, match=r"junk\.nsk"):
        export(not_artifact, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_verify_catches_a_graph_that_computes_otherwise(tmp_path, monkeypatch):
    import netshrink.export as module

    def corrupt(proto, encodings, **options):
        init = next(i for i in proto.graph.initializer if i.name == "out.bias")
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 1, init.name))
        return {}

    path = _saved(tmp_path, ENCODERS["q3-sym-t"])
    monkeypatch.setattr(module, "lower_weights", corrupt)
    with pytest.raises(ExportError, match=r"differs from netshrink\.load's"):
        export(path, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_missing_extra_names_it(tmp_path, monkeypatch):
    path = _saved(tmp_path, ENCODERS["q3-sym-t"])
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)
    with pytest.raises(ExportError, match=re.escape("pip install 'netshrink[onnx]'")):
        export(path, tmp_path / "m.onnx")


def test_missing_input_shape_is_explained(tmp_path):
    model = _Net()
    path = tmp_path / "m.nsk"
    path.write_bytes(artifact_bytes(model, ns.EncodingTable(), None))
    with pytest.raises(ExportError, match="input_shape="):
        export(path, tmp_path / "m.onnx")
    out = export(path, tmp_path / "m.onnx", input_shape=(3, 4, 4))
    assert out.is_file()


def test_pt2_export_keeps_the_packed_model(tmp_path):
    path = _saved(tmp_path, ENCODERS["q3-sym-t"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportWarning)
        out = export(path, tmp_path / "m.pt2", format="pt2")
    program = torch.export.load(out)
    x = torch.randn(5, 3, 4, 4)  # the batch axis is dynamic
    with torch.no_grad():
        expected = ns.load(path, runtime="packed")(x)
        got = program.module()(x)
    assert torch.allclose(got, expected, atol=1e-5)
    held = [*program.state_dict.values(), *program.constants.values()]
    assert any(t.dtype in (torch.uint8, torch.int32) for t in held if torch.is_tensor(t))
    with pytest.raises(ns.ConfigError, match="opset"):
        export(path, tmp_path / "m.pt2", format="pt2", opset=21)


def test_pt2_export_falls_back_to_the_dense_decode_with_a_warning(tmp_path):
    """torch.export cannot trace the CSR kernel of a 10%-dense Linear (today): the dense decode
    is saved, and the warning says so."""
    path = _saved(tmp_path, _sparse(0.1, "dense"), names=("fc.weight",))
    with pytest.warns(ExportWarning, match="exported the dense decode"):
        out = export(path, tmp_path / "m.pt2", format="pt2")
    x = torch.randn(3, 3, 4, 4)
    with torch.no_grad():
        assert torch.allclose(torch.export.load(out).module()(x), ns.load(path)(x), atol=1e-5)


def test_docs_table_quotes_the_code():
    text = DOCS.read_text()
    for message in (MSG_PERTURBED, MSG_UNMATCHED, MSG_UNKNOWN_KIND, MSG_BLOCKED_OPSET):
        assert message in " ".join(text.split()), message
    for kind in ("dense", "quant", "codebook", "sparse"):
        assert f"| `{kind}`" in text, kind
    assert "netshrink export ARTIFACT --format onnx --out FILE" in text


@pytest.mark.slow
def test_dynamo_exporter(tmp_path):
    path = _saved(tmp_path, ENCODERS["sparse20-q4ch"])
    onnx_path = export(path, tmp_path / "m.onnx", exporter="dynamo")
    x = torch.randn(4, 3, 4, 4)
    with torch.no_grad():
        expected = ns.load(path, runtime="packed")(x).numpy()
    assert np.allclose(_run(onnx_path, x), expected, atol=1e-5)
    assert "fc.weight" not in _inits(onnx_path)


def test_cli_export_writes_the_file_and_shows_warnings(built, tmp_path):
    from click.testing import CliRunner

    from netshrink.cli import cli

    artifact, _ = built("quantize4")
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(cli, ["export", str(artifact), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out} ({out.stat().st_size:,} bytes)" in result.output
    bad = CliRunner().invoke(cli, ["export", str(artifact), "--out", str(out), "--opset", "5"])
    assert bad.exit_code != 0 and "opset" in bad.output and "Traceback" not in bad.output


def _registered_compressors() -> list[str]:
    from netshrink.registry import compressors

    return sorted(compressors())


@pytest.mark.parametrize("name", _registered_compressors())
def test_every_registered_compressor_exports(name, lenet, digits, tmp_path):
    """Issue 15: every built-in compressor's artifact exports to ONNX and onnxruntime gives
    netshrink's top-1 on the whole test split (its default config, made fast as in the
    conformance suite)."""
    from netshrink.registry import get_compressor
    from netshrink.testing.fast_configs import builtin_fast_config

    config = builtin_fast_config(get_compressor(name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = ns.compress(lenet, [ns.Step(compressor=name, config=config)], data=digits,
                             seed=0, latency=False)
        path = result.save(tmp_path / f"{name}.nsk", report=False)
        onnx_path = export(path, tmp_path / f"{name}.onnx")
    x = digits.test.tensors[0]
    with torch.no_grad():
        expected = ns.load(path, runtime="packed")(x).numpy()
    assert np.array_equal(_run(onnx_path, x).argmax(1), expected.argmax(1))
