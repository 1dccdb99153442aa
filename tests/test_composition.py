"""Built-in compressors composed in one pipeline: each chain's encodings nest in one artifact
whose size is the report's, and which loads back into the same function.

The chains are the paper combinations shipped under recipes/ (chain_*.yaml), shrunk to LeNet-5
on the 8x8 digits with a few epochs so they run in seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import netshrink as ns
from netshrink.recipe import Recipe

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("single_thread")


def _round_trip(result, digits, tmp_path) -> torch.nn.Module:
    """Save, check the file is exactly the report's size, load, check outputs match."""
    path = result.save(tmp_path / "m.nsk", report=False)
    assert path.stat().st_size == result.report.storage_bytes
    loaded = ns.load(path)
    x = digits.test.tensors[0][:16]
    result.model.eval()
    assert torch.allclose(loaded(x), result.model(x), atol=1e-4)
    return loaded


def _zero_fraction(weight: torch.Tensor) -> float:
    return float((weight == 0).float().mean())


def test_statprune_tucker_joint(lenet, digits, tmp_path):
    steps = [
        ns.step("statprune", select={"names": ["conv1"]}, min_keep_ratio=0.5),
        ns.step("tucker", select={"names": ["conv2"]}, method="ratio", rank=0.5),
        ns.step("joint", select={"types": ["Conv2d", "Linear"]}, target_ratio=8, epochs=1,
                calib_batches=2),
    ]
    result = ns.compress(lenet, steps, data=digits, seed=0, latency=False)
    model = result.model
    assert model.conv1.out_channels < lenet.conv1.out_channels  # channels physically gone
    assert not isinstance(model.conv2, torch.nn.Conv2d)  # the Tucker-2 cascade replaced it
    joint_rows = [r for r in result.report.rows if "joint" in r.methods]
    assert joint_rows, "joint encoded nothing"
    dense = sum(t.numel() * 4 for t in lenet.state_dict().values())
    assert dense / result.report.storage_bytes > 8 * 0.95
    _round_trip(result, digits, tmp_path)


def test_normsparse_then_bioclust_keeps_zeros(lenet, digits, tmp_path):
    steps = [
        ns.step("normsparse", select={"types": ["Linear", "Conv2d"]}, l1=0.02, epochs=2),
        ns.step("bioclust", select={"types": ["Conv2d", "Linear"]}, bits=4, population=2),
    ]
    first = ns.compress(lenet, steps[:1], data=digits, seed=0, latency=False)
    result = ns.compress(lenet, steps, data=digits, seed=0, latency=False)
    before, after = first.model.conv2.weight, result.model.conv2.weight
    assert before.shape == after.shape
    assert _zero_fraction(before) > 0.2  # normsparse left conv2's weak kernels as stored zeros
    assert torch.equal(before == 0, after == 0)  # bioclust clustered the kept values only
    assert result.report.storage_bytes < first.report.storage_bytes
    _round_trip(result, digits, tmp_path)


def test_rlprune_sigmaprune_then_quantize(lenet, digits, tmp_path):
    steps = [
        ns.step("rlprune", select={"types": ["Conv2d"]}, episodes=3, warmup=1, hidden=16,
                batch_size=8, reward_samples=64, target_sparsity=0.6),
        ns.step("sigmaprune", select={"types": ["Linear"]}, k=1.0),
        ns.step("quantize", select={"types": ["Conv2d", "Linear"]}, bits=5),
    ]
    pruned = ns.compress(lenet, steps[:2], data=digits, seed=0, latency=False)
    result = ns.compress(lenet, steps, data=digits, seed=0, latency=False)
    for name in ("conv1", "conv2", "fc1"):
        w0 = getattr(pruned.model, name).weight
        w1 = getattr(result.model, name).weight
        assert torch.equal(w0 == 0, w1 == 0), name  # quantize kept the pruned positions
    for row in result.model.fc1.weight:  # per-output-channel scales: 5-bit levels per row
        assert len(torch.unique(row)) <= 2**5
    assert result.report.storage_bytes < pruned.report.storage_bytes
    _round_trip(result, digits, tmp_path)


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("chain_*.yaml")),
                         ids=lambda p: p.name)
def test_chain_recipes_plan_on_their_model(path):
    """Every shipped chain recipe validates against its model: compressors, fields, selectors."""
    from click.testing import CliRunner

    from netshrink.cli import cli

    assert len(Recipe.from_file(path).steps) >= 2
    out = CliRunner().invoke(cli, ["validate", str(path)])
    assert out.exit_code == 0, out.output
    assert "recipe is valid" in out.output
