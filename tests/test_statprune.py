"""statprune: statistics-based filter clustering, physical removal through Torch-Pruning."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import netshrink as ns
from netshrink import CompressionContext, LayerSelector, ModelInfo
from netshrink.plugins.statprune import StatPrune, StatPruneConfig
from netshrink.plugins.statprune.stats import removal_budget, round_removal


def _run(model: nn.Module, config: dict | None = None, select: dict | None = None,
         input_shape=(1, 16, 16), head: str | None = "fc"):
    info = ModelInfo("test", input_shape=input_shape, num_classes=10, head=head)
    ctx = CompressionContext(info=info, seed=0, step_name="statprune")
    layers = LayerSelector(**(select or {})).resolve(model, head=head, default_types=["Conv2d"])
    out = StatPrune(config or {}).compress(model, layers, ctx)
    return out, {r.name: r.details for r in out.records}


class Plain(nn.Module):
    """conv(8) -> bn -> conv(16) -> pool -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(self.pool(torch.relu(self.conv2(x))).flatten(1))


class Grouped(nn.Module):
    """A grouped conv (groups=2) between two plain convs, and a depthwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.gconv = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.pool(self.dw(self.gconv(torch.relu(self.conv1(x))))).flatten(1))


# -- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, field", [
    ({"clusters": 1}, "clusters"),
    ({"clusters": 2, "drop_clusters": 2}, "drop_clusters"),
    ({"features": []}, "features"),
    ({"features": ["mean", "mean"]}, "features"),
    ({"features": ["median"]}, "features"),
    ({"min_keep_ratio": 0.0}, "min_keep_ratio"),
    ({"method": "dbscan"}, "method"),
    ({"clusterz": 3}, "clusterz"),
])
def test_bad_config_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        StatPruneConfig(**bad)


def test_budget_and_rounding():
    assert removal_budget(64, 0.25, 4, 1) == 48
    assert removal_budget(64, 0.25, 20, 1) == 44
    assert removal_budget(10, 0.5, 1, 8) == 2  # keep 5 -> rounded up to 8
    assert removal_budget(64, 0.3, 1, 8) == 40  # keep ceil(19.2)=20 -> 24
    assert round_removal(64, 30, 8) == 24  # keep 34 -> 40


# -- behaviour ------------------------------------------------------------------------------


def test_weak_filters_are_the_ones_removed():
    torch.manual_seed(0)
    model = Plain().eval()
    weak = [1, 4, 6, 9, 13]
    with torch.no_grad():
        model.conv2.weight[weak] *= 0.01  # near-zero mean and variance: the weak cluster
    kept_rows = model.conv2.weight[[i for i in range(16) if i not in weak]].clone()
    # (the mean of a random filter is noise around 0, so cluster on the spread statistics)
    _, rec = _run(model, {"min_keep_ratio": 0.1, "features": ["var", "l2"]},
                  {"names": ["conv2"]})
    assert rec["conv2"]["removed"] == len(weak)
    assert model.conv2.weight.shape == (11, 8, 3, 3)
    assert torch.equal(model.conv2.weight, kept_rows)
    assert model.fc.in_features == 11  # the next layer was rebuilt from the kept channels
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_weights_physically_removed_with_batchnorm(lenet5):
    model = copy.deepcopy(lenet5)
    before = sum(p.numel() for p in model.parameters())
    out, rec = _run(model, {}, {"types": ["Conv2d"]}, input_shape=(1, 28, 28), head="fc2")
    assert model.conv1.out_channels == rec["conv1"]["channels_after"] < 20
    assert model.conv2.in_channels == model.conv1.out_channels
    assert model.conv2.out_channels == rec["conv2"]["channels_after"] < 50
    assert model.fc1.in_features == model.conv2.out_channels * 16
    assert sum(p.numel() for p in model.parameters()) == out.summary["params_after"] < before
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("method", ["kmeans", "gmm"])
def test_floor_on_kept_channels(method):
    torch.manual_seed(1)
    model = Plain()
    with torch.no_grad():
        model.conv2.weight[:14] *= 0.001  # 14 of 16 weak; the floor must stop at 16 - 12 = 4 kept
    _, rec = _run(model, {"method": method, "min_keep_ratio": 0.25, "min_keep_channels": 2},
                  {"names": ["conv2"]})
    assert model.conv2.out_channels == 4 == rec["conv2"]["channels_after"]
    torch.manual_seed(1)
    model = Plain()
    with torch.no_grad():
        model.conv2.weight[:14] *= 0.001
    _run(model, {"method": method, "min_keep_ratio": 0.1, "min_keep_channels": 5},
         {"names": ["conv2"]})
    assert model.conv2.out_channels == 5  # the absolute floor holds too


def test_more_clusters_drop_more():
    def kept(config):
        torch.manual_seed(0)
        model = Plain()
        _run(model, {"min_keep_ratio": 0.05, "min_keep_channels": 1, **config},
             {"names": ["conv2"]})
        return model.conv2.out_channels

    assert kept({"clusters": 4, "drop_clusters": 3}) < kept({"clusters": 4, "drop_clusters": 1})


def test_residual_adds_stay_consistent():
    model = ns.load_model("zoo:resnet_small", in_chans=1, num_classes=10, input_size=32).eval()
    out, rec = _run(model, {}, {"types": ["Conv2d"]}, input_shape=(1, 32, 32))
    # the stem and the first block's second conv feed the same residual add
    assert "layers.0.0.conv2" in rec["stem.0"]["coupled_with"]
    assert model.stem[0].out_channels == model.layers[0][0].conv2.out_channels < 32
    assert model.layers[0][0].bn2.num_features == model.stem[0].out_channels
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert out.summary["params_after"] < out.summary["params_before"]


def test_coupled_skip_leaves_residual_channels():
    model = ns.load_model("zoo:resnet_small", in_chans=1, num_classes=10, input_size=32).eval()
    _, rec = _run(model, {"coupled": "skip"}, {"types": ["Conv2d"]}, input_shape=(1, 32, 32))
    assert "residual" in rec["stem.0"]["skipped"]
    assert model.stem[0].out_channels == 32
    assert model.layers[0][0].conv1.out_channels < 32  # inside a block: free to prune


def test_unselected_tied_layer_is_respected():
    model = ns.load_model("zoo:resnet_small", in_chans=1, num_classes=10, input_size=32).eval()
    _, rec = _run(model, {}, {"types": ["Conv2d"], "exclude": ["layers.0.0.conv2"]},
                  input_shape=(1, 32, 32))
    assert "layers.0.0.conv2" in rec["stem.0"]["skipped"]
    assert model.stem[0].out_channels == 32


def test_grouped_and_depthwise_convs_stay_valid():
    torch.manual_seed(0)
    model = Grouped().eval()
    _, rec = _run(model, {"min_keep_ratio": 0.25}, {"names": ["conv1"]})
    assert rec["conv1"]["removed"] % 2 == 0  # the same positions in both conv groups
    c = model.conv1.out_channels
    assert c < 16 and model.gconv.in_channels == c and model.gconv.groups == 2
    assert model.dw.groups == model.dw.in_channels == model.dw.out_channels
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_classifier_outputs_never_pruned():
    model = Plain()
    _, rec = _run(model, {}, {"types": ["Linear"], "protect_head": False})
    assert "classifier" in rec["fc"]["skipped"]
    assert model.fc.out_features == 10


def test_deterministic():
    def run():
        torch.manual_seed(3)
        model = Plain()
        _run(model, {"method": "gmm"})
        return model.state_dict()

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pipeline_round_trip(lenet5, digits28, tmp_path):
    result = ns.compress(lenet5, [ns.step("statprune", select={"types": ["Conv2d", "Linear"]})],
                         data=digits28, seed=0, latency=False)
    assert result.model.conv1.out_channels < 20 and result.model.fc1.out_features < 500
    assert result.report.params_after < result.report.params_before
    path = result.save(tmp_path / "lenet5.nsk", report=False)
    assert path.stat().st_size == pytest.approx(result.report.storage_bytes, abs=64)
    loaded = ns.load(path)
    x = digits28.test.tensors[0][:8]
    assert torch.allclose(loaded(x), result.model(x), atol=1e-5)


@pytest.mark.slow
@pytest.mark.timm
@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_050", "densenet121",
                                  "efficientnet_b0"])
def test_timm_architectures(name):
    model = ns.load_model(f"timm:{name}", in_chans=1, num_classes=10, input_size=32).eval()
    before = sum(p.numel() for p in model.parameters())
    info = ns.model_info(model)
    _, rec = _run(model, {}, {"types": ["Conv2d"]}, input_shape=(1, 32, 32), head=info.head)
    assert sum(p.numel() for p in model.parameters()) < before
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert rec


def test_a_group_that_breaks_the_model_is_put_back(split_net):
    model = split_net()
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("conv2",
                                                                                        "fc"))}
    config = {"min_keep_ratio": 0.1, "features": ["var", "l2"]}
    out, rec = _run(model, config, {"names": ["conv1", "conv2"]})
    assert "broke module mix" in rec["conv1"]["skipped"] and "put back" in rec["conv1"]["skipped"]
    assert rec["conv2"]["removed"] == 3 and model.fc.in_features == 13  # the next group ran
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # conv1 and mix as they were
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    assert out.summary["skipped"] == {"conv1": rec["conv1"]["skipped"]}
    unchecked = split_net()  # without the check, that group breaks the model
    _run(unchecked, {**config, "verify": False}, {"names": ["conv1"]})
    with pytest.raises(RuntimeError, match="split_with_sizes"):
        unchecked(torch.randn(2, 1, 16, 16))


@pytest.mark.slow
@pytest.mark.timm
def test_csp_split_groups_are_put_back():
    """Torch-Pruning misses a dependency in CSP blocks (a channel split): those groups are put
    back and the rest of the model is pruned."""
    model = ns.load_model("timm:cspresnet50", in_chans=1, num_classes=10, input_size=32).eval()
    info = ns.model_info(model)
    before = sum(p.numel() for p in model.parameters())
    _, rec = _run(model, {}, {"types": ["Conv2d"]}, input_shape=(1, 32, 32), head=info.head)
    assert any("put back" in r.get("skipped", "") for r in rec.values())
    assert sum(p.numel() for p in model.parameters()) < before
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
