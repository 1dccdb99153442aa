"""Hostile artifacts: every crafted manifest ends in an ArtifactError naming the field, within
seconds and without allocating what the file cannot justify (docs/security.md).

The base artifacts are built here from an untrained ``zoo:lenet5`` (every encoding kind, a
``set`` and a ``replace`` edit) and a small module tree, so no training is needed; each test
rewrites their manifest (or blob) and loads the result.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import resource
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save
from torch import nn

import netshrink as ns
from netshrink import manifest as schema
from netshrink.adapters import model_info
from netshrink.artifact import artifact_bytes
from netshrink.encodings import Codebook, Dense, EncodingTable, Quantized, Sparse
from netshrink.errors import ArtifactError, ConfigError, NetshrinkError

MAX_SECONDS = 10.0  # per load; typically well under one second
MAX_RSS_GROWTH = 1024**3


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _spec_model() -> tuple[nn.Module, EncodingTable]:
    torch.manual_seed(0)
    model = ns.load_model("zoo:lenet5")
    model.fc2 = nn.Sequential(nn.Linear(500, 16), nn.Linear(16, 10))  # a replace edit
    model.relu1.inplace = True  # a set edit
    table = EncodingTable()
    w = model.fc1.weight.detach().clone()
    w[w.abs() < 0.03] = 0
    table.apply(
        model,
        "fc1.weight",
        Sparse.from_dense(
            w,
            value_encoder=lambda v, p, s: Quantized.quantize(
                v, 4, per_channel=True, positions=p, full_shape=s
            ),
        ),
    )
    table.apply(model, "conv2.weight", Quantized.quantize(model.conv2.weight, 6))
    table.apply(model, "fc1.bias", Quantized.quantize(model.fc1.bias, 8))
    table.apply(
        model,
        "conv1.weight",
        Codebook(
            torch.randint(0, 4, (500,)),
            torch.randn(4),
            shape=(20, 1, 5, 5),
            seed=3,
            noise_scale=0.1,
            spreads=torch.rand(4),
        ),
    )
    table.apply(model, "fc2.0.weight", Dense(model.fc2[0].weight, storage_dtype=torch.float16))
    w = model.fc2[1].weight.detach().clone()
    w[:, ::3] = 0
    keep = torch.nonzero(w.reshape(-1)).reshape(-1)
    rel = Sparse(tuple(w.shape), keep, Dense(w.reshape(-1)[keep]), index_bits=2)
    table.apply(model, "fc2.1.weight", rel)
    return model, table


def _tree_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Sequential(nn.Flatten(), nn.Linear(4 * 26 * 26, 10)),
    )


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    from safetensors.torch import load

    tensors = load(data)
    raw = tensors["manifest"].numpy().tobytes()
    return json.loads(zlib.decompress(raw)), tensors["blob"].numpy().tobytes()


def _write(
    path: Path, manifest: Any, blob: bytes, *, text: bytes | None = None, pack: bool = True
) -> Path:
    """An artifact with ``manifest`` (or the manifest JSON ``text``) and ``blob``."""
    if text is None:
        text = json.dumps(manifest, separators=(",", ":")).encode()  # NaN/Infinity allowed
    payload = zlib.compress(text, 9) if pack else text
    tensors = {
        "manifest": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
        "blob": torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        if blob
        else torch.zeros(0, dtype=torch.uint8),
    }
    path.write_bytes(save(tensors, metadata={"netshrink": f"1;{'zlib' if pack else 'json'}"}))
    return path


class Base:
    """A valid artifact's manifest and blob, and helpers to write edited copies."""

    def __init__(self, data: bytes, folder: Path) -> None:
        self.data = data
        self.manifest, self.blob = _split(data)
        self.folder = folder

    def edited(self, edit, blob: bytes | None = None, name: str = "bad.nsk") -> Path:
        manifest = copy.deepcopy(self.manifest)
        edit(manifest)
        return _write(self.folder / name, manifest, self.blob if blob is None else blob)


@pytest.fixture(scope="module")
def spec_base(tmp_path_factory) -> Base:
    model, table = _spec_model()
    return Base(artifact_bytes(model, table, model_info(model)), tmp_path_factory.mktemp("spec"))


@pytest.fixture(scope="module")
def tree_base(tmp_path_factory) -> Base:
    return Base(
        artifact_bytes(_tree_model(), EncodingTable(), None), tmp_path_factory.mktemp("tree")
    )


def refused(path: Path, match: str | None = None, **kwargs: Any) -> str:
    """Load ``path``, expecting an ArtifactError within the time and memory bounds."""
    rss, start = _peak_rss(), time.perf_counter()
    with pytest.raises(ArtifactError, match=match) as info:
        ns.load(path, **kwargs)
    assert time.perf_counter() - start < MAX_SECONDS
    assert _peak_rss() - rss < MAX_RSS_GROWTH
    return str(info.value)


# -- the valid artifacts still load, byte for byte ---------------------------------------------


def test_valid_artifacts_load_exactly(spec_base, tree_base):
    model, _ = _spec_model()
    x = torch.randn(3, 1, 28, 28)
    path = spec_base.folder / "ok.nsk"
    path.write_bytes(spec_base.data)
    assert torch.equal(ns.load(path)(x), model.eval()(x))
    assert "edits" in spec_base.manifest and {e["op"] for e in spec_base.manifest["edits"]} == {
        "set",
        "replace",
    }
    path = tree_base.folder / "ok.nsk"
    path.write_bytes(tree_base.data)
    assert torch.equal(ns.load(path)(x), _tree_model().eval()(x))
    assert ns.read_manifest(path)["arch"]["tree"]["type"] == "Sequential"


def test_compressed_reference_model_validates(lenet5, tmp_path):
    result = ns.compress(
        lenet5,
        [ns.step("magnitude", sparsity=0.9), ns.step("quantize", bits=4)],
        data="digits28",
        latency=False,
    )
    path = tmp_path / "m.nsk"
    result.save(path, report=False)
    plan = schema.validate(ns.read_manifest(path), path.stat().st_size)
    assert plan.decoded_bytes == sum(t.numel() * 4 for t in result.model.state_dict().values())
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(ns.load(path)(x), result.model(x))


# -- memory and time bombs ----------------------------------------------------------------------


def _empty_sparse(shape: list[int]) -> dict[str, Any]:
    """A sparse record that keeps nothing: zero bytes on disk for any shape."""
    return {
        "k": "sparse",
        "s": shape,
        "ib": 8,
        "nr": 0,
        "a": {"rel": ["U8", 0, 0]},
        "c": {"v": {"k": "dense", "s": [0], "a": {"data": ["F32", 0, 0]}}},
    }


@pytest.mark.parametrize("shape", [[250_000_000], [500, 500_000], [100_000, 100_000]])
def test_sparse_tensor_larger_than_the_file_justifies(spec_base, shape):
    path = spec_base.edited(lambda m: m["t"].__setitem__("fc1.weight", _empty_sparse(shape)))
    assert path.stat().st_size < 1024**2
    msg = refused(path, r"t\['fc1.weight'\]\.shape: .* more than the .* file may decode to")
    assert "max_decoded_bytes" in msg and "NETSHRINK_MAX_DECODED_BYTES" in msg


def test_linear_with_1e10_parameters_in_a_tree(tree_base):
    def edit(m):
        m["arch"]["tree"]["children"][3][1]["children"][1][1]["args"]["in_features"] = 100_000
        m["arch"]["tree"]["children"][3][1]["children"][1][1]["args"]["out_features"] = 100_000

    refused(tree_base.edited(edit), r"arch: the model needs more than [\d,]+ bytes")


@pytest.mark.parametrize(
    "options",
    [{"num_classes": 65536}, {"input_size": 65536}, {"in_chans": 65536}],
)
def test_model_options_with_huge_sizes(spec_base, options):
    def edit(m):
        m["arch"]["options"].update(options)

    refused(spec_base.edited(edit), r"arch: the model needs more than [\d,]+ bytes")


@pytest.mark.parametrize("value", [2**16 + 1, 2**31 - 1, 10**10, -(10**10)])
def test_model_option_beyond_the_schema_bound(spec_base, value):
    path = spec_base.edited(lambda m: m["arch"]["options"].update(num_classes=value))
    refused(path, r"arch\.options\['num_classes'\]: must be a number \(\|int\| <= 65536")


def test_input_shape_too_large(spec_base):
    path = spec_base.edited(_set("info/input_shape", [3, 65536, 65536]))
    refused(path, r"info\.input_shape: \[3, 65536, 65536\] is 12884901888 elements")


def test_set_edit_that_makes_a_layer_huge(spec_base):
    def edit(m):
        m["edits"].append({"op": "set", "path": "fc1", "attrs": {"in_features": 10**10}})

    refused(spec_base.edited(edit), r"t\['fc1.weight'\]\.shape: \[500, 800\] does not match")


def test_manifest_of_two_million_modules(tree_base):
    children = ",".join(['["0",{"type":"ReLU"}]'] * 2_000_000)
    text = json.dumps(tree_base.manifest, separators=(",", ":")).encode()
    tree = json.dumps(tree_base.manifest["arch"]["tree"], separators=(",", ":")).encode()
    text = text.replace(tree, f'{{"type":"Sequential","children":[{children}]}}'.encode())
    path = _write(tree_base.folder / "wide.nsk", None, tree_base.blob, text=text)
    assert path.stat().st_size < 10 * 1024**2
    refused(path, "manifest larger than|JSON objects and arrays")


def test_manifest_of_more_modules_than_allowed(tree_base):
    def edit(m):
        m["arch"]["tree"]["children"].extend(
            [[f"r{i}", {"type": "ReLU"}] for i in range(schema.MAX_MODULES)]
        )

    refused(
        tree_base.edited(edit), rf"arch\.tree: describes more than {schema.MAX_MODULES} modules"
    )


def test_modules_nested_too_deep(tree_base):
    def edit(m):
        node = {"type": "ReLU"}
        for _ in range(schema.MAX_MODULE_DEPTH + 1):
            node = {"type": "Sequential", "children": [["0", node]]}
        m["arch"]["tree"]["children"].append(["deep", node])

    refused(tree_base.edited(edit), r"arch\.tree\.children\[4\]\[1\].*nested more than 32")


@pytest.mark.parametrize("depth", [200, 5_000, 100_000])
def test_deeply_nested_json(spec_base, depth):
    text = json.dumps(spec_base.manifest, separators=(",", ":")).encode()
    text = text[:-1] + b',"recipe":{"a":' + b"[" * depth + b"]" * depth + b"}}"
    path = _write(spec_base.folder / "deep.nsk", None, spec_base.blob, text=text)
    refused(path, "nested too deeply")


@pytest.mark.parametrize(
    "text", [b"3", b'"netshrink"', b"null", b"[]", b"", b"\xff{}", b"1" * 5000]
)
def test_manifest_that_is_not_an_object(spec_base, text):
    path = _write(spec_base.folder / "scalar.nsk", None, spec_base.blob, text=text)
    refused(path, "not a netshrink manifest|corrupted manifest")


def test_millions_of_json_objects_from_a_small_file(spec_base):
    text = json.dumps(spec_base.manifest, separators=(",", ":")).encode()
    text = text[:-1] + b',"recipe":{"a":[' + b"{}," * 3_000_000 + b"{}]}}"
    path = _write(spec_base.folder / "many.nsk", None, spec_base.blob, text=text)
    assert path.stat().st_size < 1024**2
    refused(path, r"manifest has 3000\d+ JSON objects and arrays, more than the 250000")


def test_duplicate_keys(spec_base):
    text = json.dumps(spec_base.manifest, separators=(",", ":")).encode()
    text = text[:-1] + b',"t":{}}'
    path = _write(spec_base.folder / "dup.nsk", None, spec_base.blob, text=text)
    refused(path, "duplicate key 't'")


# -- a manifest of the wrong shape ----------------------------------------------------------------


def _set(path: str, value: Any):
    """An edit that sets the manifest node at ``path`` (``/``-separated) to ``value``."""

    def edit(m):
        *parents, last = path.split("/")
        node = m
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return edit


WRONG_TYPES = [
    ("arch/tree/children/0/1/args", ["in_channels", 1], r"arch\.tree\.children\[0\]\[1\]\.args"),
    ("arch/tree/children/0/1/args/in_channels", "1", r"arch\.tree\.children\[0\]\[1\]: cannot"),
    ("arch/tree/children/0/1/args/stride", {"x": 1}, r"args\['stride'\]"),
    ("arch/tree/children/0/1/args/padding_mode", "reflect\x00" * 40, "padding_mode|args"),
    ("arch/tree/children", {"0": {"type": "ReLU"}}, r"arch\.tree\.children"),
    ("arch/tree/children/0", {"type": "ReLU"}, r"arch\.tree\.children\[0\]"),
    ("arch/tree/children/0/0", 7, r"arch\.tree\.children\[0\]\[0\]"),
    ("arch/tree/children/0/0", "a.b", r"arch\.tree\.children\[0\]\[0\]"),
    ("arch/tree/children/2/1/children", [["0", {"type": "ReLU"}]], "only a Sequential"),
    ("arch/tree/type", "Module", "not allowed"),
    ("arch/tree", [], r"arch\.tree"),
    ("arch", "zoo:lenet5", "arch"),
    ("info", [1, 28, 28], "info"),
    ("info", {"input_shape": [1, 28, 28], "mean": [0.5]}, r"info\.mean: unknown field"),
    ("t", [], r"\.nsk: t: "),
    ("t/0.weight", [], r"t\['0\.weight'\]: must be an encoding record"),
    ("t/0.weight/a", [["F32", 0, 144]], r"t\['0\.weight'\]\.arrays"),
    ("t/0.weight/a/data", ["F32", 0], r"arrays\['data'\]"),
    ("t/0.weight/k", "pickle", r"kind: unknown encoding kind 'pickle'"),
    ("t/0.weight/d", "float32", r"t\['0\.weight'\]\.dtype"),
    ("t/0.weight/extra", 1, r"t\['0\.weight'\]\.extra: unknown field"),
    ("recipe", "steps", "recipe"),
    ("format", "netshrink2", "not a netshrink manifest"),
    ("v", True, "version True is not supported"),
]


@pytest.mark.parametrize(("where", "value", "match"), WRONG_TYPES)
def test_tree_fields_of_the_wrong_type(tree_base, where, value, match):
    refused(tree_base.edited(_set(where, value)), match)


SPEC_WRONG = [
    ("edits", {"op": "set"}, "edits"),
    ("edits/0", "set relu1", r"edits\[0\]: must be an edit"),
    ("edits/0/op", "exec", r"edits\[0\]\.op: unknown edit operation 'exec'"),
    ("edits/0/attrs", [["inplace", True]], r"edits\[0\]\.attrs"),
    ("edits/0/attrs", {"inplace": {"py/object": "os.system"}}, r"attrs\['inplace'\]"),
    ("edits/0/attrs", {"inplace": 3}, "where the model holds a bool"),
    ("edits/0/attrs", {"_parameters": 3}, "unknown attribute '_parameters'"),
    ("edits/0/path", "relu1.__class__", "missing module"),
    ("edits/0/path", "../relu1", r"edits\[0\]\.path"),
    ("edits/1/path", "conv1.weight", "an attribute of its parent, not a module"),
    ("edits/1/module", "Linear", r"edits\[1\]\.module"),
    ("edits/1/module/type", "os.system", "not allowed"),
    ("arch/spec", "file:/etc/passwd", "cannot be another file"),
    ("arch/spec", "hf:/home/user/model", "cannot be another file"),
    ("arch/spec", "hf:./model", "cannot be another file"),
    ("arch/spec", "zoo:lenet5?num_classes=3", r"arch\.spec"),
    ("arch/spec", "nosuch:model", "arch: cannot build 'nosuch:model'"),
    ("arch/spec", "zoo:alexnet", "arch: cannot build 'zoo:alexnet'"),
    ("arch/options", ["num_classes", 10], r"arch\.options"),
    ("arch/options/num_classes", "ten", "arch: cannot build"),
    ("arch/options/num_classes", float("inf"), r"arch\.options\['num_classes'\]"),
    ("arch/options/checkpoint", "/tmp/weights.safetensors", "option 'checkpoint'"),
    ("arch/options/evil", 1, "unknown option"),
]


@pytest.mark.parametrize(("where", "value", "match"), SPEC_WRONG)
def test_spec_fields_of_the_wrong_type(spec_base, where, value, match):
    assert [e["op"] for e in spec_base.manifest["edits"]] == ["set", "replace"]
    refused(spec_base.edited(_set(where, value)), match)


@pytest.mark.parametrize("seed", [1e30, float("nan"), "abc", 10**30, -(2**64), True, [3], 3.0])
def test_codebook_seed(spec_base, seed):
    path = spec_base.edited(_set("t/conv1.weight/seed", seed))
    refused(path, r"t\['conv1.weight'\]\.seed")


@pytest.mark.parametrize("offset", [float("inf"), float("-inf"), float("nan"), -1, "0", 2**70])
def test_array_offsets(spec_base, offset):
    path = spec_base.edited(_set("t/fc2.1.bias/a/data/1", offset))
    refused(path, r"t\['fc2.1.bias'\]\.arrays\['data'\]\[1\]")


def test_offset_outside_the_data(spec_base):
    path = spec_base.edited(_set("t/fc2.1.bias/a/data/1", len(spec_base.blob)))
    refused(path, r"t\['fc2.1.bias'\]\.arrays\['data'\]: .*outside the data")


@pytest.mark.parametrize(
    ("where", "value"),
    [("t/conv2.bias/s", [-50]), ("t/fc1.weight/s/0", -500), ("t/fc1.weight/c/v/s", [-1])],
)
def test_negative_shapes(spec_base, where, value):
    msg = refused(spec_base.edited(_set(where, value)), "greater than or equal to 0")
    assert ".shape" in msg


@pytest.mark.parametrize(
    "shape", [[2**32, 2**32], [2**62, 2**62], [2**63], [3037000500, 3037000500]]
)
def test_int64_overflow(spec_base, shape):
    msg = refused(spec_base.edited(_set("t/fc1.weight", _empty_sparse(shape))))
    assert "t['fc1.weight'].shape" in msg
    assert "int64" in msg or "less than or equal to" in msg


@pytest.mark.parametrize(
    ("tensor", "shape"),
    [("fc2.1.bias", [1, 10]), ("conv2.bias", [5, 10]), ("fc2.0.weight", [500, 16])],
)
def test_shape_that_would_fail_in_forward(spec_base, tensor, shape):
    # Same element count, so the arrays agree with the record: only the model disagrees.
    msg = refused(spec_base.edited(_set(f"t/{tensor}/s", shape)), "does not match the model's")
    assert f"t['{tensor}'].shape" in msg


def test_shape_that_disagrees_with_the_arrays(spec_base):
    refused(spec_base.edited(_set("t/fc2.1.bias/s", [11])), r"holds 10 elements for shape \[11\]")


def test_two_tensors_reading_the_same_bytes(spec_base):
    ref = list(spec_base.manifest["t"]["conv2.bias"]["a"]["data"])
    ref[2] = 40
    msg = refused(spec_base.edited(_set("t/fc2.1.bias/a/data", ref)), "share bytes")
    assert "conv2.bias" in msg and "fc2.1.bias" in msg


# -- silently wrong models: non-finite values ------------------------------------------------------


@pytest.mark.parametrize("scale", ["nan", "inf", "-inf", "1e39", float("nan"), None, "0x1p3"])
def test_nan_scale_in_the_manifest(spec_base, scale):
    refused(spec_base.edited(_set("t/conv2.weight/sc", scale)), r"t\['conv2.weight'\]\.scale")


def _poke(blob: bytes, offset: int, value: float, fmt: str = "<f") -> bytes:
    out = bytearray(blob)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def test_nan_in_a_per_channel_scale_array(spec_base):
    ref = spec_base.manifest["t"]["fc1.weight"]["c"]["v"]["a"]["scale"]
    path = spec_base.edited(lambda m: None, blob=_poke(spec_base.blob, ref[1] + 8, math.nan))
    refused(path, r"t\['fc1.weight'\]: .*scale.*not finite")


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_weights(spec_base, value):
    ref = spec_base.manifest["t"]["conv2.bias"]["a"]["data"]
    path = spec_base.edited(lambda m: None, blob=_poke(spec_base.blob, ref[1] + 4, value))
    refused(path, r"t\['conv2.bias'\]: decodes to 1 non-finite values")


def test_nan_centroid(spec_base):
    ref = spec_base.manifest["t"]["conv1.weight"]["a"]["centroids"]
    path = spec_base.edited(lambda m: None, blob=_poke(spec_base.blob, ref[1], math.nan))
    refused(path, r"t\['conv1.weight'\]: .*centroids.*not finite")


# -- the budget can be raised for a trusted file -----------------------------------------------


def test_budget_override(spec_base, monkeypatch):
    path = spec_base.folder / "ok.nsk"
    path.write_bytes(spec_base.data)
    refused(path, r"more than the 1\.0 KiB", max_decoded_bytes=1024)
    monkeypatch.setenv(schema.BUDGET_ENV, "1K")
    refused(path, r"more than the 1\.0 KiB")
    assert isinstance(ns.load(path, max_decoded_bytes=2 * 1024**3), nn.Module)
    monkeypatch.setenv(schema.BUDGET_ENV, "2G")
    assert isinstance(ns.load(path), nn.Module)
    monkeypatch.setenv(schema.BUDGET_ENV, "lots")
    with pytest.raises(ConfigError, match=schema.BUDGET_ENV):
        ns.load(path)
    with pytest.raises(ConfigError, match="max_decoded_bytes"):
        ns.load(path, max_decoded_bytes=-1)


def test_default_budget():
    assert schema.decoded_budget(1000) == 64 * 1024**2
    assert schema.decoded_budget(10**6) == 10**9


# -- property: any mutation of a valid manifest ends well ------------------------------------------


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


# Nesting deeper than the Python-level helpers here can copy is spliced into the text instead.
_HOSTILE = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 7, 2**31, 2**62, 2**63, 2**64, 10**30, 250_000_000]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "nan", "inf", "1e39", "F32", "dense", "sparse", "quant", "Linear"]),
    st.text(max_size=12),
    st.none(),
    st.booleans(),
    st.lists(st.integers(min_value=-2, max_value=10**9), max_size=4),
    st.builds(dict),
    st.integers(min_value=1, max_value=150).map(_nested),
)


def _nodes(value: Any, path: tuple = ()) -> list[tuple]:
    """Paths to every node of a JSON value."""
    out = [path]
    if isinstance(value, dict):
        for key, child in value.items():
            out += _nodes(child, (*path, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            out += _nodes(child, (*path, i))
    return out


def _get(value: Any, path: tuple) -> Any:
    for part in path:
        value = value[part]
    return value


def _mutations(bases: list[tuple[dict[str, Any], bytes]]) -> st.SearchStrategy:
    """Artifacts (manifest text, blob) made from ``bases`` by one to three mutations."""

    @st.composite
    def mutated(draw) -> tuple[bytes, bytes]:
        manifest, blob = bases[draw(st.integers(min_value=0, max_value=len(bases) - 1))]
        manifest = copy.deepcopy(manifest)
        for _ in range(draw(st.integers(min_value=1, max_value=3))):
            paths = _nodes(manifest)
            path = draw(st.sampled_from(paths[1:]))
            parent, key = _get(manifest, path[:-1]), path[-1]
            node = parent[key]
            op = draw(st.sampled_from(["replace", "delete", "add", "number", "wrap", "copy"]))
            if op == "replace":
                parent[key] = draw(_HOSTILE)
            elif op == "delete" and isinstance(parent, dict):
                del parent[key]
            elif op == "add" and isinstance(node, dict):
                name = draw(st.sampled_from(["k", "s", "a", "c", "x", "args", "children"]))
                node[name] = draw(_HOSTILE)
            elif op == "number" and isinstance(node, int) and not isinstance(node, bool):
                parent[key] = draw(
                    st.sampled_from([node + 1, node - 1, -node, node * 2**20, node * 10**12])
                )
            elif op == "wrap":
                parent[key] = [node]
            elif op == "copy":
                parent[key] = copy.deepcopy(_get(manifest, draw(st.sampled_from(paths))))
        if draw(st.integers(min_value=0, max_value=29)) == 0:  # not even an object
            manifest = draw(_HOSTILE)
        text = json.dumps(manifest, separators=(",", ":")).encode()
        if draw(st.integers(min_value=0, max_value=9)) == 0:  # nesting no parser survives
            depth = draw(st.integers(min_value=100, max_value=100_000))
            text = text[:-1] + b',"x":' + b"[" * depth + b"]" * depth + b"}"
        if draw(st.booleans()):
            cut = draw(st.integers(min_value=0, max_value=len(blob)))
            blob = blob[:cut] if draw(st.booleans()) else blob[:cut] + b"\xff\xff" + blob[cut + 2 :]
        return text, blob

    return mutated()


def _check_mutation(folder: Path, case: tuple[bytes, bytes], pack: bool) -> None:
    text, blob = case
    path = _write(folder / "fuzz.nsk", None, blob, text=text, pack=pack)
    rss, start = _peak_rss(), time.perf_counter()
    with contextlib.suppress(NetshrinkError):  # never a bare Python exception
        ns.load(path)
    assert time.perf_counter() - start < MAX_SECONDS
    assert _peak_rss() - rss < MAX_RSS_GROWTH


@pytest.fixture(scope="module")
def bases(spec_base, tree_base) -> list[tuple[dict[str, Any], bytes]]:
    return [(spec_base.manifest, spec_base.blob), (tree_base.manifest, tree_base.blob)]


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


_FAST = settings(
    max_examples=60,
    deadline=None,  # time is asserted per load, with room for a loaded machine
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_mutated_manifests_end_in_netshrink_errors(bases, fuzz_dir):
    @_FAST
    @given(case=_mutations(bases), pack=st.booleans())
    def check(case, pack):
        _check_mutation(fuzz_dir, case, pack)

    check()


@pytest.mark.slow
def test_mutated_manifests_many(bases, fuzz_dir):
    @settings(_FAST, max_examples=2_000)
    @given(case=_mutations(bases), pack=st.booleans())
    def check(case, pack):
        _check_mutation(fuzz_dir, case, pack)

    check()
