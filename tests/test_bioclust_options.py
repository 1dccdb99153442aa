"""``bioclust`` in the per-layer search: its options (plain k-means per codebook size), their
exact bytes, the conformance check, the combination after magnitude pruning, and a search
that chooses a bioclust option and whose recipe reproduces the artifact byte for byte."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

import netshrink as ns
from netshrink import layer_search as S
from netshrink import registry
from netshrink.encodings import Codebook, Sparse
from netshrink.plugins.bioclust import Bioclust
from netshrink.plugins.bioclust import options as bopts
from netshrink.plugins.quantize import options as qopts
from netshrink.recipe import Recipe
from netshrink.testing import conformance_cases

pytestmark = pytest.mark.usefixtures("single_thread")

MODEL, DATA = "zoo:lenet5", "digits"


@pytest.fixture(scope="module")
def grids() -> Iterator[None]:
    """Small option grids, so the scan stays a handful of candidates per layer."""
    mp = pytest.MonkeyPatch()
    mp.setattr(bopts, "SEARCH_BITS", (1, 2, 4))
    mp.setattr(qopts, "SEARCH_BITS", (8,))
    mp.setattr(registry.get_compressor("magnitude"), "search_sparsities", (0.75,))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def table(grids) -> S.Sensitivity:
    """The scan of LeNet-5 on 8x8 digits with bioclust, quantize (8 bits) and magnitude."""
    return S.scan(MODEL, DATA, methods=("bioclust", "magnitude", "quantize"), checkpoint=False)


# -- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [nn.Linear(48, 32), nn.Conv2d(8, 16, 3)], ids=["linear", "conv"])
def test_options_declare_the_bytes_bioclust_stores(layer):
    torch.manual_seed(0)
    options = Bioclust.layer_options(layer, "layer")
    assert [o.config for o in options] == [
        {"bits": b, "noise_scale": 0.0} for b in bopts.SEARCH_BITS
    ]
    assert all(o.macs is None for o in options)  # clustering leaves the MACs as they were
    sizes = [o.bytes for o in options]
    assert sizes == sorted(set(sizes))
    dense = sum(p.numel() * 4 for p in layer.parameters())
    assert sizes[-1] < dense
    assert S.check_layer_options(Bioclust, layer) == []


def test_option_bytes_follow_the_clusters_that_survive():
    # Three distinct values: 1 bit gives 2 clusters, 2 bits all 3; wider codebooks store the
    # same bytes as 2 bits and are left out.
    layer = nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([-0.5, 0.0, 0.5]).repeat(342)[:1024].reshape(16, 64))
    options = Bioclust.layer_options(layer, "layer")
    assert [o.config["bits"] for o in options] == [1, 2]
    k2 = Codebook(torch.zeros(1024, dtype=torch.int64), torch.zeros(2))
    k3 = Codebook(torch.zeros(1024, dtype=torch.int64), torch.zeros(3))
    assert [o.bytes for o in options] == [k2.payload_bytes, k3.payload_bytes]
    assert S.check_layer_options(Bioclust, layer) == []


def test_large_weights_are_fitted_on_all_values():
    # A sampled fit depends on the run's seed and step index: the option fits on every value.
    sample = Bioclust.Config().sample_size
    small, large = nn.Linear(10, 10), nn.Linear(sample // 100 + 1, 100)
    assert "sample_size" not in bopts.option_config(Bioclust, small, 2)
    assert bopts.option_config(Bioclust, large, 2) == {
        "bits": 2,
        "noise_scale": 0.0,
        "sample_size": None,
    }
    assert set(bopts.option_config(Bioclust, large, 2)) <= set(Bioclust.layer_fields)


def test_plain_kmeans_runs_without_data_and_perturbation_still_needs_it():
    holder = nn.Module()
    holder.add_module("fc", nn.Linear(20, 10))
    ctx = ns.CompressionContext()
    out = Bioclust({"bits": 2, "noise_scale": 0.0}).compress(holder, [("fc", holder.fc)], ctx)
    assert out.summary["val_acc_unperturbed"] is None and out.summary["chosen"] == "unperturbed"
    assert isinstance(ctx.encoding_of("fc.weight"), Codebook)
    holder.add_module("fc", nn.Linear(20, 10))
    with pytest.raises(ns.DataError, match="needs data"):
        Bioclust({"bits": 2}).compress(holder, [("fc", holder.fc)], ns.CompressionContext())


@pytest.mark.parametrize("layer_type", ["Linear", "Conv2d"])
def test_conformance_layer_options(layer_type):
    cases = [
        c
        for c in conformance_cases(Bioclust, checks=("layer-options",))
        if c.layer_type == layer_type
    ]
    assert len(cases) == 1
    cases[0].run()


def test_option_bytes_are_the_report_rows(grids):
    """Every layer compressed with its option's config (the step's config for one, per-layer
    overrides for the rest, as a searched recipe writes it) stores the declared bytes."""
    reference = ns.reference_model(MODEL, ns.datasets.load(DATA))
    layers = ("conv1", "conv2", "fc1")
    chosen = {
        name: Bioclust.layer_options(reference.get_submodule(name), name)[i]
        for i, name in enumerate(layers)
    }
    step = ns.Step(
        compressor="bioclust",
        config=chosen["conv1"].config,
        overrides={name: chosen[name].config for name in layers[1:]},
        select={"names": list(layers)},
    )
    result = ns.compress(MODEL, [step], DATA, latency=False)
    rows = {row.name: row for row in result.report.rows}
    for name, option in chosen.items():
        assert rows[name].storage_bytes == option.bytes, name
        assert rows[name].details["index_bits"] == option.config["bits"]


# -- in the search -------------------------------------------------------------------------------


def test_scan_measures_the_declared_bytes_and_combines_after_pruning(table):
    labels = [c.label for c in table.candidates["fc1"]]
    assert "bioclust(bits=2,noise_scale=0.0)" in labels
    # Pruning then clustering the kept values; two value encodings never share a layer.
    assert "magnitude(sparsity=0.75)+bioclust(bits=2,noise_scale=0.0)" in labels
    assert not any("quantize" in label and "bioclust" in label for label in labels)
    for cands in table.candidates.values():
        for cand in cands:
            if cand.label.startswith("bioclust"):
                assert table.row(cand)["bytes"] == cand.options[0].bytes, cand.label
    pruned = next(
        c
        for c in table.candidates["fc1"]
        if c.label.startswith("magnitude(") and "+bioclust(bits=2" in c.label
    )
    alone = next(c for c in table.candidates["fc1"] if c.label == "magnitude(sparsity=0.75)")
    assert table.row(pruned)["bytes"] < table.row(alone)["bytes"]
    encodings = ns.EncodingTable()
    model = S.apply_candidate(ns.reference_model(MODEL, ns.datasets.load(DATA)), pruned, encodings)
    enc = encodings.complete(model)["fc1.weight"]
    assert isinstance(enc, Sparse) and isinstance(enc.values, Codebook)


def test_search_chooses_bioclust_and_its_recipe_reproduces_the_bytes(table, tmp_path):
    # 6x is beyond quantize's 8 bits and magnitude's 75% alone: bioclust is needed somewhere.
    found = S.search(MODEL, DATA, "6x", sensitivity=table)
    assert found.artifact_bytes <= found.budget_bytes
    assert any("bioclust" in c.label for c in found.plan.values()), found.plan_rows()
    steps = [s for s in found.recipe.steps if s.compressor == "bioclust"]
    assert len(steps) == 1 and steps[0].config["noise_scale"] == 0.0
    again = ns.compress(None, Recipe.from_file(found.save(tmp_path)["recipe"]))
    assert again.artifact == found.result.artifact
