"""tucker: Tucker-2 for Conv2d, SVD for Linear, rank selection, refusals, artifact round trip."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import netshrink as ns
from netshrink import CompressionContext, LayerSelector, ModelInfo, NetshrinkError
from netshrink.lowrank import rank_by_energy, rank_by_vbmf
from netshrink.plugins.tucker import Tucker, TuckerConfig
from netshrink.plugins.tucker.factorize import tucker2, tucker2_error


def _run(model: nn.Module, config: dict | None = None, select: dict | None = None):
    info = ModelInfo("test", input_shape=(3, 16, 16), num_classes=10, head=None)
    ctx = CompressionContext(info=info, seed=0, step_name="tucker")
    layers = LayerSelector(**(select or {})).resolve(model, default_types=["Conv2d", "Linear"])
    out = Tucker(config or {}).compress(model, layers, ctx)
    return out, {r.name: r.details for r in out.records}


def _low_rank_conv(o=24, i=16, r_out=6, r_in=4, k=3, **kw) -> nn.Conv2d:
    """A conv whose kernel has exact multilinear rank (r_out, r_in) on the channel modes."""
    g = torch.Generator().manual_seed(0)
    core = torch.randn(r_out, r_in, k, k, generator=g)
    u, v = torch.randn(o, r_out, generator=g), torch.randn(i, r_in, generator=g)
    conv = nn.Conv2d(i, o, k, **kw)
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("abhw,oa,ib->oihw", core, u, v))
    return conv


@pytest.mark.parametrize("bad, field", [
    ({"rank": 0.0}, "rank"), ({"rank": 1.5}, "rank"), ({"energy": 0}, "energy"),
    ({"min_saving": 1.0}, "min_saving"), ({"method": "cp"}, "method"),
    ({"grouped": "maybe"}, "grouped"), ({"min_rank": 0}, "min_rank"), ({"ranks": 3}, "ranks"),
])
def test_bad_config_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        TuckerConfig(**bad)


@pytest.mark.parametrize("kw", [
    {"padding": 1}, {"stride": 2, "padding": 2, "dilation": 2}, {"padding": 1, "bias": False},
])
def test_tucker2_is_exact_at_the_true_rank(kw):
    model = nn.Sequential(_low_rank_conv(**kw)).eval()
    x = torch.randn(2, 16, 13, 13)
    expected = model(x)
    _, rec = _run(model, {"rank": 0.25})  # ceil(0.25 * 24) = 6, ceil(0.25 * 16) = 4
    new = model[0]
    assert isinstance(new, nn.Sequential) and [type(m) for m in new] == [nn.Conv2d] * 3
    reduce, core, restore = new
    assert (reduce.in_channels, reduce.out_channels, reduce.kernel_size) == (16, 4, (1, 1))
    assert (core.in_channels, core.out_channels, core.kernel_size) == (4, 6, (3, 3))
    assert (core.stride, core.padding, core.dilation) == (
        (kw.get("stride", 1),) * 2, (kw["padding"],) * 2, (kw.get("dilation", 1),) * 2)
    assert (restore.out_channels, restore.bias is not None) == (24, kw.get("bias", True))
    assert rec["0"]["ranks"] == [6, 4] and rec["0"]["rel_error"] < 1e-5
    assert torch.allclose(model(x), expected, atol=1e-4)
    assert sum(p.numel() for p in model.parameters()) == rec["0"]["params_after"]


def test_gram_hooi_matches_tensorly():
    w = torch.randn(20, 12, 3, 3, generator=torch.Generator().manual_seed(2))
    errors = [tucker2_error(w, *tucker2(w, 8, 5, n_iter_max=200, tol=1e-10, seed=0, backend=b))
              for b in ("gram", "tensorly")]
    assert errors[0] == pytest.approx(errors[1], rel=1e-4)


def test_linear_svd():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(40, 30)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(30, 5, generator=g) @ torch.randn(5, 40, generator=g))
    model = nn.Sequential(lin)
    x = torch.randn(4, 40)
    expected = model(x)
    _, rec = _run(model, {"method": "energy", "energy": 0.9999})
    first, second = model[0]
    assert (first.in_features, first.out_features, first.bias) == (40, 5, None)
    assert (second.in_features, second.out_features) == (5, 30)
    assert rec["0"]["ranks"] == [5]
    assert torch.allclose(model(x), expected, atol=1e-4)


def test_only_replaced_when_it_saves_parameters():
    model = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3))
    _, rec = _run(model, {"rank": 0.5})  # 1x1 8x8 at rank 4: 4*(8+8) = 64 = no saving
    assert "no parameter saving" in rec["0"]["skipped"]
    assert isinstance(model[0], nn.Conv2d)
    assert isinstance(model[1], nn.Sequential)  # 3x3 at ranks (4, 4): 32+144+32 < 576


def test_grouped_and_custom_convs_refused():
    class MyConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Conv2d(16, 16, 3, groups=4), nn.Conv2d(16, 16, 3, groups=16),
                          MyConv(16, 16, 3))
    _, rec = _run(model)
    assert "grouped conv (groups=4)" in rec["0"]["skipped"]
    assert "depthwise" in rec["1"]["skipped"]
    assert "overrides Conv2d.forward" in rec["2"]["skipped"]
    assert all(type(m) is not nn.Sequential for m in model)
    with pytest.raises(NetshrinkError, match="grouped: skip"):
        _run(model, {"grouped": "error"})


def test_rank_rules():
    s = np.array([10.0, 5.0, 1.0, 0.1])
    assert rank_by_energy(s, 0.75) == 1 and rank_by_energy(s, 0.99) == 2
    rng = np.random.default_rng(0)
    assert rank_by_vbmf(rng.normal(size=(64, 300))) == 0  # pure noise
    signal = rng.normal(size=(64, 4)) @ rng.normal(size=(4, 300))
    assert rank_by_vbmf(signal + 0.1 * rng.normal(size=(64, 300))) == 4
    model = nn.Sequential(nn.Conv2d(32, 32, 3))
    _, rec = _run(model, {"method": "vbmf", "min_rank": 3})  # noise weights: VBMF says 0
    assert rec["0"]["ranks"] == [3, 3]


def test_round_to():
    model = nn.Sequential(nn.Conv2d(32, 48, 3))
    _, rec = _run(model, {"rank": 0.3, "round_to": 8})
    assert rec["0"]["ranks"] == [16, 16]


def test_pipeline_round_trip(lenet5, digits28, tmp_path):
    before = copy.deepcopy(lenet5)
    result = ns.compress(lenet5, [ns.step("tucker", select={"types": ["Conv2d", "Linear"]})],
                         data=digits28, seed=0, latency=False)
    model = result.model
    assert isinstance(model.conv2, nn.Sequential) and isinstance(model.fc1, nn.Sequential)
    assert result.report.params_after < result.report.params_before
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(),
                                                 lenet5.state_dict().values()))
    path = result.save(tmp_path / "lenet5.nsk", report=False)
    assert path.stat().st_size == pytest.approx(result.report.storage_bytes, abs=64)
    loaded = ns.load(path)
    x = digits28.test.tensors[0][:8]
    assert torch.allclose(loaded(x), model(x), atol=1e-5)


@pytest.mark.slow
@pytest.mark.timm
@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_050", "convnext_atto"])
def test_timm_architectures(name):
    model = ns.load_model(f"timm:{name}", in_chans=1, num_classes=10, input_size=32).eval()
    before = sum(p.numel() for p in model.parameters())
    _run(model, {}, {"types": ["Conv2d"]})
    assert sum(p.numel() for p in model.parameters()) < before
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_a_layer_the_model_reads_is_put_back():
    class ReadsWeight(nn.Module):  # like timm's EdgeNeXt positional encoding
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Conv2d(3, 32, 3, padding=1)
            self.body = nn.Conv2d(32, 32, 3, padding=1)

        def forward(self, x):
            return self.body(self.proj(x.to(self.proj.weight.dtype)))

    out, rec = _run(ReadsWeight(), {"method": "ratio", "rank": 0.25})
    model = out.model
    assert type(model.proj) is nn.Conv2d and not isinstance(model.body, nn.Conv2d)
    assert rec["proj"]["skipped"].startswith("left as it was: replacing it broke module")
    assert "params_after" not in rec["proj"] and "params_after" in rec["body"]
    assert out.summary["skipped"]["proj"] == rec["proj"]["skipped"]
    model(torch.randn(1, 3, 8, 8))
