"""The architecture coverage matrix (benchmarks/coverage.py) and statprune's refusals."""

from __future__ import annotations

import copy
import json
import multiprocessing
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import netshrink as ns
from netshrink import CompressionContext, LayerSelector, ModelInfo
from netshrink.plugins.statprune import StatPrune
from netshrink.plugins.statprune.guard import failing_module

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ lives at the repository root, not in the install
    sys.path.insert(0, str(ROOT))
from benchmarks import coverage as cov  # noqa: E402

# -- the matrix's lists and records ------------------------------------------------------------


def test_rows_cover_the_families_the_issue_names():
    rows = cov.models()
    timm = [r for r in rows if r.spec.startswith("timm:")]
    assert len(timm) >= 30
    assert len([r for r in rows if r.spec.startswith("torchvision:")]) >= 5
    assert {r.spec for r in rows if r.sequence} == {"hf:bert-tiny", "hf:gpt2-tiny",
                                                    "hf:llama-tiny"}
    names = " ".join(r.spec for r in timm)
    for part in ("resnet", "regnet", "mobilenet", "efficientnet", "ghostnet", "convnext",
                 "densenet", "dpn", "csp", "res2net", "repvgg", "vit_", "deit", "swin", "levit",
                 "mobilevit", "efficientvit"):
        assert part in names, part
    assert len({r.spec for r in rows}) == len(rows)  # no row twice
    quick = cov.models(quick=True)
    assert {r.spec for r in quick} == set(cov.QUICK) and len(quick) < len(rows)


def test_columns_are_every_registered_compressor_and_the_fixed_ratios():
    from netshrink.registry import manager

    cols = cov.methods()
    assert {c.compressor for c in cols} == set(manager.compressors())
    assert {c.column for c in cols} >= set(manager.compressors())
    fixed = {c.column: c for c in cols if c.column != c.compressor}
    assert fixed["rlprune channel 0.5"].config["granularity"] == "channel"
    # Budgets cut for the matrix sit on top of the fast configs, and say so on the page.
    normsparse = next(c for c in cols if c.column == "normsparse")
    assert normsparse.config["epochs"] == 1


@pytest.mark.parametrize("cell, text", [
    (cov.Cell("m", "x", cov.OK, ratio=3.24, seconds=4.4), "ok 3.2x 4 s"),
    (cov.Cell("m", "x", cov.TIMEOUT, seconds=300), "timeout"),
    (cov.Cell("m", "x", cov.REFUSED, reason="no Linear layer"), "refused: no Linear layer"),
    (cov.Cell("m", "x", cov.FAILED, reason="StepError: boom\nmore"),
     "FAILED: StepError: boom more"),
])
def test_cell_text(cell, text):
    assert cell.text() == text


def test_long_reasons_are_cut():
    text = cov.Cell("m", "x", cov.REFUSED, reason="y" * 500).text()
    assert len(text) < 200 and text.endswith("…")


@pytest.mark.parametrize("exc, status", [
    (ns.SelectionError("selected no layers"), cov.REFUSED),
    (ns.ModelSpecError("cannot be built"), cov.REFUSED),
    (ns.RecipeError("needs data"), cov.REFUSED),
    (ns.DataError("does not fit"), cov.REFUSED),
    (ns.StepError("step 0 failed"), cov.FAILED),
    (ns.NetshrinkError("mid-run"), cov.FAILED),
    (RuntimeError("a bare error"), cov.FAILED),
])
def test_classify(exc, status):
    got, reason = cov.classify(exc)
    assert got == status and reason


def _rows() -> list[cov.Model]:
    return [cov.Model("timm:a", "ResNet/RegNet"), cov.Model("timm:v", "ViT/DeiT"),
            cov.Model("hf:t", "transformers")]


def test_summary_counts_and_cnn_share():
    rows = _rows()
    cells = [cov.Cell("timm:a", "m", cov.OK, 2.0, 1.0), cov.Cell("timm:v", "m", cov.REFUSED),
             cov.Cell("hf:t", "m", cov.TIMEOUT), cov.Cell("timm:a", "n", cov.FAILED)]
    assert cov.summary(cells, rows, "m") == ["m", 1, 1, 0, 1, "1/1"]
    assert cov.summary(cells, rows, "n") == ["n", 0, 0, 1, 0, "0/1"]


def test_render_has_every_row_and_column():
    rows, cols = _rows(), [cov.Method("m", "magnitude"), cov.Method("q", "quantize", {"bits": 4})]
    cells = [cov.Cell(r.spec, c.column, cov.OK, 1.5, 2.0) for r in rows for c in cols][:-1]
    text = "\n".join(cov.render(cells, rows, cols))
    assert "| model | m | q |" in text
    for r in rows:
        assert f"| {r.spec} |" in text
    assert text.count("ok 1.5x 2 s") == 5 and "| — |" in text  # the missing cell is shown
    assert "`{'bits': 4}`" in text


def _sleep(seconds: float) -> dict:
    time.sleep(seconds)
    return {"status": cov.OK}


def _die() -> dict:
    import os

    os._exit(3)


def test_a_cell_past_its_limit_is_killed_and_a_dead_one_reported():
    ctx = multiprocessing.get_context("fork")
    t0 = time.perf_counter()
    assert cov._in_process(_sleep, (30,), 0.5, ctx) is None
    assert time.perf_counter() - t0 < 10
    assert cov._in_process(_sleep, (0,), 10, ctx) == {"status": cov.OK}
    died = cov._in_process(_die, (), 10, ctx)
    assert died["status"] == cov.FAILED and "exit code 3" in died["reason"]


def test_command_line_is_checked():
    assert cov.parse(["--quick"]).quick
    with pytest.raises(SystemExit):
        cov.parse(["--timeout", "0"])
    assert cov.parse(["--jobs", "2"]).jobs == 2
    with pytest.raises(SystemExit):
        cov.parse(["--jobs", "0"])


# -- the scheduler: cells in parallel, rows reloaded, checkpoint ------------------------------


def _fake_cell(model: cov.Model, method: cov.Method, workdir: str) -> dict:
    """A cell whose outcome the row and column name: sleeps, dies, fails or saves."""
    import os

    if method.column == "slow":
        time.sleep(30)
    if method.column == "dies":
        os._exit(4)
    time.sleep(0.2)
    if model.spec.endswith("bad"):
        return {"status": cov.FAILED, "ratio": None, "seconds": 0.2, "reason": "boom"}
    return {"status": cov.OK, "ratio": 2.0, "seconds": 0.2, "reason": "",
            "artifact": f"{workdir}/{model.spec}-{method.column}.nsa"}


def _fake_reload(artifacts: list[str], timeout: float) -> dict:
    """The reload of a row: every artifact of a row named 'differs' fails its comparison."""
    return {"errors": {a: "outputs differ" if "differs" in a else "" for a in artifacts}}


def test_parallel_cells_fill_every_row_with_its_own_outcome(tmp_path, monkeypatch):
    monkeypatch.setattr(cov, "run_cell", _fake_cell)
    monkeypatch.setattr(cov, "_reload_isolated", _fake_reload)
    rows = [cov.Model(s, "other") for s in ("m:ok", "m:bad", "m:differs")]
    cols = [cov.Method("a", "x"), cov.Method("slow", "x"), cov.Method("dies", "x")]
    seen: list[int] = []
    t0 = time.perf_counter()
    cells = cov.run_matrix(rows, cols, timeout=1.0, workdir=tmp_path, jobs=3,
                           on_row=lambda cs: seen.append(len(cs)))
    assert time.perf_counter() - t0 < 20  # three timeouts of 1 s, three at a time
    by = {(c.model, c.method): c for c in cells}
    assert len(cells) == 9 and seen == [3, 6, 9]  # one call per finished row
    assert by["m:ok", "a"].status == cov.OK and by["m:ok", "a"].ratio == 2.0
    assert by["m:bad", "a"].status == cov.FAILED and by["m:bad", "a"].reason == "boom"
    assert by["m:differs", "a"].status == cov.FAILED
    assert by["m:differs", "a"].reason == "outputs differ"
    for row in rows:
        assert by[row.spec, "slow"].status == cov.TIMEOUT
        dead = by[row.spec, "dies"]
        assert dead.status == cov.FAILED and "exit code 4" in dead.reason


def test_rows_of_a_checkpoint_are_not_run_again(tmp_path, monkeypatch):
    monkeypatch.setattr(cov, "run_cell", _fake_cell)
    monkeypatch.setattr(cov, "_reload_isolated", _fake_reload)
    rows = [cov.Model("m:bad", "other"), cov.Model("m:ok", "other")]
    cols = [cov.Method("a", "x")]
    done = [cov.Cell("m:bad", "a", cov.OK, 3.0, 1.0)]  # a run would make it FAILED
    cells = cov.run_matrix(rows, cols, timeout=10, workdir=tmp_path, jobs=2, done=done)
    assert [(c.model, c.status) for c in cells] == [("m:bad", cov.OK), ("m:ok", cov.OK)]


def test_checkpoint_round_trip_and_refusals(tmp_path):
    rows = _rows()
    cols = [cov.Method("m", "magnitude"), cov.Method("q", "quantize", {"bits": 4})]
    key = cov.checkpoint_key("abc", 300.0, cols)
    path = tmp_path / "cells.json"
    full = [cov.Cell(r.spec, c.column, cov.OK, 1.5, 2.0) for r in rows[:2] for c in cols]
    partial_row = [cov.Cell(rows[2].spec, "m", cov.REFUSED, reason="no layer")]
    cov.save_checkpoint(path, key, full + partial_row, "2026-11-30T10:00+00:00", 60.0)
    cells, started, wall, message = cov.load_checkpoint(path, key, rows, len(cols))
    assert cells == full and wall == 60.0 and started.startswith("2026-11-30")  # no half row
    assert "2 finished rows" in message
    # Another commit or another column config: nothing is reused, and the message says why.
    other = cov.checkpoint_key("def", 300.0, cols)
    assert cov.load_checkpoint(path, other, rows, len(cols))[0] == []
    changed = cov.checkpoint_key("abc", 300.0, [cols[0], cov.Method("q", "quantize")])
    cells, _, _, message = cov.load_checkpoint(path, changed, rows, len(cols))
    assert cells == [] and "columns" in message
    assert cov.load_checkpoint(tmp_path / "none.json", key, rows, 2)[0] == []
    # An untrusted file that is not a checkpoint is refused, not half-read.
    for bad in ("[1, 2]", "{", json.dumps({"version": 1, **key})):  # the last has no cells
        path.write_text(bad)
        with pytest.raises(SystemExit, match="checkpoint"):
            cov.load_checkpoint(path, key, rows, len(cols))
    record = {"version": 1, **key, "started": "x", "wall_s": 1.0,
              "cells": [{"model": "timm:a", "method": "m", "status": "pwned", "ratio": None,
                         "seconds": None, "reason": ""}]}
    path.write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="status"):
        cov.load_checkpoint(path, key, rows, len(cols))


# -- statprune: refusals instead of half-pruned models or hangs --------------------------------


class HardCoded(nn.Module):
    """conv(16) -> a per-channel scale held in a buffer of fixed size 16 (Torch-Pruning does not
    prune buffers, so the pruned model no longer runs) -> conv -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.scale = Scale(16)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.scale(torch.relu(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


class Scale(nn.Module):
    """Multiply channel c by a fixed factor (a buffer)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("factor", torch.linspace(0.5, 1.5, channels))

    def forward(self, x):
        return x * self.factor.view(1, -1, 1, 1)


def _statprune(model: nn.Module, config: dict) -> dict[str, dict]:
    info = ModelInfo("test", input_shape=(1, 8, 8), num_classes=10, head="fc")
    ctx = CompressionContext(info=info, seed=0, step_name="statprune")
    layers = LayerSelector().resolve(model, head="fc", default_types=["Conv2d"])
    return {r.name: r.details for r in StatPrune(config).compress(model, layers, ctx).records}


def _spread_filters(model: nn.Module) -> None:
    """Make half of conv1's filters clearly weak, so statprune removes some."""
    torch.manual_seed(0)
    with torch.no_grad():
        model.conv1.weight[8:] *= 0.01


def test_statprune_puts_back_a_group_naming_the_module_that_no_longer_runs():
    model = HardCoded()
    _spread_filters(model)
    before = copy.deepcopy(model.state_dict())
    records = _statprune(model, {"features": ["var", "l2"], "min_keep_ratio": 0.25})
    assert re.search(r"broke module scale \(Scale\).*put back", records["conv1"]["skipped"])
    after = model.state_dict()  # conv1's group as it was: same tensors, same shapes
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith(("conv1", "scale")))
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


def test_statprune_time_limit_refuses_and_leaves_the_model():
    model = HardCoded()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ns.SelectionError, match="time limit of 1e-06 s ran out while"):
        _statprune(model, {"time_limit": 1e-6})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_statprune_time_limit_is_validated():
    with pytest.raises(ValueError, match="time_limit"):
        StatPrune({"time_limit": 0})


def test_failing_module_names_the_innermost_module():
    model = HardCoded()
    assert failing_module(model, torch.zeros(1, 1, 8, 8)) is None
    model.scale.factor = torch.ones(3)
    name, exc = failing_module(model, torch.zeros(1, 1, 8, 8))
    assert name == "scale" and isinstance(exc, RuntimeError)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# -- the matrix itself, end to end (minutes) ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.timm
def test_matrix_over_two_small_models_has_no_failure(tmp_path):
    pytest.importorskip("timm")
    rows = [cov.Model("timm:resnet18", "ResNet/RegNet"), cov.Model("hf:gpt2-tiny", "transformers")]
    cells = cov.run_matrix(rows, cov.methods(), timeout=300, workdir=tmp_path)
    assert len(cells) == len(rows) * len(cov.methods())
    bad = [f"{c.model} × {c.method}: {c.text()}" for c in cells
           if c.status not in (cov.OK, cov.REFUSED)]
    assert not bad, "\n".join(bad)
    assert any(c.status == cov.OK for c in cells)


def _tiny_data() -> ns.DataSplits:
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> ns.ArrayDataset:
        return ns.ArrayDataset(torch.randn(n, 1, 8, 8, generator=gen), torch.arange(n) % 10)

    return ns.DataSplits(name="tiny8", train=split(32), val=split(32), test=split(16),
                         num_classes=10)


def test_rlprune_channel_mode_leaves_out_the_layer_that_breaks_the_model(tmp_path):
    from netshrink.plugins.rlprune import RLPrune

    model = HardCoded()
    info = ModelInfo("test", input_shape=(1, 8, 8), num_classes=10, head="fc")
    ctx = CompressionContext(data=_tiny_data(), info=info, seed=0, step_name="rlprune")
    layers = LayerSelector().resolve(model, head="fc", default_types=["Conv2d"])
    config = {"granularity": "channel", "target_sparsity": 0.5, "episodes": 2, "warmup": 1,
              "hidden": 16, "batch_size": 8, "checkpoint": str(tmp_path / "rl.st")}
    out = RLPrune(config).compress(model, layers, ctx)
    records = {r.name: r.details for r in out.records}
    assert re.search(r"broke module scale .*left unpruned", records["conv1"]["skipped"])
    assert model.conv1.out_channels == 16 and model.conv2.out_channels < 8
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


def test_rlprune_channel_mode_refuses_before_the_search_when_no_layer_can_be_pruned():
    model = HardCoded()
    before = copy.deepcopy(model.state_dict())
    step = ns.step("rlprune", granularity="channel", target_sparsity=0.5, episodes=2, warmup=1,
                   hidden=16, batch_size=8, select={"names": ["conv1"]})
    with pytest.raises(ns.SelectionError,
                       match=r"pruning any selected layer breaks the model, e.g. conv1: "
                             r"pruning its channels broke module scale") as err:
        ns.compress(model, [step], data=_tiny_data(), latency=False)
    assert "episode" not in str(err.value)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_rlprune_channel_time_limit_refuses():
    step = ns.step("rlprune", granularity="channel", target_sparsity=0.5, episodes=2, warmup=1,
                   hidden=16, batch_size=8, time_limit=1e-6)
    with pytest.raises(ns.SelectionError, match="time limit of 1e-06 s ran out while"):
        ns.compress(HardCoded(), [step], data=_tiny_data(), latency=False)


def test_normsparse_trace_time_limit_refuses_before_training():
    model = HardCoded()
    before = copy.deepcopy(model.state_dict())
    step = ns.step("normsparse", epochs=1, time_limit=1e-6)
    with pytest.raises(ns.SelectionError, match="normsparse refused before training: the time "
                       "limit of 1e-06 s ran out while Torch-Pruning traced the model"):
        ns.compress(model, [step], data=_tiny_data(), latency=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_normsparse_refuses_an_untraceable_model_before_training():
    pytest.importorskip("transformers")
    model_row = cov.Model("hf:gpt2-tiny", "transformers")
    data = cov.make_data(model_row)
    model = ns.load_model(model_row.spec, **data.model_options())
    t0 = time.perf_counter()
    with pytest.raises(ns.SelectionError, match="normsparse refused before training"):
        ns.compress(model, [ns.step("normsparse", epochs=1)], data=data, latency=False)
    assert time.perf_counter() - t0 < 30  # no epoch ran


def test_squeezenet_conv_classifier_is_the_protected_head():
    pytest.importorskip("torchvision")
    model = ns.load_model("torchvision:squeezenet1_0", num_classes=10, input_size=32)
    head = ns.model_info(model).head
    assert head == "classifier.1"  # a Conv2d: it has no Linear
    names = [n for n, _ in LayerSelector().resolve(model, head=head,
                                                   default_types=["Conv2d", "Linear"])]
    assert "classifier.1" not in names and "features.0" in names
