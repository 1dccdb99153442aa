"""One search across methods, per layer, under a budget (``netshrink.search``): per-layer
options with exact bytes, the scan (checkpoint, resume, executors), the exact solver, the
recipe that reproduces the artifact byte for byte, and the honest comparisons."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
import random
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

import netshrink as ns
from netshrink import layer_search as S
from netshrink import (
    registry,
    search_candidates,
    search_latency,
    search_run,
    search_scan,
    search_verify,
)
from netshrink.artifact import artifact_bytes
from netshrink.compressor import LayerOption
from netshrink.errors import ConfigError, RecipeError
from netshrink.executors import LocalExecutor, ProcessExecutor, get_executor
from netshrink.plugins.quantize import options as qopts
from netshrink.recipe import Recipe

pytestmark = pytest.mark.usefixtures("single_thread")

MODEL, DATA = "zoo:lenet300", "digits"
METHODS = ("magnitude", "quantize", "svd")


@pytest.fixture(scope="module")
def grids() -> Iterator[None]:
    """Small option grids (a handful per layer), and quantize's options hooked up as its
    ``layer_options`` will be (plugins/quantize/options.py) when it does not declare them yet."""
    mp = pytest.MonkeyPatch()
    quantize = registry.get_compressor("quantize")
    if not search_candidates._declares_options(quantize):
        mp.setattr(quantize, "layer_options", classmethod(qopts.layer_options), raising=False)
    mp.setattr(qopts, "SEARCH_BITS", (8, 4, 2))
    mp.setattr(registry.get_compressor("magnitude"), "search_sparsities", (0.5, 0.9))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def table(grids, tmp_path_factory) -> S.Sensitivity:
    """The scan of LeNet-300-100 on 8x8 digits (fc1, fc2; the head is protected)."""
    path = tmp_path_factory.mktemp("scan") / "scan.json"
    return S.scan(MODEL, DATA, methods=METHODS, checkpoint=path)


# -- options and candidates ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer", [nn.Linear(48, 24), nn.Conv2d(3, 8, 3)], ids=["linear", "conv"]
)
def test_declared_bytes_are_the_encoded_bytes(grids, layer):
    torch.manual_seed(0)
    checked = 0
    for name in METHODS:
        cls = registry.get_compressor(name)
        if name == "svd" and isinstance(layer, nn.Conv2d):
            assert cls.layer_options(layer, "layer") == []  # a search offers convs via tucker
            continue
        if isinstance(layer, cls.handled_types()):
            assert cls.layer_options(layer, "layer"), name
            assert S.check_layer_options(cls, layer) == []
            checked += 1
    assert checked == (3 if isinstance(layer, nn.Linear) else 2)


def test_check_layer_options_catches_a_wrong_byte_count(grids, monkeypatch):
    magnitude = registry.get_compressor("magnitude")
    honest = magnitude.layer_options.__func__

    def off_by_one(cls, module, name):
        return [cls.option(o.config, bytes=o.bytes + 1) for o in honest(cls, module, name)]

    monkeypatch.setattr(magnitude, "layer_options", classmethod(off_by_one))
    problems = S.check_layer_options(magnitude, nn.Linear(8, 4))
    assert len(problems) == 2  # the grid of two sparsities
    assert "declares" in problems[0] and "the compressor stores" in problems[0]


def test_svd_option_macs_and_rank_override():
    svd = registry.get_compressor("svd")
    layer = nn.Linear(64, 32)
    ranks = [o.config["rank"] for o in svd.layer_options(layer, "fc")]
    assert ranks == [2, 4, 8]  # 1/16, 1/8, 1/4 of 32; all smaller than dense
    assert [o.macs for o in svd.layer_options(layer, "fc")] == [r * 96 for r in ranks]
    comp = svd({"ratio": 0.5}, overrides={"fc": {"rank": 3}})
    assert comp.config_for("fc").rank == 3 and comp.config_for("other").rank is None


def test_option_is_validated_where_it_is_declared():
    magnitude = registry.get_compressor("magnitude")
    with pytest.raises(ConfigError, match=r"'magnitude' declares an invalid layer option .*"
                       r"sparsity"):
        magnitude.option({"sparsity": 1.5}, bytes=10)


def test_candidates_combine_pruning_then_quantization(table):
    labels = [c.label for c in table.candidates["fc1"]]
    assert labels[0] == "dense"
    assert "magnitude(sparsity=0.9)+quantize(bits=4)" in labels
    assert "svd(rank=4)" in labels
    assert not any("svd" in lab and "+" in lab for lab in labels)  # structural stands alone
    assert list(table.candidates) == ["fc1", "fc2"]  # the head fc3 is protected
    # Every measured size is positive and smaller than dense for a compressing option.
    dense = table.row(table.candidates["fc1"][0])["bytes"]
    assert dense == 64 * 300 * 4 + 300 * 4
    assert all(table.row(c)["bytes"] < dense for c in table.candidates["fc1"][1:])


def test_magnitude_per_layer_sparsity_and_global_scope_refused(grids):
    step = ns.Step(compressor="magnitude", config={"sparsity": 0.5},
                   overrides={"fc1": {"sparsity": 0.9}})
    result = ns.compress(MODEL, [step], DATA, latency=False)
    sparsity = {r.name: r.details["sparsity"] for r in result.records}
    assert sparsity["fc1"] == pytest.approx(0.9, abs=1e-3)
    assert sparsity["fc2"] == pytest.approx(0.5, abs=1e-3)
    bad = ns.Step(compressor="magnitude", config={"scope": "global"},
                  overrides={"fc1": {"sparsity": 0.9}})
    with pytest.raises(RecipeError, match=r"field 'overrides': per-layer sparsity needs scope"):
        ns.compress(MODEL, [bad], DATA, latency=False)


# -- the solver ----------------------------------------------------------------------------------


def _brute(costs, sizes, budget, macs=None, max_macs=None):
    best = None
    for pick in itertools.product(*[range(len(c)) for c in costs]):
        if sum(sizes[g][i] for g, i in enumerate(pick)) > budget:
            continue
        if max_macs is not None and sum(macs[g][i] for g, i in enumerate(pick)) > max_macs:
            continue
        cost = sum(costs[g][i] for g, i in enumerate(pick))
        best = cost if best is None else min(best, cost)
    return best


def test_solver_is_exact_and_fits():
    rng = random.Random(7)
    for _ in range(40):
        groups = rng.randint(1, 4)
        sizes = [[rng.randint(1, 500) for _ in range(rng.randint(1, 4))] for _ in range(groups)]
        costs = [[round(rng.uniform(-0.1, 1), 4) for _ in g] for g in sizes]
        budget = rng.randint(50, 1200)
        best = _brute(costs, sizes, budget)
        # A resolution finer than the sizes: the DP is exact.
        chosen = S.solve(costs, sizes, budget, resolution=budget)
        if best is None:
            assert chosen is None
            continue
        assert sum(sizes[g][i] for g, i in enumerate(chosen)) <= budget
        assert sum(costs[g][i] for g, i in enumerate(chosen)) == pytest.approx(best)
        # Coarse buckets round sizes up: never over the budget, never better than exact.
        coarse = S.solve(costs, sizes, budget, resolution=16)
        if coarse is not None:
            assert sum(sizes[g][i] for g, i in enumerate(coarse)) <= budget
            assert sum(costs[g][i] for g, i in enumerate(coarse)) >= best - 1e-9


def test_milp_with_a_macs_budget_is_exact():
    pytest.importorskip("scipy")
    rng = random.Random(3)
    for _ in range(15):
        sizes = [[rng.randint(1, 300) for _ in range(3)] for _ in range(3)]
        macs = [[rng.randint(1, 300) for _ in range(3)] for _ in range(3)]
        costs = [[round(rng.uniform(0, 1), 4) for _ in range(3)] for _ in range(3)]
        budget, max_macs = rng.randint(200, 700), rng.randint(200, 700)
        best = _brute(costs, sizes, budget, macs, max_macs)
        chosen = S.solve(costs, sizes, budget, macs=macs, max_macs=max_macs)
        if best is None:
            assert chosen is None
            continue
        assert sum(macs[g][i] for g, i in enumerate(chosen)) <= max_macs
        assert sum(costs[g][i] for g, i in enumerate(chosen)) == pytest.approx(best)


@pytest.mark.parametrize(
    ("budget", "expected"),
    [("40x", 2500), (4000, 4000), ("4000", 4000), ("2kB", 2000), ("1.5KiB", 1536),
     (" 10X ", 10_000)],
)
def test_parse_budget(budget, expected):
    assert S.parse_budget(budget, 100_000) == expected


@pytest.mark.parametrize("budget", ["1x", "0.5x", "-3", "fast", "3 GB", 0, True, 1.5])
def test_parse_budget_refuses(budget):
    with pytest.raises(ConfigError, match=r"search field 'budget'"):
        S.parse_budget(budget, 100_000)


# -- the search ----------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", ["10x", "16x"])
def test_search_fits_budget_and_recipe_reproduces_bytes(table, tmp_path, budget):
    found = S.search(MODEL, DATA, budget, sensitivity=table)
    assert found.artifact_bytes <= found.budget_bytes
    paths = found.save(tmp_path)
    recipe = Recipe.from_file(paths["recipe"])
    again = ns.compress(None, recipe)
    assert again.artifact == found.result.artifact
    assert paths["artifact"].read_bytes() == found.result.artifact
    summary = json.loads(paths["table"].read_text())
    assert summary["artifact_bytes"] == found.artifact_bytes
    assert {row["layer"] for row in summary["plan"]} == {"fc1", "fc2"}


def test_fine_tuned_search_reproduces_bytes_and_fits(table, tmp_path):
    found = S.search(MODEL, DATA, "12x", sensitivity=table, finetune={"epochs": 1})
    assert found.recipe.finetune is not None and found.recipe.finetune.epochs == 1
    assert found.artifact_bytes <= found.budget_bytes
    again = ns.compress(None, Recipe.from_file(found.save(tmp_path)["recipe"]))
    assert again.artifact == found.result.artifact


def test_budget_is_a_fraction_of_the_dense_artifact(table):
    found = S.search(MODEL, DATA, "10x", sensitivity=table)
    reference = ns.reference_model(MODEL, ns.datasets.load(DATA))
    dense = len(artifact_bytes(reference, ns.EncodingTable(), ns.model_info(reference), None))
    assert found.budget_bytes == dense // 10
    assert found.artifact_bytes <= dense // 10


def test_an_over_budget_plan_is_not_chosen_again(table, monkeypatch):
    """The first artifact comes out 1 byte over the budget (padded here): the next try's plan
    must be smaller by at least that byte, even when a budget shrunk by 1 byte would still
    hold the same plan (verify keeps plans under the budget; the solver rounds sizes)."""
    reference = ns.reference_model(MODEL, ns.datasets.load(DATA))
    limit = len(artifact_bytes(reference, ns.EncodingTable(), ns.model_info(reference),
                               None)) // 10
    real_compress, plans = search_run.compress, []

    def padded_once(model, recipe, data):
        result = real_compress(model, recipe, data)
        plans.append(recipe)
        if len(plans) == 1:
            pad = limit - len(result.artifact) + 1
            return dataclasses.replace(result, artifact=result.artifact + b"\0" * pad)
        return result

    monkeypatch.setattr(search_run, "compress", padded_once)
    found = S.search(MODEL, DATA, "10x", sensitivity=table)
    assert len(plans) == 2 and found.artifact_bytes <= limit
    first, second = (ns.compress(None, r) for r in plans)
    assert len(second.artifact) < len(first.artifact)


def test_too_small_budget_names_the_smallest_reachable(table):
    with pytest.raises(ConfigError, match=r"no choice of the scanned options fits .* smallest"):
        S.search(MODEL, DATA, "400x", sensitivity=table)


def test_max_drop_drops_options_that_alone_lose_more(table):
    found = S.search(MODEL, DATA, "3x", sensitivity=table, max_drop=0.0)
    for cand in found.plan.values():
        assert table.row(cand)["accuracy"] >= table.base_accuracy
    assert found.artifact_bytes <= found.budget_bytes
    with pytest.raises(ConfigError, match=r"smallest reachable with max_drop 0\.0"):
        S.search(MODEL, DATA, "10x", sensitivity=table, max_drop=0.0)


def test_a_search_that_loses_more_than_warn_drop_says_so(table, caplog):
    """At 15x LeNet-300-100 on digits loses about 3 points of validation accuracy: a note and a
    warning say so above ``warn_drop``, nothing does at or below it."""
    with caplog.at_level(logging.WARNING, logger="netshrink"):
        found = S.search(MODEL, DATA, "15x", sensitivity=table, warn_drop=1.0)
    drop = 100 * (found.reference_val_accuracy - found.val_accuracy)
    assert drop > 1.0
    note = next(n for n in found.notes if "warn_drop" in n)
    assert f"{100 * found.val_accuracy:.2f}% validation accuracy" in note
    assert f"{drop:.2f} pp lost, over warn_drop 1.0 pp" in note
    assert "warn_drop 1.0 pp" in caplog.text
    for quiet in (drop, None):
        found = S.search(MODEL, DATA, "15x", sensitivity=table, warn_drop=quiet)
        assert not any("warn_drop" in n for n in found.notes)
    with pytest.raises(ConfigError, match="search field 'warn_drop'"):
        S.search(MODEL, DATA, "15x", sensitivity=table, warn_drop=-1)


def _single_method(name: str, config: dict[str, Any]) -> tuple[int, float]:
    result = ns.compress(MODEL, [ns.Step(compressor=name, config=config)], DATA, latency=False)
    splits = ns.datasets.load(DATA)
    accuracy = search_scan._loss_accuracy(result.model, *splits.batch("val", 10_000))[1]
    return len(result.artifact), accuracy


@pytest.mark.parametrize(("name", "config"), [("quantize", {"bits": 4}),
                                              ("magnitude", {"sparsity": 0.9})])
def test_search_at_least_as_accurate_as_one_method_of_the_same_size(table, name, config):
    size, accuracy = _single_method(name, config)
    found = S.search(MODEL, DATA, size, sensitivity=table)
    assert found.artifact_bytes <= size
    assert found.val_accuracy >= accuracy, (found.plan_rows(), accuracy)


# -- measuring the plan whole (verify) -----------------------------------------------------------


def _worst_looks_free(table: S.Sensitivity) -> tuple[S.Sensitivity, S.Candidate]:
    """A copy of ``table`` whose worst candidate (highest loss alone) looks better than free."""
    worst = max((c for cands in table.candidates.values() for c in cands),
                key=lambda c: table.row(c)["loss"])
    measured = {key: dict(row) for key, row in table.measured.items()}
    measured[worst.key]["loss"] = table.base_loss - 0.5
    measured[worst.key]["kl"] = -0.5  # no real plan scores below 0: this one is faked
    return dataclasses.replace(table, measured=measured), worst


def test_verify_replaces_a_plan_that_loses_more_than_predicted(table, tmp_path, caplog):
    fake, worst = _worst_looks_free(table)
    trusted = S.search(MODEL, DATA, "10x", sensitivity=fake, verify=False)
    assert trusted.plan[worst.layer] == worst and trusted.measured_plans == []
    with caplog.at_level(logging.INFO, logger="netshrink"):
        found = S.search(MODEL, DATA, "10x", sensitivity=fake)
    solver, chosen = found.measured_plans[0], [m for m in found.measured_plans if m.chosen]
    assert solver.label == "solver" and solver.plan[worst.layer] == worst and not solver.chosen
    assert solver.kl > solver.predicted_kl
    assert len(chosen) == 1 and chosen[0].plan == found.plan
    assert found.plan[worst.layer] != worst
    assert chosen[0].kl < solver.kl
    assert found.val_accuracy > trusted.val_accuracy
    expected = (f"the solver's plan diverged by {solver.kl:.4g} (KL divergence from the "
                f"reference's predictions, first {fake.n_val} samples), more than the "
                f"predicted {solver.predicted_kl:.4g}; kept {chosen[0].label}, which diverged "
                f"by {chosen[0].kl:.4g}")
    assert expected in found.notes
    for m in found.measured_plans:  # one progress line per plan measured
        assert f"search: measured plan {m.label}: loss {m.delta_loss:+.4f}" in caplog.text
    # The recipe reproduces the kept plan's artifact byte for byte; the JSON lists the plans.
    paths = found.save(tmp_path)
    assert ns.compress(None, Recipe.from_file(paths["recipe"])).artifact == found.result.artifact
    summary = json.loads(paths["table"].read_text())
    rows = summary["measured_plans"]
    assert [r["label"] for r in rows] == [m.label for m in found.measured_plans]
    kept = [r for r in rows if r["chosen"]]
    assert len(kept) == 1 and kept[0]["plan"] == {r["layer"]: r["choice"] for r in summary["plan"]}
    assert set(rows[0]) == {"label", "plan", "layer_bytes", "predicted_delta_loss",
                            "measured_delta_loss", "predicted_kl", "measured_kl",
                            "measured_accuracy", "chosen"}
    assert summary["objective"] == "kl"


@pytest.mark.parametrize("budget", ["6x", "10x", "16x"])
def test_kept_plan_measures_best_and_alternatives_are_uniform_or_resolved(table, budget):
    found = S.search(MODEL, DATA, budget, sensitivity=table)
    (chosen,) = [m for m in found.measured_plans if m.chosen]
    assert chosen.plan == found.plan
    assert all(chosen.kl <= m.kl for m in found.measured_plans)
    assert len(found.measured_plans) <= 1 + 16
    for m in found.measured_plans:
        assert m.layer_bytes == sum(table.row(c)["bytes"] for c in m.plan.values())
        if m.label.startswith("uniform "):
            option = m.label.removeprefix("uniform ")
            assert {c.label for c in m.plan.values()} <= {option, "dense"}
            assert any(c.label == option for c in m.plan.values())
        else:
            assert re.fullmatch(r"solver|re-solve [1-3]", m.label), m.label


class _StubMeter:
    """Stands in for the plan meter: each label measures as ``results`` says."""

    def __init__(self, table: S.Sensitivity, results: dict[str, tuple[float, float]]) -> None:
        self.table, self.results, self.done, self.extra = table, results, {}, 0

    def measure(self, label: str, plan: dict[str, S.Candidate]) -> S.MeasuredPlan:
        self.done[label] = True
        delta, accuracy = self.results.get(label, (9.0, 0.0))
        # the stub's loss change stands for both measures; the KL side is 1/10 of it
        return S.MeasuredPlan(label, plan, 0, 0.0, delta, accuracy, 0.0, delta / 10)


def _verify_stub(table, results, max_drop=None, max_alternatives=16, objective="loss"):
    plan = {layer: cands[1] for layer, cands in table.candidates.items()}
    return search_verify._verify_plan(
        _StubMeter(table, results), table.candidates, plan, lambda penalty: None,
        layer_budget=10**9, max_macs=None, max_drop=max_drop, max_alternatives=max_alternatives,
        objective=objective,
    )


def test_max_drop_prefers_measured_plans_within_it(table):
    base = table.base_accuracy
    results = {"solver": (0.1, base - 0.05), "uniform quantize(bits=8)": (0.2, base - 0.001)}
    plan, measured, notes = _verify_stub(table, results)
    assert measured[0].chosen and notes == []  # the lowest loss; no max_drop
    plan, measured, notes = _verify_stub(table, results, max_drop=1.0)
    (chosen,) = [m for m in measured if m.chosen]
    assert chosen.label == "uniform quantize(bits=8)" and plan == chosen.plan
    assert any("kept uniform quantize(bits=8), which lost 0.2" in n for n in notes)
    plan, measured, notes = _verify_stub(table, results, max_drop=0.01)
    assert measured[0].chosen  # none within: the lowest loss, and a note says so
    assert any("no measured plan stays within max_drop 0.01 pp" in n for n in notes)
    _, measured, _ = _verify_stub(table, results, max_alternatives=2)
    assert len(measured) == 3
    _, _, notes = _verify_stub(table, results, max_drop=1.0, objective="kl")
    assert any("kept uniform quantize(bits=8), which diverged by 0.02" in n for n in notes)
    with pytest.raises(ConfigError, match=r"'max_alternatives': must be at least 0, got -1"):
        S.search(MODEL, DATA, "10x", sensitivity=table, max_alternatives=-1)


@pytest.mark.parametrize("model", [MODEL, "zoo:lenet5"])
def test_reusing_the_references_activations_changes_no_figure(grids, model, monkeypatch):
    built = []

    class Spy(search_scan.PrefixCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(search_scan, "PrefixCache", Spy)
    on = S.scan(model, DATA, methods=METHODS, checkpoint=False)
    assert len(built) == 1 and built[0].outputs and built[0].recorded <= 1024 << 20
    assert search_scan._PREFIX == {}  # freed when the scan ends
    off = S.scan(model, DATA, methods=METHODS, checkpoint=False, activation_cache_mb=0)
    assert on.measured == off.measured and on.base_loss == off.base_loss


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_activation_cache_mb_is_checked(grids, value):
    with pytest.raises(ConfigError, match=r"'activation_cache_mb': must be an integer of at "
                       r"least 0"):
        S.scan(MODEL, DATA, methods=METHODS, checkpoint=False, activation_cache_mb=value)


def test_scan_measures_kl_from_the_reference(table):
    for cands in table.candidates.values():
        dense, *options = cands
        assert table.row(dense)["kl"] == 0.0 and table.cost(dense, "kl") == 0.0
        assert table.cost(dense, "loss") == pytest.approx(0.0, abs=1e-6)
        assert all(table.row(c)["kl"] > 0 for c in options)  # every option moves predictions
    # The KL is what it says: recomputed by hand for one candidate of the scan.
    cand = next(iter(table.candidates.values()))[-1]
    data = ns.datasets.load(DATA)
    reference = search_scan._reference(MODEL, data, 0)  # as the scan builds it
    x, _ = data.batch("val", table.n_val)
    torch.manual_seed(0)
    model = search_candidates.apply_candidate(
        copy.deepcopy(reference), cand, ns.EncodingTable(), data=data,
        info=ns.model_info(reference), seed=0)
    with torch.no_grad():
        ref = torch.log_softmax(reference.eval()(x), 1)
        got = torch.log_softmax(model.eval()(x), 1)
    expected = float(torch.nn.functional.kl_div(got, ref, log_target=True,
                                                reduction="batchmean"))
    assert table.row(cand)["kl"] == pytest.approx(expected, rel=1e-4, abs=1e-8)


def test_objective_decides_what_the_solver_trusts(table):
    """An option that lowers the labels' loss but moves the predictions far is taken under
    ``loss`` and left under ``kl``."""
    layer, cands = next(iter(table.candidates.items()))
    tempting = cands[-1]
    measured = {key: dict(row) for key, row in table.measured.items()}
    measured[tempting.key]["loss"] = table.base_loss - 1.0
    measured[tempting.key]["kl"] = 5.0
    fake = dataclasses.replace(table, measured=measured)
    by_loss = S.search(MODEL, DATA, "6x", sensitivity=fake, verify=False, objective="loss")
    by_kl = S.search(MODEL, DATA, "6x", sensitivity=fake, verify=False)
    assert by_loss.plan[layer] == tempting and by_loss.objective == "loss"
    assert by_kl.plan[layer] != tempting and by_kl.objective == "kl"
    with pytest.raises(ConfigError, match=r"search field 'objective': must be one of kl, loss"):
        S.search(MODEL, DATA, "6x", sensitivity=table, objective="accuracy")


# -- checkpoint, resume, executors ----------------------------------------------------------------


class _Counting(LocalExecutor):
    """Counts the items it runs; raises (an interruption) once ``fail_after`` calls ran."""

    name = "counting"

    def __init__(self, fail_after: int | None = None) -> None:
        self.items = 0
        self.calls = 0
        self.fail_after = fail_after

    def map(self, fn: Callable, items) -> list:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        items = list(items)
        self.items += len(items)
        return super().map(fn, items)


def test_interrupted_scan_resumes_from_the_checkpoint(grids, tmp_path, caplog):
    path = tmp_path / "scan.json"
    kwargs = {"methods": ("magnitude",), "checkpoint": path, "chunk": 2}
    with pytest.raises(KeyboardInterrupt):
        S.scan(MODEL, DATA, executor=_Counting(fail_after=2), **kwargs)
    assert len(json.loads(path.read_text())["entries"]) == 4
    resumed = _Counting()
    with caplog.at_level(logging.INFO, logger="netshrink"):
        table = S.scan(MODEL, DATA, executor=resumed, **kwargs)
    assert resumed.items == 6 - 4  # dense + 2 sparsities per layer, 2 layers
    assert "resuming the scan" in caplog.text and "scanned 6/6 candidates" in caplog.text
    fresh = S.scan(MODEL, DATA, methods=("magnitude",), checkpoint=False)
    assert table.measured == fresh.measured


def test_damaged_or_foreign_checkpoint_is_ignored(grids, tmp_path, caplog):
    path = tmp_path / "scan.json"
    S.scan(MODEL, DATA, methods=("magnitude",), checkpoint=path)
    body = json.loads(path.read_text())
    first = next(iter(body["entries"]))
    body["entries"][first]["loss"] = 0.0  # a tampered value: the checksum no longer matches
    path.write_text(json.dumps(body))
    counting = _Counting()
    with caplog.at_level(logging.WARNING, logger="netshrink"):
        S.scan(MODEL, DATA, methods=("magnitude",), checkpoint=path, executor=counting)
    assert counting.items == 6 and "ignoring scan checkpoint" in caplog.text
    path.write_text("{not json")
    counting = _Counting()
    S.scan(MODEL, DATA, methods=("magnitude",), checkpoint=path, executor=counting)
    assert counting.items == 6
    # A scan with other settings does not reuse it.
    counting = _Counting()
    S.scan(MODEL, DATA, methods=("magnitude",), checkpoint=path, executor=counting, seed=1)
    assert counting.items == 6


@pytest.mark.slow
def test_process_pool_scan_matches_local(grids):
    kwargs = {"methods": ("magnitude",), "checkpoint": False, "select": {"names": ["fc2"]}}
    local = S.scan(MODEL, DATA, **kwargs)
    pooled = S.scan(MODEL, DATA, executor=ProcessExecutor(2), **kwargs)
    assert pooled.measured == local.measured


@pytest.mark.slow
def test_process_pool_gives_the_same_plan(table, tmp_path):
    pooled = S.scan(MODEL, DATA, methods=METHODS, executor="process", workers=2,
                    checkpoint=False)
    assert pooled.measured.keys() == table.measured.keys()
    for key, row in table.measured.items():
        assert pooled.measured[key]["bytes"] == row["bytes"]
        assert pooled.measured[key]["loss"] == pytest.approx(row["loss"], abs=2e-6)
    local = S.search(MODEL, DATA, "10x", sensitivity=table)
    remote = S.search(MODEL, DATA, "10x", sensitivity=pooled)
    assert {n: c.label for n, c in local.plan.items()} == {
        n: c.label for n, c in remote.plan.items()
    }
    assert local.result.artifact == remote.result.artifact


def test_executor_names():
    assert isinstance(get_executor(None), LocalExecutor)
    assert isinstance(get_executor("process", 2), ProcessExecutor)
    assert get_executor("process", 2).map(abs, []) == []
    with pytest.raises(ConfigError, match=r"unknown executor 'thread'; known: local, process"):
        get_executor("thread")
    with pytest.raises(ConfigError, match=r"workers must be at least 1, got 0"):
        get_executor("process", 0)
    with pytest.raises(ConfigError, match=r"executor must be a name"):
        get_executor(42)  # type: ignore[arg-type]


# -- third-party compressors and bad input ------------------------------------------------------


class Half(ns.Compressor):
    """Store weights as float16 (a third-party compressor that joins the search)."""

    name = "searchtest-half"
    capabilities = ns.Capabilities(handles=("Linear",))

    @classmethod
    def layer_options(cls, module, name):
        half = ns.Dense(module.weight.detach(), storage_dtype=torch.float16)
        bias = module.bias.numel() * 4 if module.bias is not None else 0
        return [cls.option({}, bytes=half.payload_bytes + bias)]

    def compress(self, model, layers, ctx):
        for lname, module in layers:
            weight = module.weight.detach()
            ctx.encode(model, f"{lname}.weight", ns.Dense(weight, storage_dtype=torch.float16))
        return ns.StepResult(model, [ns.LayerRecord(n) for n, _ in layers])


class _HalfPlugin:
    @ns.hookimpl
    def register_compressors(self, register):
        register(Half)


@pytest.fixture
def half() -> Iterator[type[Half]]:
    plugin = _HalfPlugin()
    registry.register_plugin(plugin, name="searchtest")
    try:
        yield Half
    finally:
        registry.unregister_plugin(plugin)


def test_third_party_compressor_joins_the_search(grids, half, tmp_path):
    table = S.scan(MODEL, DATA, methods=("searchtest-half", "quantize"), checkpoint=False)
    labels = [c.label for c in table.candidates["fc1"]]
    assert "searchtest-half()" in labels
    declared = Half.layer_options(ns.reference_model(MODEL, ns.datasets.load(DATA)).fc1, "fc1")
    chosen = next(c for c in table.candidates["fc1"] if c.label == "searchtest-half()")
    assert table.row(chosen)["bytes"] == declared[0].bytes
    # Half precision loses almost nothing: at a budget it fits, the search picks it somewhere.
    found = S.search(MODEL, DATA, "2.5x", sensitivity=table)
    assert any("searchtest-half" in c.label for c in found.plan.values())
    again = ns.compress(None, Recipe.from_file(found.save(tmp_path)["recipe"]))
    assert again.artifact == found.result.artifact


def test_tucker_ranks_join_the_search_and_the_recipe_reproduces_them(grids, tmp_path):
    model, data = "zoo:lenet5", ns.datasets.load(DATA)
    reference = ns.reference_model(model, data)
    tucker = registry.get_compressor("tucker")
    assert [o.config for o in tucker.layer_options(reference.conv2, "conv2")] == [
        {"rank": 0.25}, {"rank": 0.5}]
    assert S.check_layer_options(tucker, reference.conv2) == []
    assert tucker.layer_options(reference.fc1, "fc1") == []  # linear layers are svd's
    table = S.scan(model, DATA, methods=("tucker",), checkpoint=False)
    assert "tucker(rank=0.25)" in [c.label for c in table.candidates["conv2"]]
    dense = len(artifact_bytes(reference, ns.EncodingTable(), ns.model_info(reference), None))
    # 5,000 bytes less than dense: only factorising conv2 (9,664 dense bytes) gets there
    found = S.search(model, DATA, dense - 5000, sensitivity=table)
    assert found.plan["conv2"].label.startswith("tucker(rank=")
    assert found.artifact_bytes <= dense - 5000
    again = ns.compress(None, Recipe.from_file(found.save(tmp_path)["recipe"]))
    assert again.artifact == found.result.artifact


def test_bad_methods_are_refused(grids):
    with pytest.raises(ConfigError, match=r"field 'methods': .*nope"):
        S.scan(MODEL, DATA, methods=("nope",), checkpoint=False)
    with pytest.raises(ConfigError, match=r"'sigmaprune' declares no per-layer options"):
        S.scan(MODEL, DATA, methods=("sigmaprune",), checkpoint=False)
    with pytest.raises(ConfigError, match=r"'val_limit': must be at least 1, got 0"):
        S.scan(MODEL, DATA, val_limit=0, checkpoint=False)


def test_a_wrong_option_from_a_plugin_is_named(grids, half, monkeypatch):
    monkeypatch.setattr(
        Half, "layer_options",
        classmethod(lambda cls, m, n: [LayerOption("quantize", {"bits": 4}, bytes=1)]),
    )
    with pytest.raises(ns.NetshrinkError, match=r"Half.layer_options returned .* 'fc1'"):
        S.scan(MODEL, DATA, methods=("searchtest-half",), checkpoint=False)


# -- Pareto front ----------------------------------------------------------------------------------


def test_pareto_front_table_and_plot(table, tmp_path):
    points = S.pareto(MODEL, DATA, ["8x", "16x"], sensitivity=table)
    assert [p.budget for p in points] == ["16x", "8x"]  # sorted by size
    assert all(p.artifact_bytes <= p.budget_bytes for p in points)
    text = S.pareto_table(points)
    assert text.splitlines()[0].startswith("| budget | budget bytes | artifact bytes")
    assert "| 16x |" in text and "| 8x |" in text
    pytest.importorskip("matplotlib")
    png = S.plot_pareto(points, tmp_path / "front.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_writes_the_search_files(grids, tmp_path):
    lines = S.run_command(
        MODEL, DATA, "8x", out_dir=tmp_path, methods=("magnitude", "quantize"),
        pareto_budgets=("6x", "8x"),
    )
    assert lines[0].startswith("fc1: ") and lines[1].startswith("fc2: ")
    assert any(line.startswith("artifact ") and "(budget " in line for line in lines)
    recipe = Recipe.from_file(tmp_path / "lenet300.search.yaml")
    artifact = (tmp_path / "lenet300.nsk").read_bytes()
    assert ns.compress(None, recipe).artifact == artifact
    assert (tmp_path / "lenet300.pareto.md").read_text().count("\n") == 4
    assert (tmp_path / "lenet300.pareto.png").exists() or any("no Pareto plot" in x for x in lines)


def test_scan_prints_progress_lines_unless_progress_is_off(grids, monkeypatch, capsys):
    kwargs = {"methods": ("magnitude",), "checkpoint": False, "select": {"names": ["fc2"]}}
    monkeypatch.setenv("NETSHRINK_PROGRESS", "1")
    S.scan(MODEL, DATA, chunk=2, **kwargs)
    err = capsys.readouterr().err
    assert "search: scanned 2/3 candidates (local executor" in err
    assert "search: scanned 3/3 candidates" in err
    monkeypatch.setenv("NETSHRINK_PROGRESS", "0")
    S.scan(MODEL, DATA, **kwargs)
    assert "search: scanned" not in capsys.readouterr().err


def test_a_budget_the_dense_model_fits_is_named(table):
    with pytest.raises(ConfigError, match=r"uncompressed model already fits it"):
        S.plan_recipe({"fc1": S.Candidate("fc1"), "fc2": S.Candidate("fc2")})


def test_scan_checkpoint_key_covers_models_with_batchnorm():
    """A model with 0-dim buffers (BatchNorm's num_batches_tracked) gets a state digest, and
    the digest changes with any tensor, buffers included."""
    import torch
    from torch import nn

    from netshrink.search_checkpoint import _state_digest

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    before = _state_digest(model)
    model[1].num_batches_tracked += 1
    after = _state_digest(model)
    assert before != after
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] += 1.0
    assert _state_digest(model) != after


# -- a measured-latency budget (issue 17) ----------------------------------------------------------

#: The fake timer's unit: a plain Linear costs one, a packed one (kernel or decoded on the fly)
#: ten, whatever the machine's load.
_TICK = 1e-4


def _fake_time(module: nn.Module, args: tuple) -> float:
    """A deterministic stand-in for ``search_latency._time_module``: 1 tick per plain Linear,
    10 per Linear the packed runtime replaced (int8 / int4 / CSR kernel) or decodes on the
    fly."""
    from torch.nn.utils import parametrize

    from netshrink.runtime import CsrLinear, Int4WeightLinear, Int8WeightLinear

    ticks = 0
    for m in module.modules():
        if isinstance(m, (Int8WeightLinear, Int4WeightLinear, CsrLinear)) or (
            parametrize.is_parametrized(m)
        ):
            ticks += 10
        elif type(m) is nn.Linear:
            ticks += 1
    return ticks * _TICK


def _brute_rows(costs, rows, limits):
    """The least summed cost of one choice per group whose summed ``rows`` (a tuple per
    choice) stay within ``limits`` (None: no limit), by trying every choice."""
    best = None
    for pick in itertools.product(*[range(len(c)) for c in costs]):
        sums = [sum(rows[g][i][k] for g, i in enumerate(pick)) for k in range(len(limits))]
        if any(lim is not None and v > lim for v, lim in zip(sums, limits, strict=True)):
            continue
        cost = sum(costs[g][i] for g, i in enumerate(pick))
        best = cost if best is None else min(best, cost)
    return best


@pytest.fixture(scope="module")
def lat_table(grids) -> S.Sensitivity:
    """The scan of ``table`` with latency timed by the fake timer."""
    mp = pytest.MonkeyPatch()
    mp.setattr(search_latency, "_time_module", _fake_time)
    try:
        return S.scan(MODEL, DATA, methods=METHODS, checkpoint=False, latency=True)
    finally:
        mp.undo()


def _is_whole(module: nn.Module) -> bool:
    return hasattr(module, "fc3")


def test_scan_times_each_candidate_as_the_packed_runtime_runs_it(grids, monkeypatch):
    from torch.nn.utils import parametrize

    from netshrink.runtime import CsrLinear, Int8WeightLinear

    seen: list[tuple[str, tuple[int, ...]]] = []

    def spy(module, args):
        if not _is_whole(module):
            kind = ("parametrized" if parametrize.is_parametrized(module)
                    else type(module).__name__)
            seen.append((kind, tuple(args[0].shape)))
        return _fake_time(module, args)

    monkeypatch.setattr(search_latency, "_time_module", spy)
    kwargs = {"methods": ("magnitude",), "select": {"names": ["fc2"]}, "checkpoint": False}
    timed = S.scan(MODEL, DATA, latency=True, latency_batch=3, **kwargs)
    # dense; 50% sparse decodes on the fly; 10% dense runs as CSR; on fc2's real input shape
    assert seen == [("Linear", (3, 300)), ("parametrized", (3, 300)), ("CsrLinear", (3, 300))]
    labels = [c.label for c in timed.candidates["fc2"]]
    assert [r["latency"] for r in timed.rows()] == [_TICK, 10 * _TICK, 10 * _TICK]
    assert timed.model_latency == 3 * _TICK and timed.latency_batch == 3
    # A scan without a latency budget times nothing and has no latency column.
    seen.clear()
    plain = S.scan(MODEL, DATA, **kwargs)
    assert seen == [] and not plain.has_latency and plain.model_latency is None
    assert all("latency" not in r for r in plain.rows())
    assert {c.label for c in plain.candidates["fc2"]} == set(labels)
    # The packed module computes what the compressed layer computes, through the kernel.
    torch.manual_seed(0)
    for name, config, kernel in (("magnitude", {"sparsity": 0.9}, CsrLinear),
                                 ("quantize", {"bits": 8}, Int8WeightLinear)):
        layer = nn.Linear(300, 100)
        option = next(o for o in registry.get_compressor(name).layer_options(layer, "layer")
                      if o.config == config)
        encodings = ns.EncodingTable()
        held = S.apply_candidate(
            search_candidates._Holder(layer), S.Candidate("layer", (option,)), encodings
        )
        packed = S.packed_layer(
            held.layer, search_candidates._layer_encodings(held, encodings, "layer")
        )
        assert isinstance(packed, kernel) and type(held.layer) is nn.Linear
        x = torch.randn(4, 300)
        with torch.no_grad():
            torch.testing.assert_close(packed(x), held.layer(x), rtol=1e-4, atol=1e-4)


def test_latency_rows_and_checkpoint_key(grids, tmp_path, monkeypatch):
    monkeypatch.setattr(search_latency, "_time_module", _fake_time)
    path = tmp_path / "scan.json"
    kwargs = {"methods": ("magnitude",), "checkpoint": path}
    S.scan(MODEL, DATA, **kwargs)  # untimed: its checkpoint is not for a timed scan
    counting = _Counting()
    timed = S.scan(MODEL, DATA, executor=counting, latency=True, **kwargs)
    assert counting.items == 6 and timed.has_latency
    counting = _Counting()
    assert S.scan(MODEL, DATA, executor=counting, latency=True, **kwargs).measured == (
        timed.measured
    )
    assert counting.items == 0  # resumed whole: same key
    counting = _Counting()
    S.scan(MODEL, DATA, executor=counting, latency=True, latency_batch=2, **kwargs)
    assert counting.items == 6  # another batch, another key
    # An entry without a latency (written by an older scan) is measured again.
    S.scan(MODEL, DATA, latency=True, **kwargs)
    body = json.loads(path.read_text())
    first = next(iter(body["entries"]))
    del body["entries"][first]["latency"]
    S.write_checkpoint(path, body["key"], body["entries"])
    counting = _Counting()
    again = S.scan(MODEL, DATA, executor=counting, latency=True, **kwargs)
    assert counting.items == 1 and again.measured == timed.measured


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0.002, 0.002), (1, 1.0), ("0.002", 0.002), ("2ms", 0.002), (" 150 us", 150e-6),
     ("0.5s", 0.5), ("80%", 0.8 * 0.01), ("250%", 2.5 * 0.01), ("1e-3", 1e-3)],
)
def test_parse_latency(value, expected):
    assert S.parse_latency(value, 0.01) == pytest.approx(expected)


@pytest.mark.parametrize("value", ["fast", "-2ms", "0%", "0", 0, -1.0, True, "2 min", [1]])
def test_parse_latency_refuses(value):
    with pytest.raises(ConfigError, match=r"search field 'max_latency'"):
        S.parse_latency(value, 0.01)


def test_milp_with_a_latency_budget_is_exact():
    pytest.importorskip("scipy")
    rng = random.Random(11)
    for round_ in range(20):
        sizes = [[rng.randint(1, 300) for _ in range(3)] for _ in range(3)]
        macs = [[rng.randint(1, 300) for _ in range(3)] for _ in range(3)]
        seconds = [[rng.uniform(1e-6, 1e-4) for _ in range(3)] for _ in range(3)]
        costs = [[round(rng.uniform(0, 1), 4) for _ in range(3)] for _ in range(3)]
        budget, max_latency = rng.randint(200, 700), rng.uniform(5e-5, 2e-4)
        max_macs = rng.randint(200, 700) if round_ % 2 else None
        best = _brute_rows(costs, [list(zip(*g, strict=True))
                                   for g in zip(sizes, macs, seconds, strict=True)],
                           (budget, max_macs, max_latency))
        chosen = S.solve(costs, sizes, budget, macs=macs, max_macs=max_macs, latency=seconds,
                         max_latency=max_latency)
        if best is None:
            assert chosen is None
            continue
        assert sum(seconds[g][i] for g, i in enumerate(chosen)) <= max_latency * (1 + 1e-6)
        assert sum(sizes[g][i] for g, i in enumerate(chosen)) <= budget
        assert sum(costs[g][i] for g, i in enumerate(chosen)) == pytest.approx(best)
    assert S.solve([[0.0]], [[1]], 10, latency=[[1e-3]], max_latency=-1e-9) is None


def test_latency_budget_forbids_the_slow_options(lat_table, monkeypatch, tmp_path):
    monkeypatch.setattr(search_latency, "_time_module", _fake_time)
    fixed = lat_table.model_latency - 2 * _TICK  # fc3: the head is not searched
    assert fixed == pytest.approx(_TICK)
    free = S.search(MODEL, DATA, "8x", sensitivity=lat_table, verify=False)
    assert free.latency is None
    assert max(lat_table.row(c)["latency"] for c in free.plan.values()) == 10 * _TICK
    # 180% of the dense model (3 ticks) leaves 4.4 ticks for fc1 and fc2: no packed option fits.
    fast = S.search(MODEL, DATA, "8x", sensitivity=lat_table, verify=False,
                    max_latency="180%", warn_drop=None)  # notes: only latency ones expected
    chosen = [lat_table.row(c)["latency"] for c in fast.plan.values()]
    assert all(t <= 2 * _TICK for t in chosen), fast.plan_rows()
    assert fast.artifact_bytes <= fast.budget_bytes
    # The solver's pick is the best choice under both budgets (brute force over the scan).
    cands = [lat_table.candidates[n] for n in ("fc1", "fc2")]
    rest = sum(lat_table.row(c[0])["bytes"] for c in cands)
    reference = ns.reference_model(MODEL, ns.datasets.load(DATA))
    dense = len(artifact_bytes(reference, ns.EncodingTable(), ns.model_info(reference), None))
    layer_budget = fast.budget_bytes - (dense - rest)
    best = _brute_rows(
        [[search_run._cost(lat_table, c, rest) for c in g] for g in cands],
        [[(lat_table.row(c)["bytes"], 0, lat_table.row(c)["latency"]) for c in g] for g in cands],
        (layer_budget, None, 1.8 * 3 * _TICK - fixed),
    )
    chosen_cost = sum(search_run._cost(lat_table, c, rest) for c in fast.plan.values())
    assert chosen_cost == pytest.approx(best)
    figures = fast.latency
    assert figures is not None and figures.budget == pytest.approx(1.8 * 3 * _TICK)
    assert figures.predicted == pytest.approx(fixed + sum(chosen))
    assert figures.measured == pytest.approx(figures.predicted)  # the fake adds up exactly
    assert figures.tries == 1 and fast.notes == []
    summary = json.loads(fast.save(tmp_path)["table"].read_text())
    assert summary["latency"]["measured_s"] == pytest.approx(figures.measured)
    assert summary["latency"]["budget_s"] == pytest.approx(figures.budget)
    assert all("latency" in row for row in summary["plan"] + summary["sensitivity"])
    # Below the fastest within the bytes (svd on both: 1 + 2 + 2 ticks) is refused, named.
    with pytest.raises(ConfigError, match=r"'max_latency': .*\(about 0\.500 ms is the fastest"):
        S.search(MODEL, DATA, "8x", sensitivity=lat_table, verify=False, max_latency="0.3ms")


def test_plans_measured_whole_keep_to_the_latency_budget(lat_table, monkeypatch):
    monkeypatch.setattr(search_latency, "_time_module", _fake_time)
    # Uniform plans over the layers' latency budget are not measured: only svd's fit 4 ticks.
    uniform_plans = search_verify._uniform_plans
    uniform = uniform_plans(lat_table, lat_table.candidates, 10**9, None, 4 * _TICK)
    assert uniform and all(label.startswith("svd(") for label, _ in uniform)
    assert len(uniform_plans(lat_table, lat_table.candidates, 10**9, None)) > len(uniform)
    # At 1.3x a uniform plan (one layer dense) fits the bytes; at 180%, only svd's the latency.
    found = S.search(MODEL, DATA, "1.3x", sensitivity=lat_table, max_latency="180%")
    labels = [m.label for m in found.measured_plans]
    assert any(label.startswith("uniform svd(") for label in labels), labels
    assert not any(label.startswith("uniform quantize(") for label in labels), labels
    for m in found.measured_plans:  # the solver's, its re-solves and the uniform plans
        assert sum(lat_table.row(c)["latency"] for c in m.plan.values()) <= 4.4 * _TICK


def test_a_slow_packed_model_shrinks_the_latency_budget_then_notes(lat_table, monkeypatch,
                                                                    caplog):
    extra = {"calls": 0, "always": False}

    def slower_whole(module, args):
        """The packed model whole measures 10 ticks more than its layers add up to (the first
        time, or always)."""
        if _is_whole(module):
            extra["calls"] += 1
            if extra["calls"] == 1 or extra["always"]:
                return _fake_time(module, args) + 10 * _TICK
        return _fake_time(module, args)

    monkeypatch.setattr(search_latency, "_time_module", slower_whole)
    kwargs = {"sensitivity": lat_table, "verify": False, "max_latency": 13.5 * _TICK,
              "warn_drop": None}  # the notes looked at here are the latency ones
    with caplog.at_level(logging.INFO, logger="netshrink"):
        found = S.search(MODEL, DATA, "8x", tries=3, **kwargs)
    # Try 1: one packed option fits 13.5 ticks and measured over; the shrunk budget does not.
    assert found.latency is not None and found.latency.tries == 2, caplog.text
    assert "search: try 1: packed model" in caplog.text
    assert all(lat_table.row(c)["latency"] <= 2 * _TICK for c in found.plan.values())
    assert found.latency.measured <= found.latency.budget and found.notes == []
    extra.update(calls=0, always=True)
    found = S.search(MODEL, DATA, "8x", tries=3, **kwargs)
    assert found.artifact_bytes <= found.budget_bytes
    assert found.latency.measured > found.latency.budget
    assert any("over max_latency 1.350 ms" in n and "noisy" in n for n in found.notes)
    assert found.latency.tries <= 3


def test_latency_budget_needs_a_timed_scan(table, lat_table):
    with pytest.raises(ConfigError, match=r"'max_latency': the sensitivity scan has no latency"):
        S.search(MODEL, DATA, "8x", sensitivity=table, max_latency="80%")
    with pytest.raises(ConfigError, match=r"'latency_batch': 64 differs .* timed \(1\)"):
        S.search(MODEL, DATA, "8x", sensitivity=lat_table, max_latency="80%", latency_batch=64)
    with pytest.raises(ConfigError, match=r"'latency_batch': must be an integer .* got 0"):
        S.scan(MODEL, DATA, latency=True, latency_batch=0, checkpoint=False)


def test_cli_max_latency(monkeypatch):
    from click.testing import CliRunner

    from netshrink.cli import cli

    got: dict[str, Any] = {}

    def fake_run(model, data, budget, **kwargs):
        got.update(kwargs)
        return ["ok"]

    monkeypatch.setattr(S, "run_command", fake_run)
    for flag, seconds in (("80%", 0.8 * 0.005), ("0.002", 0.002), ("2ms", 0.002)):
        out = CliRunner().invoke(cli, ["search", MODEL, "--data", DATA, "--budget", "8x",
                                       "--max-latency", flag])
        assert out.exit_code == 0, out.output
        assert S.parse_latency(got["max_latency"], 0.005) == pytest.approx(seconds)
    CliRunner().invoke(cli, ["search", MODEL, "--data", DATA, "--budget", "8x"])
    assert got["max_latency"] is None
    monkeypatch.undo()
    out = CliRunner().invoke(cli, ["search", MODEL, "--data", DATA, "--budget", "8x",
                                   "--max-latency", "soon"])
    assert out.exit_code == 2
    assert "search field 'max_latency': 'soon' is not a latency" in out.output


def test_cli_warn_drop_reaches_the_search(monkeypatch):
    from click.testing import CliRunner

    from netshrink import search_cli
    from netshrink.cli import cli

    got: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def fake_search(model, data, budget, **kwargs):
        got.update(kwargs)
        raise Stop

    monkeypatch.setattr(search_cli, "scan", lambda *a, **k: None)
    monkeypatch.setattr(search_cli, "search", fake_search)
    for args, expected in (([], 5.0), (["--warn-drop", "1.5"], 1.5)):
        out = CliRunner().invoke(cli, ["search", MODEL, "--data", DATA, "--budget", "8x", *args])
        assert isinstance(out.exception, Stop), out.output
        assert got["warn_drop"] == expected
    out = CliRunner().invoke(cli, ["search", MODEL, "--data", DATA, "--budget", "8x",
                                   "--warn-drop", "-1"])
    assert out.exit_code == 2 and "--warn-drop" in out.output
