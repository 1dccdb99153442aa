"""timm models are first-class: spec options, head protection, compression, artifact round trip."""

from __future__ import annotations

import pytest
import torch

import netshrink as ns

pytest.importorskip("timm")
pytestmark = pytest.mark.timm


def test_resnet18_magnitude_runs_and_round_trips(tmp_path):
    model = ns.load_model("timm:resnet18", in_chans=1, num_classes=10, input_size=32)
    info = ns.model_info(model)
    assert info.head == "fc" and info.input_shape == (1, 32, 32)
    result = ns.compress(model, [ns.step("magnitude", sparsity=0.7)], latency=False)
    assert result.model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    pruned = [r.name for r in result.report.rows if r.methods == "magnitude"]
    assert "conv1" in pruned and "fc" not in pruned
    w = result.model.layer1[0].conv1.weight
    assert float((w == 0).float().mean()) == pytest.approx(0.7, abs=0.01)
    path = result.save(tmp_path / "r18.nsk", report=False)
    assert path.stat().st_size == result.report.storage_bytes
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(ns.load(path)(x), result.model(x))


def test_spec_query_options():
    model = ns.load_model("timm:resnet18?in_chans=1&num_classes=4&input_size=16")
    assert model.eval()(torch.randn(1, 1, 16, 16)).shape == (1, 4)


def test_unknown_timm_model():
    with pytest.raises(ns.ModelSpecError, match="timm has no model 'resnet1800'"):
        ns.load_model("timm:resnet1800")


def test_vit_input_size_becomes_img_size():
    # Without img_size a DeiT keeps expecting 224x224 and fails inside compression.
    model = ns.load_model("timm:deit_tiny_patch16_224?input_size=32&in_chans=1&num_classes=10")
    assert ns.model_info(model).input_shape == (1, 32, 32)
    assert model.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_fixed_size_model_at_another_size_is_refused():
    with pytest.raises(ns.ModelSpecError) as info:
        ns.load_model("timm:efficientformer_l1", input_size=64, num_classes=10)
    msg = str(info.value)
    assert "timm:efficientformer_l1" in msg and "input_size=64" in msg and "224x224" in msg


def test_cnn_runs_at_any_size():
    model = ns.load_model("timm:resnet18", input_size=20, num_classes=3)
    assert model.eval()(torch.randn(1, 3, 20, 20)).shape == (1, 3)
