"""sigmaprune: the μ + kσ threshold is computed per layer as documented, prunes what it should,
keeps earlier zeros, stores the result sparse, and refuses bad configs naming the field."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import netshrink as ns
from netshrink import CompressionContext
from netshrink.encodings import Sparse
from netshrink.plugins.sigmaprune import SigmaPrune, SigmaPruneConfig, sigma_threshold


class TwoLayer(nn.Module):
    """Two linear layers with normal weights of very different scales."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.fc1 = nn.Linear(200, 100)
        self.fc2 = nn.Linear(100, 50)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.randn(100, 200, generator=gen) * 0.01)
            self.fc2.weight.copy_(torch.randn(50, 100, generator=gen) * 1.0)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _prune(model, config, ctx=None):
    ctx = ctx or CompressionContext(step_name="sigmaprune")
    layers = [("fc1", model.fc1), ("fc2", model.fc2)]
    return SigmaPrune(config).compress(model, layers, ctx), ctx


@pytest.mark.parametrize("k", [0.0, 0.5, 1.0, 2.0])
def test_abs_threshold_is_mean_plus_k_std_of_magnitudes(k):
    model = TwoLayer()
    original = model.fc1.weight.detach().clone()
    out, ctx = _prune(model, {"k": k})
    mags = original.abs()
    threshold = float(mags.mean() + k * mags.std(unbiased=False))
    expected = original.abs() >= threshold
    assert torch.equal(model.fc1.weight != 0, expected)
    assert torch.equal(model.fc1.weight[expected], original[expected])  # survivors untouched
    enc = ctx.encoding_of("fc1.weight")
    assert isinstance(enc, Sparse) and enc.nonzeros == int(expected.sum())
    assert out.records[0].details["threshold"] == pytest.approx(threshold, rel=1e-5)


def test_per_layer_thresholds_follow_each_layers_scale():
    model = TwoLayer()
    out, _ = _prune(model, {"k": 1.0, "statistic": "signed"})
    t1, t2 = (r.details["threshold"] for r in out.records)
    assert t2 / t1 == pytest.approx(100, rel=0.1)  # fc2's weights are 100x larger
    # For normal weights, |w| < 1σ is ~68% of them in every layer, whatever its scale.
    for rec in out.records:
        assert rec.details["sparsity"] == pytest.approx(0.683, abs=0.03)


def test_the_3_sigma_rule_on_normal_weights_prunes_nearly_everything():
    model = TwoLayer()
    out, _ = _prune(model, {"k": 3.0, "statistic": "signed"})
    assert out.records[0].details["sparsity"] == pytest.approx(0.9973, abs=0.002)
    assert out.summary["sparsity"] > 0.99


def test_larger_k_prunes_more():
    sparsities = []
    for k in (0.0, 0.5, 1.0, 2.0, 3.0):
        out, _ = _prune(TwoLayer(), {"k": k})
        sparsities.append(out.summary["sparsity"])
    assert sparsities == sorted(sparsities) and sparsities[0] < sparsities[-1]


def test_max_sparsity_caps_a_layer():
    model = TwoLayer()
    original = model.fc1.weight.detach().clone()
    out, _ = _prune(model, {"k": 3.0, "max_sparsity": 0.9})
    assert out.records[0].details["sparsity"] == pytest.approx(0.9, abs=1e-3)
    kept = model.fc1.weight != 0
    assert float(original.abs()[kept].min()) >= float(original.abs()[~kept].max())


def test_earlier_zeros_stay_pruned_and_do_not_skew_the_statistics():
    model = TwoLayer()
    ctx = CompressionContext(step_name="sigmaprune")
    mask = torch.ones_like(model.fc1.weight, dtype=torch.bool)
    mask[:, :100] = False  # an earlier step removed half of fc1
    ctx.encode(model, "fc1.weight", Sparse.from_dense(model.fc1.weight.detach() * mask, mask=mask))
    survivors = model.fc1.weight.detach()[mask]
    _prune(model, {"k": 0.0}, ctx)
    assert not bool((model.fc1.weight[~mask] != 0).any())
    expected = survivors.abs() >= float(survivors.abs().mean())
    assert torch.equal(model.fc1.weight.detach()[mask] != 0, expected)


@pytest.mark.parametrize(("field", "value"), [
    ("k", -1.0), ("k", -0.1), ("statistic", "median"), ("max_sparsity", 0.0), ("max_sparsity", 1.5),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        SigmaPruneConfig.model_validate({field: value})


def test_sigma_threshold_helper():
    w = torch.tensor([0.0, 1.0, -1.0, 3.0, -3.0])
    # Zeros are ignored: |w| of the non-zeros is [1, 1, 3, 3] → mean 2, std 1.
    assert sigma_threshold(w, 1.0, "abs") == pytest.approx(3.0)
    assert sigma_threshold(w, 0.0, "signed") == pytest.approx(0.0)


def test_pipeline_sigma_on_lenet_fc_layers(tmp_path):
    result = ns.compress("zoo:lenet300", [ns.step("sigmaprune", k=1.0)], data="digits", seed=0)
    model = result.model
    assert float((model.fc1.weight == 0).float().mean()) > 0.5
    assert result.report.storage_bytes < sum(p.numel() * 4 for p in model.parameters())
    path = result.save(tmp_path / "s.nsk", report=False)
    assert path.stat().st_size == result.report.storage_bytes
