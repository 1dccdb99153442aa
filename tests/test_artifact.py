"""The artifact: exact sizes, faithful round trips, and clear errors for bad files (no pickle)."""

from __future__ import annotations

import json
import pickle
import zlib

import pytest
import torch
from safetensors.torch import save_file

import netshrink as ns
from netshrink.errors import ArtifactError


@pytest.fixture(scope="module")
def saved(tmp_path_factory, lenet300):
    result = ns.compress(
        lenet300,
        [ns.step("magnitude", sparsity=0.8), ns.step("quantize", bits=6)],
        data="digits28",
        latency=False,
    )
    path = tmp_path_factory.mktemp("art") / "m.nsk"
    result.save(path)
    return result, path


def test_size_and_outputs(saved):
    result, path = saved
    assert path.stat().st_size == result.report.storage_bytes
    loaded = ns.load(path)
    x = ns.datasets.load("digits28").val.tensors[0][:8]
    assert torch.equal(loaded(x), result.model(x))
    assert ns.model_info(loaded).head == "fc3"


def test_report_rows_add_up(saved):
    result, _ = saved
    rep = result.report
    assert sum(r.storage_bytes for r in rep.rows) == rep.storage_bytes
    assert rep.dense_bytes == sum(t.numel() * 4 for t in result.model.state_dict().values())
    assert rep.compression_ratio == pytest.approx(rep.dense_bytes / rep.storage_bytes)
    text = str(rep)
    assert "fc1" in text and "magnitude+quantize" in text


def test_manifest_is_data(saved):
    _, path = saved
    manifest = ns.read_manifest(path)
    assert manifest["arch"]["spec"] == "zoo:lenet300"
    assert manifest["t"]["fc1.weight"]["k"] == "sparse"
    assert manifest["t"]["fc1.weight"]["c"]["v"]["k"] == "quant"


def test_atomic_save_keeps_old_file_on_failure(saved, tmp_path, monkeypatch):
    result, _ = saved
    target = tmp_path / "keep.nsk"
    target.write_bytes(b"previous")
    import netshrink.fileio as fileio

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "fsync", boom)
    with pytest.raises(OSError):
        result.save(target, report=False)
    assert target.read_bytes() == b"previous"
    assert list(tmp_path.iterdir()) == [target]  # no temp file left behind


def test_truncated(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "trunc.nsk"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ArtifactError, match=r"truncated|corrupted"):
        ns.load(bad)


def test_wrong_magic(tmp_path):
    bad = tmp_path / "junk.nsk"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ArtifactError, match="not a readable netshrink artifact"):
        ns.load(bad)


def test_foreign_safetensors(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(ArtifactError, match="not a netshrink artifact"):
        ns.load(path)


def _rewrite_manifest(src, dst, edit):
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(src), framework="pt") as fh:
        meta = fh.metadata()
        raw = fh.get_tensor("manifest").numpy().tobytes()
        blob = fh.get_tensor("blob")
    manifest = json.loads(zlib.decompress(raw) if meta["netshrink"].endswith("zlib") else raw)
    edit(manifest)
    data = json.dumps(manifest).encode()
    dst.write_bytes(
        save(
            {"manifest": torch.frombuffer(bytearray(data), dtype=torch.uint8), "blob": blob},
            metadata={"netshrink": "1;json"},
        )
    )


def test_manifest_missing_tensor(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "missing.nsk"
    _rewrite_manifest(path, bad, lambda m: m["t"].pop("fc2.bias"))
    with pytest.raises(ArtifactError, match=r"lacks tensors.*fc2\.bias"):
        ns.load(bad)


def test_manifest_reference_out_of_range(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "range.nsk"

    def edit(m):
        m["t"]["fc3.bias"]["a"]["data"][1] = 10**9

    _rewrite_manifest(path, bad, edit)
    with pytest.raises(ArtifactError, match="outside the data"):
        ns.load(bad)


def test_manifest_disallowed_module(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "evil.nsk"

    def edit(m):
        m["edits"] = [
            {
                "op": "replace",
                "path": "relu1",
                "module": {"type": "os.system", "args": {"command": "touch pwned"}},
            }
        ]

    _rewrite_manifest(path, bad, edit)
    with pytest.raises(ArtifactError, match="not allowed"):
        ns.load(bad)


class _Exploit:
    def __reduce__(self):
        return (open, ("PWNED_BY_PICKLE", "w"))


def test_pickle_renamed_is_refused_without_execution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "model.nsk"
    bad.write_bytes(pickle.dumps({"state": _Exploit()}))
    torch_file = tmp_path / "torch.nsk"
    torch.save({"w": torch.zeros(2)}, torch_file)
    for path in (bad, torch_file):
        with pytest.raises(ArtifactError):
            ns.load(path)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_missing_file(tmp_path):
    with pytest.raises(ArtifactError, match="no such file"):
        ns.load(tmp_path / "nope.nsk")


def test_file_adapter_loads_artifact(saved):
    _, path = saved
    model = ns.load_model(f"file:{path}")
    assert isinstance(model, torch.nn.Module)
