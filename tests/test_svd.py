"""svd: Linear and Conv2d factorisation, exactness at the true rank, skips, artifact round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import netshrink as ns
from netshrink import CompressionContext, LayerSelector, ModelInfo
from netshrink.plugins.svd import SVD


def _run(model: nn.Module, config: dict | None = None):
    info = ModelInfo("test", input_shape=(3, 16, 16), num_classes=10, head=None)
    ctx = CompressionContext(info=info, seed=0, step_name="svd")
    layers = LayerSelector().resolve(model, default_types=["Conv2d", "Linear"])
    out = SVD(config or {}).compress(model, layers, ctx)
    return out.model, {r.name: r.details for r in out.records}


def _low_rank_conv(o: int, i: int, k: int, rank: int, **kw) -> nn.Conv2d:
    """A conv whose (O, I*k*k) matrix has exactly ``rank``."""
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(i, o, k, **kw)
    with torch.no_grad():
        matrix = torch.randn(o, rank, generator=g) @ torch.randn(rank, i * k * k, generator=g)
        conv.weight.copy_(matrix.reshape(conv.weight.shape))
    return conv


@pytest.mark.parametrize("kw", [
    {}, {"stride": 2, "padding": 1}, {"padding": 2, "dilation": 2, "bias": False},
    {"padding": 1, "padding_mode": "reflect"},
])
def test_conv_is_exact_at_the_true_rank(kw):
    conv = _low_rank_conv(24, 8, 3, rank=5, **kw)
    model = nn.Sequential(conv)
    x = torch.randn(2, 8, 11, 11)
    expected = model(x)
    model, rec = _run(model, {"rank": 5})
    first, second = model[0]
    assert rec["0"]["rank"] == 5 and rec["0"]["full_rank"] == 24
    assert rec["0"]["energy_kept"] == pytest.approx(1.0)
    assert (first.kernel_size, first.out_channels, second.kernel_size) == ((3, 3), 5, (1, 1))
    assert (first.stride, first.padding, first.dilation) == (conv.stride, conv.padding,
                                                             conv.dilation)
    assert first.padding_mode == conv.padding_mode and first.bias is None
    assert (second.bias is None) == (conv.bias is None)
    assert torch.allclose(model(x), expected, atol=1e-4)
    assert sum(p.numel() for p in model.parameters()) < conv.weight.numel() + 24


def test_truncation_error_is_the_dropped_singular_values():
    conv = nn.Conv2d(16, 32, 3)
    weight = conv.weight.detach().reshape(32, -1).double()
    s = torch.linalg.svdvals(weight)
    model, rec = _run(nn.Sequential(conv), {"ratio": 0.25})
    first, second = model[0]
    approx = (second.weight.flatten(1) @ first.weight.flatten(1)).detach().double()
    assert rec["0"]["rank"] == 8  # a quarter of min(32, 16 * 3 * 3)
    assert float((weight - approx).norm()) == pytest.approx(float(s[8:].norm()), rel=1e-4)


def test_skips_say_why():
    class Standardised(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), Standardised(8, 8, 3),
                          nn.Conv2d(8, 4, 1))
    model, rec = _run(model, {"ratio": 1.0})
    assert "groups=8" in rec["0"]["skipped"]
    assert "overrides Conv2d.forward" in rec["1"]["skipped"]
    assert rec["2"]["skipped"] == "factorised form is not smaller"  # rank 4 of (4, 8)
    assert all(type(m) is not nn.Sequential for m in model)


def test_conv_option_search_is_tucker_s():
    assert SVD.layer_options(nn.Conv2d(64, 64, 3), "conv") == []
    assert SVD.layer_options(nn.Linear(64, 64), "fc")


def test_pipeline_round_trip(lenet5, digits28, tmp_path):
    result = ns.compress(lenet5, [ns.step("svd", ratio=0.5)], data=digits28, seed=0,
                         latency=False)
    model = result.model
    assert isinstance(model.conv2, nn.Sequential) and isinstance(model.fc1, nn.Sequential)
    assert result.report.params_after < result.report.params_before
    path = result.save(tmp_path / "lenet5.nsk", report=False)
    loaded = ns.load(path)
    x = digits28.test.tensors[0][:8]
    assert torch.equal(loaded(x), model(x))


class _ReadsProjWeight(nn.Module):
    """Like timm's EdgeNeXt positional encoding: its forward reads ``proj.weight``, which a
    factorised ``proj`` (two layers in a Sequential) no longer has."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 48, 3, padding=1)
        self.body = nn.Conv2d(48, 48, 3, padding=1)

    def forward(self, x):
        return self.body(self.proj(x.to(self.proj.weight.dtype)))


def test_a_layer_the_model_reads_is_put_back():
    model = _ReadsProjWeight()
    x = torch.randn(2, 3, 16, 16)
    model, rec = _run(model, {"ratio": 0.25})
    assert type(model.proj) is nn.Conv2d and isinstance(model.body, nn.Sequential)
    assert rec["proj"]["skipped"].startswith("left as it was: replacing it broke module "
                                             "(top level)")
    assert "'Sequential' object has no attribute 'weight'" in rec["proj"]["skipped"]
    assert "skipped" not in rec["body"]
    model(x)  # runs


def test_replace_or_put_back_keeps_what_runs():
    model = _ReadsProjWeight()
    new_body = nn.Conv2d(48, 48, 1)
    refused = ns.replace_or_put_back(
        model, {"proj": nn.Sequential(nn.Conv2d(3, 48, 1)), "body": new_body},
        torch.randn(1, 3, 8, 8))
    assert list(refused) == ["proj"] and model.body is new_body
    assert type(model.proj) is nn.Conv2d


def test_replace_or_put_back_cannot_judge_an_example_the_model_refuses(caplog):
    model = _ReadsProjWeight()
    new = nn.Sequential(nn.Conv2d(3, 48, 1))
    assert ns.replace_or_put_back(model, {"proj": new}, torch.randn(1, 5, 8, 8)) == {}
    assert model.proj is new and "could not check the replaced layers" in caplog.text
