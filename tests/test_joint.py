"""Tests of the ``joint`` plugin: config validation, grids and encodings, the allocator, and
end-to-end compression with honest on-disk sizes (tiny models on the 8x8 digits)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import netshrink as ns
from netshrink.encodings import Codebook, Quantized, Sparse
from netshrink.errors import ConfigError
from netshrink.plugins.joint import Joint, JointConfig
from netshrink.plugins.joint.allocate import (
    Candidate,
    allocate_fisher,
    allocate_uniform,
    candidates,
    magnitude_mask,
)
from netshrink.plugins.joint.quant import encode_weight, fit_scale, quantize
from netshrink.testing import conformance_cases

FAST = {"epochs": 1, "calib_batches": 2}


# -- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"target_ratio": 0.5}, "target_ratio"),
        ({"target_bytes": 0}, "target_bytes"),
        ({"min_bits": 0}, "min_bits"),
        ({"max_bits": 9}, "max_bits"),
        ({"sparsities": [0.5, 1.0]}, "sparsities"),
        ({"sparsities": []}, "sparsities"),
        ({"epochs": -1}, "epochs"),
        ({"lr": 0}, "lr"),
        ({"margin": 0.7}, "margin"),
        ({"sparsty": 0.5}, "sparsty"),
    ],
)
def test_bad_config_names_the_field(config, field):
    with pytest.raises(ValidationError) as info:
        JointConfig.model_validate(config)
    assert field in str(info.value)


def test_cross_field_rules_name_both_fields():
    with pytest.raises(ValidationError, match=r"target_ratio.*target_bytes"):
        JointConfig(target_ratio=10, target_bytes=1000)
    with pytest.raises(ValidationError, match="min_bits=6, max_bits=4"):
        JointConfig(min_bits=6, max_bits=4)


def test_overrides_match_globs_and_regexes():
    joint = Joint(
        overrides={
            "features.*": {"min_bits": 4, "max_bits": 4},
            "re:^fc[0-9]$": {"sparsities": [0.9]},
        }
    )
    assert joint.config_for("features.3").bit_choices() == [4]
    assert joint.config_for("fc1").sparsities == [0.9]
    assert joint.config_for("fc1").bit_choices() == list(range(2, 9))
    assert joint.config_for("classifier") is joint.config


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"fc*": {"max_bits": 9}}, "overrides.fc*.max_bits"),
        ({"fc*": {"sparsities": [1.0]}}, "overrides.fc*.sparsities"),
        ({"fc*": {"min_bits": 6, "max_bits": 4}}, "overrides.fc*"),
        ({"fc*": {"bits": 4}}, "overrides.fc*.bits"),  # the old override field: not a config one
        ({"fc*": {"epochs": 4}}, "overrides.fc*.epochs"),  # step-wide, not per layer
        ({"re:(": {"max_bits": 4}}, "overrides.re:("),
    ],
)
def test_bad_overrides_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as info:
        Joint(overrides=overrides)
    assert f"field '{field}'" in str(info.value)


def test_pipeline_refuses_bad_config_naming_step_and_field():
    with pytest.raises(ns.RecipeError, match=r"config\.max_bits"):
        ns.compress("zoo:lenet300", [ns.step("joint", max_bits=12)], data="digits")


# -- grids and encodings ----------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_encoding_decodes_to_the_trained_grid(bits, per_channel):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(16, 8, 3, 3, generator=gen)
    mask = magnitude_mask(w, 0.8)
    masked = w * mask
    per_channel = per_channel and bits > 1
    scale = fit_scale(masked, bits, 16) if per_channel else fit_scale(masked[mask], bits)
    enc = encode_weight(w, mask, bits, scale)
    assert isinstance(enc, Sparse)
    assert isinstance(enc.values, Codebook if bits == 1 else Quantized)
    decoded = enc.decode()
    assert torch.equal(decoded, quantize(masked, bits, scale))
    # Nothing stored is zero, nothing outside the mask is stored.
    assert enc.nonzeros == enc.values.numel <= int(mask.sum())
    assert not bool(decoded[~mask].any())
    # At most 2**bits - 1 distinct non-zero values per scale (2 for one bit).
    levels = 2 if bits == 1 else (1 << bits) - 1
    if not per_channel:
        assert decoded[decoded != 0].unique().numel() <= levels
    # Packed: values cost bits/8 bytes each, far below fp32.
    assert enc.payload_bytes < 0.2 * w.numel() * 4


def test_fit_scale_clips_outliers_at_low_bits():
    gen = torch.Generator().manual_seed(0)
    w = torch.cat([torch.randn(1000, generator=gen), torch.tensor([8.0])])
    scale = fit_scale(w, 3)
    assert float(scale) < 8.0 / 3  # not the absmax scale
    err = ((quantize(w, 3, scale) - w) ** 2).sum()
    err_absmax = ((quantize(w, 3, torch.tensor(8.0 / 3)) - w) ** 2).sum()
    assert err < err_absmax


# -- allocation -------------------------------------------------------------------------------


def _options():
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(64, 128, generator=gen) * 0.05
    small = torch.randn(16, 8, 3, 3, generator=gen)
    sens_big = torch.full_like(big, 1e-3)
    sens_small = torch.full_like(small, 1.0)  # a sensitive layer
    sparsities = [0.0, 0.5, 0.9, 0.95, 0.99]
    return {
        "big": candidates(
            big, lambda d: float((sens_big * d**2).sum()), sparsities, [2, 4, 8], False, None
        ),
        "small": candidates(
            small, lambda d: float((sens_small * d**2).sum()), sparsities, [2, 4, 8], False, None
        ),
    }


def test_candidate_bytes_shrink_with_sparsity_and_bits():
    opts = {(c.sparsity, c.bits): c for c in _options()["big"]}
    assert opts[(0.9, 2)].bytes < opts[(0.9, 8)].bytes < opts[(0.5, 8)].bytes
    assert opts[(0.99, 2)].dloss > opts[(0.5, 8)].dloss


@pytest.mark.parametrize("budget", [600, 1500, 4000])
def test_fisher_allocation_fits_and_favours_the_sensitive_layer(budget):
    options = _options()
    choice = allocate_fisher(options, budget)
    assert sum(c.bytes for c in choice.values()) <= budget
    # The sensitive layer keeps more of its weights (or more bits) than the insensitive one.
    assert (choice["small"].sparsity, -choice["small"].bits) <= (
        choice["big"].sparsity,
        -choice["big"].bits,
    )
    uniform = allocate_uniform(options, budget)
    assert sum(c.bytes for c in uniform.values()) <= budget
    assert len({(c.sparsity, c.bits) for c in uniform.values()}) == 1
    # The knapsack is at least as good as the best uniform choice, by its own measure.
    assert sum(c.dloss for c in choice.values()) <= sum(c.dloss for c in uniform.values()) + 1e-12


def test_more_budget_never_predicts_more_loss():
    options = _options()
    losses = [sum(c.dloss for c in allocate_fisher(options, b).values()) for b in (600, 1500, 4000)]
    assert losses[0] >= losses[1] >= losses[2]


def test_infeasible_budget_is_a_clear_error():
    with pytest.raises(ConfigError, match="target_ratio/target_bytes"):
        allocate_fisher({"x": [Candidate(0.9, 2, 500, 1.0)]}, 100)


# -- end to end -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lenet300():
    return ns.reference_model("zoo:lenet300", "digits")


@pytest.fixture(scope="module")
def compressed(lenet300):
    step = ns.step(
        "joint", select={"protect_head": False}, target_ratio=25, epochs=3, calib_batches=2
    )
    return ns.compress(lenet300, [step], data="digits", seed=0, latency=False)


def test_honest_ratio_meets_target_and_file_matches(compressed, tmp_path):
    report = compressed.report
    assert report.compression_ratio >= 25
    path = compressed.save(tmp_path / "joint.nsk", report=False)
    assert path.stat().st_size == report.storage_bytes
    loaded = ns.load(path)
    x = torch.randn(5, 1, 8, 8)
    compressed.model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), compressed.model(x), atol=1e-5)


def test_layers_are_really_sparse_and_low_bit(compressed):
    records = {r.name: r.details for r in compressed.records}
    assert set(records) == {"fc1", "fc2", "fc3"}
    tensors = dict(compressed.model.named_parameters())
    for name, details in records.items():
        assert 2 <= details["bits"] <= 8
        enc = compressed.encodings[f"{name}.weight"]
        assert isinstance(enc, Sparse) and enc.is_value_encoded
        weight = tensors[f"{name}.weight"].detach()
        assert torch.equal(weight, enc.decode())  # in memory == on disk
        sparsity = 1 - float((weight != 0).float().mean())
        assert sparsity == pytest.approx(details["sparsity"], abs=1e-6)
        assert weight[weight != 0].unique().numel() <= (1 << details["bits"]) - 1
        assert isinstance(compressed.encodings[f"{name}.bias"], Quantized)
    # Adaptive: not every layer got the same pattern, and something was pruned hard.
    assert len({(d["sparsity"], d["bits"]) for d in records.values()}) > 1
    assert max(d["sparsity"] for d in records.values()) > 0.8
    # Still a classifier after three epochs of joint training at 25x (dense: ~0.95).
    assert compressed.report.accuracy_after > 0.85


def test_target_bytes_and_overrides(lenet300):
    step = ns.step(
        "joint",
        select={"protect_head": False},
        target_bytes=6000,
        overrides={"fc3": {"sparsities": [0.5], "min_bits": 6, "max_bits": 6}},
        epochs=0,
        calib_batches=2,
    )
    result = ns.compress(lenet300, [step], data="digits", seed=0, latency=False)
    assert result.report.storage_bytes <= 6000
    fc3 = next(r.details for r in result.records if r.name == "fc3")
    assert fc3["bits"] == 6 and fc3["target_sparsity"] == 0.5


def test_uniform_allocation_gives_one_pattern(lenet300):
    step = ns.step(
        "joint",
        select={"protect_head": False},
        target_ratio=30,
        allocation="uniform",
        epochs=0,
        calib_batches=2,
    )
    result = ns.compress(lenet300, [step], data="digits", seed=0, latency=False)
    assert len({(r.details["target_sparsity"], r.details["bits"]) for r in result.records}) == 1
    assert result.report.compression_ratio >= 30


def test_impossible_target_names_the_field(lenet300):
    step = ns.step("joint", target_ratio=5000, epochs=0)
    with pytest.raises(ConfigError, match="target_ratio"):
        ns.compress(lenet300, [step], data="digits", seed=0, latency=False)


def test_keeps_an_earlier_steps_zeros(lenet300):
    steps = [
        ns.step("magnitude", select={"names": ["fc1"]}, sparsity=0.5),
        ns.step(
            "joint",
            select={"names": ["fc1"]},
            target_ratio=1.5,
            epochs=0,
            overrides={"fc1": {"sparsities": [0.3]}},
            calib_batches=2,
        ),
    ]
    result = ns.compress(lenet300, steps, data="digits", seed=0, latency=False)
    fc1 = result.model.fc1.weight.detach()
    assert float((fc1 == 0).float().mean()) >= 0.5


@pytest.mark.parametrize("case", conformance_cases(Joint), ids=str)
def test_conformance(case):
    case.run()
