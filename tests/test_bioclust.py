"""Tests of the ``bioclust`` compressor: k-means, perturbation, population search, storage."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pydantic import ValidationError

import netshrink as ns
from netshrink import CompressionContext, LayerSelector, model_info
from netshrink.encodings import Codebook, Dense, Encoding, Sparse
from netshrink.errors import ConfigError, EncodingError, RecipeError
from netshrink.plugins.bioclust import Bioclust, BioclustConfig, kmeans1d
from netshrink.plugins.magnitude import Magnitude


@pytest.fixture(scope="module")
def data(digits):
    return digits  # the 8x8 digits (conftest)


@pytest.fixture(scope="module")
def reference(data):
    return ns.reference_model("zoo:lenet300", data)


def run(model, data, config, *, select=None, encodings=None, seed=0, overrides=None):
    """Run the compressor directly (as the pipeline does) and return (result, ctx, compressor)."""
    model = copy.deepcopy(model)
    info = model_info(model)
    ctx = CompressionContext(data=data, info=info, seed=seed, step_name="bioclust")
    if encodings is not None:
        ctx.encodings = encodings
    layers = LayerSelector(**(select or {})).resolve(
        model, head=info.head, default_types=list(Bioclust.capabilities.handles)
    )
    comp = Bioclust(config, overrides=overrides)
    out = comp.compress(model, layers, ctx)
    ctx.encodings.reconcile(out.model)
    return out, ctx, comp


def roundtrip(enc: Encoding) -> Encoding:
    """Serialise an encoding the way the artifact does and read it back."""
    store: list[torch.Tensor] = []

    def write(t):
        store.append(t.clone())
        return len(store) - 1

    record = enc.to_record(write)
    return Encoding.from_record(record, lambda ref: store[ref])


# -- k-means ------------------------------------------------------------------------------------


def test_kmeans_recovers_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    labels = torch.randint(0, 4, (20_000,), generator=gen)
    x = centres[labels] + 0.01 * torch.randn(20_000, generator=gen)
    for init in ("linear", "quantile", "random"):
        cl = kmeans1d(x, 4, init=init)
        assert cl.k == 4
        assert torch.allclose(cl.centroids, centres, atol=0.01), init
        assert torch.equal(cl.indices, labels)
        assert torch.allclose(cl.spreads, torch.full((4,), 0.01), atol=0.002)


def test_kmeans_fewer_distinct_values_than_k_and_sampling():
    x = torch.tensor([0.5, -0.5, 0.5, 0.25])
    cl = kmeans1d(x, 16)
    assert cl.k == 3 and torch.equal(cl.centroids[cl.indices], x)
    assert cl.reconstruction_error(x) == 0.0
    big = torch.randn(100_000, generator=torch.Generator().manual_seed(1))
    sampled = kmeans1d(big, 8, sample_size=5_000)
    full = kmeans1d(big, 8)
    assert sampled.indices.numel() == big.numel()  # every weight assigned, not only the sample
    assert sampled.reconstruction_error(big) < 1.05 * full.reconstruction_error(big)


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("k", 1),
        ("bits", 9),
        ("bits", 0),
        ("population", 0),
        ("noise_scale", -0.1),
        ("generations", 0),
        ("mutation_rate", 0.0),
        ("distribution", "cauchy"),
        ("init", "kpp"),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValidationError) as exc:
        BioclustConfig.model_validate({field: value})
    assert exc.value.errors()[0]["loc"][0] == field


def test_bad_overrides_and_conflicts():
    with pytest.raises(ValidationError, match="either bits or k"):
        BioclustConfig(bits=3, k=5)
    with pytest.raises(ConfigError, match=r"field 'overrides\.fc1\.k': .*greater than or equal"):
        Bioclust(overrides={"fc1": {"k": 1}})
    with pytest.raises(ConfigError, match=r"field 'overrides\.re:fc\[': .*not a valid regex"):
        Bioclust(overrides={"re:fc[": {"bits": 2}})
    with pytest.raises(ConfigError, match=r"overrides\.fc1\.population.*once for the whole step"):
        Bioclust(overrides={"fc1": {"population": 2}})
    with pytest.raises(ValidationError, match="Extra inputs"):
        BioclustConfig(populaton=4)
    # An override's bits or k replaces the step's bits and k (they are alternatives).
    comp = Bioclust({"k": 5}, overrides={"fc1": {"bits": 2}, "re:^fc": {"k": 3}})
    assert [comp.config_for(n).clusters for n in ("fc1", "fc2", "conv")] == [4, 3, 5]
    comp = Bioclust({"bits": 3}, overrides={"fc1": {"k": 5}, "fc2": {"noise_scale": 0.0}})
    assert [comp.config_for(n).clusters for n in ("fc1", "fc2", "conv")] == [5, 8, 8]
    assert comp.config_for("fc2").noise_scale == 0.0 and comp.config_for("fc1").noise_scale == 0.5


def test_pipeline_reports_bad_config_with_step_and_field():
    with pytest.raises(RecipeError, match=r"step 0 \(bioclust\).*population"):
        ns.compress(
            "zoo:lenet300",
            [ns.Step(compressor="bioclust", config={"population": 0})],
            data="digits",
            latency=False,
        )


# -- compression --------------------------------------------------------------------------------


def test_weights_are_shared_and_stored_as_codebooks(reference, data):
    out, ctx, _ = run(reference, data, {"bits": 3, "noise_scale": 0.0})
    for rec in out.records:
        name = f"{rec.name}.weight"
        enc = ctx.encoding_of(name)
        assert isinstance(enc, Codebook) and not enc.perturbed
        weight = out.model.get_parameter(name)
        assert torch.unique(weight).numel() <= 8
        assert rec.details["k"] <= 8 and rec.details["index_bits"] == 3
        assert rec.details["bits_per_weight"] < 3.2  # 3-bit indices + a small codebook
    assert out.summary["chosen"] == "unperturbed" and out.summary["evaluations"] == 1
    assert "fc3" not in {r.name for r in out.records}  # the head is protected by default


def test_population_search_selects_the_best_and_reports_stats(reference, data):
    out, ctx, comp = run(
        reference, data, {"bits": 2, "population": 6, "noise_scale": 1.0, "keep_unperturbed": False}
    )
    search = comp.last_search
    accs = [c.val_acc for c in search.candidates]
    summary = out.summary
    assert len(accs) == 6 and summary["population"]["n"] == 6
    assert summary["population"]["best"] == pytest.approx(max(accs), abs=1e-6)
    assert summary["population"]["mean"] == pytest.approx(sum(accs) / 6, abs=1e-6)
    assert summary["chosen"] == "perturbed" and search.chosen.val_acc == max(accs)
    # The model holds the chosen reconstruction: its validation accuracy is the chosen one.
    assert ns.accuracy(out.model, data, "val") == pytest.approx(max(accs))
    seeds = {r.details["seed"] for r in out.records}
    assert None not in seeds and len(seeds) == len(out.records)  # one seed per layer
    chosen = search.chosen
    assert len(out.records) == len(chosen.seeds)
    for rec, seed, scale in zip(out.records, chosen.seeds, chosen.scales):
        enc = ctx.encoding_of(f"{rec.name}.weight")
        # The file stores the chosen candidate's seed and scale for this layer, not another's.
        assert enc.seed == seed and enc.noise_scale == pytest.approx(scale)
        # Rebuilt outside the encoding by the documented formula (centroid + scale * spread *
        # N(0, 1) drawn from the seed), the weights are exactly the model's, off the centroids.
        noise = torch.randn(enc.indices.numel(), generator=torch.Generator().manual_seed(seed))
        rebuilt = enc.centroids[enc.indices] + np.float32(scale) * enc.spreads[enc.indices] * noise
        weight = out.model.get_parameter(f"{rec.name}.weight").detach().reshape(-1)
        assert torch.allclose(rebuilt, weight, rtol=0, atol=1e-6)
        assert (weight - enc.centroids[enc.indices]).abs().max() > 1e-3


def test_keeping_the_unperturbed_reconstruction_never_loses_on_validation(reference, data):
    out, _, comp = run(reference, data, {"bits": 2, "population": 4, "noise_scale": 2.0})
    assert out.summary["chosen_val_acc"] >= out.summary["val_acc_unperturbed"]
    assert out.summary["chosen_val_acc"] >= max(c.val_acc for c in comp.last_search.candidates)


def test_search_is_deterministic_given_the_seed(reference, data):
    cfg = {"bits": 2, "population": 2, "keep_unperturbed": False}
    a, _, _ = run(reference, data, cfg, seed=3)
    b, _, _ = run(reference, data, cfg, seed=3)
    c, _, _ = run(reference, data, cfg, seed=4)
    seeds = [[r.details["seed"] for r in out.records] for out in (a, b, c)]
    assert seeds[0] == seeds[1] != seeds[2]
    for name, tensor in a.model.state_dict().items():
        assert torch.equal(tensor, b.model.state_dict()[name])


def test_generations_mutate_the_elite(reference, data):
    out, _, comp = run(
        reference,
        data,
        {"bits": 2, "population": 4, "generations": 3, "elite": 2, "keep_unperturbed": False},
    )
    search = comp.last_search
    assert out.summary["evaluations"] == 1 + 12
    assert [g["generation"] for g in out.summary["generations"]] == [1, 2, 3]
    children = [c for c in search.candidates if c.generation > 1]
    assert all(c.parent is not None for c in children)
    by_index = {c.index: c for c in search.candidates}
    for child in children:
        parent = by_index[child.parent]
        assert child.seeds != parent.seeds  # at least one layer mutated
        assert parent.generation < child.generation
    assert search.chosen.val_acc == max(c.val_acc for c in search.candidates)


def test_perturbed_codebook_survives_serialisation_bit_for_bit(reference, data):
    out, ctx, _ = run(
        reference,
        data,
        {"bits": 3, "population": 2, "keep_unperturbed": False, "distribution": "uniform"},
    )
    for rec in out.records:
        name = f"{rec.name}.weight"
        enc = ctx.encoding_of(name)
        back = roundtrip(enc)
        assert isinstance(back, Codebook) and back.seed == enc.seed
        assert back.distribution == "uniform"
        assert torch.equal(back.decode(), out.model.get_parameter(name).detach())


def test_artifact_round_trip_and_honest_size(tmp_path):
    result = ns.compress(
        "zoo:lenet300",
        [
            ns.step(
                "bioclust",
                select={"protect_head": False},
                bits=4,
                population=3,
                keep_unperturbed=False,
            )
        ],
        data="digits",
        seed=0,
        latency=False,
    )
    report = result.report
    assert report.compression_ratio > 7.0  # 4-bit indices for ~all weights, fp32 biases
    path = result.save(tmp_path / "lenet300.nsk", report=False)
    assert path.stat().st_size == report.storage_bytes
    loaded = ns.load(path)
    expected = result.model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name  # perturbation regenerated exactly
    assert ns.accuracy(loaded, "digits") == pytest.approx(report.accuracy_after)
    assert report.steps[0]["chosen"] == "perturbed"


def test_overrides_set_per_layer_clusters(reference, data):
    out, ctx, _ = run(
        reference, data, {"bits": 4, "noise_scale": 0.0}, overrides={"fc2": {"bits": 1}}
    )
    details = {r.name: r.details for r in out.records}
    assert details["fc1"]["k"] == 16 and details["fc2"]["k"] == 2
    assert isinstance(ctx.encoding_of("fc2.weight"), Codebook)


def test_pruned_weights_stay_pruned_and_only_kept_values_are_clustered(reference, data):
    model = copy.deepcopy(reference)
    info = model_info(model)
    ctx = CompressionContext(data=data, info=info, seed=0, step_name="magnitude")
    layers = LayerSelector(types=["Linear"]).resolve(model, head=info.head)
    Magnitude({"sparsity": 0.8}).compress(model, layers, ctx)
    ctx.encodings.reconcile(model)
    before = {n: ctx.encoding_of(n).payload_bytes for n in ("fc1.weight", "fc2.weight")}
    masks = {n: ctx.encoding_of(n).mask() for n in before}
    out, ctx, _ = run(
        model,
        data,
        {"bits": 3, "population": 2, "keep_unperturbed": False},
        encodings=ctx.encodings,
    )
    for name, mask in masks.items():
        enc = ctx.encoding_of(name)
        assert isinstance(enc, Sparse) and isinstance(enc.values, Codebook)
        assert enc.values.perturbed and enc.values.numel == int(mask.sum())
        weight = out.model.get_parameter(name).detach()
        assert torch.equal(weight != 0, mask)  # zeros kept, nothing new pruned
        assert enc.payload_bytes < before[name]
        assert torch.equal(roundtrip(enc).decode(), weight)


def test_refuses_already_value_encoded_weights(reference, data):
    model = copy.deepcopy(reference)
    info = model_info(model)
    ctx = CompressionContext(data=data, info=info, seed=0)
    w = model.fc1.weight.detach()
    ctx.encode(
        model,
        "fc1.weight",
        Codebook(torch.zeros(w.numel(), dtype=torch.int64), torch.zeros(1), shape=tuple(w.shape)),
    )
    with pytest.raises(EncodingError, match="already stored as codebook"):
        run(model, data, {"population": 1}, encodings=ctx.encodings)


def test_centroid_finetune_moves_centroids_and_keeps_sharing(reference, data):
    kmeans_only, ctx0, _ = run(reference, data, {"bits": 1, "noise_scale": 0.0})
    out, ctx, _ = run(
        reference, data, {"bits": 1, "noise_scale": 0.0, "centroid_epochs": 1, "centroid_lr": 1e-3}
    )
    info = out.summary["centroid_finetune"]
    # It starts from the plain 1-bit k-means model, and one epoch does improve on it here (the
    # best epoch's centroids are kept only when they beat the start).
    assert info["start_val_acc"] == pytest.approx(ns.accuracy(kmeans_only.model, data, "val"))
    assert info["best_val_acc"] > info["start_val_acc"]
    moved = False
    for rec in out.records:
        name = f"{rec.name}.weight"
        enc, plain = ctx.encoding_of(name), ctx0.encoding_of(name)
        assert isinstance(enc, Codebook) and torch.equal(enc.indices, plain.indices)
        assert torch.unique(out.model.get_parameter(name)).numel() <= 2
        moved |= not torch.equal(enc.centroids, plain.centroids)
    assert moved  # the improvement came from trained centroids, and they were stored
    assert ns.accuracy(out.model, data, "val") == pytest.approx(info["best_val_acc"])


def test_biases_stay_dense(reference, data):
    _, ctx, _ = run(reference, data, {"noise_scale": 0.0})
    assert ctx.encoding_of("fc1.bias") is None or isinstance(ctx.encoding_of("fc1.bias"), Dense)


def test_registered_as_a_plugin():
    from netshrink.registry import get_compressor

    assert get_compressor("bioclust") is Bioclust
    assert Bioclust.capabilities.encodes_values and Bioclust.capabilities.needs_data


@pytest.mark.slow
def test_timm_resnet18_compresses_saves_loads_and_runs(tmp_path):
    pytest.importorskip("timm")
    model = ns.load_model("timm:resnet18", in_chans=1, num_classes=10)
    result = ns.compress(
        model,
        [ns.step("bioclust", bits=4, population=2, eval_limit=64)],
        data="digits32",
        seed=0,
        latency=False,
    )
    assert result.report.compression_ratio > 6
    path = result.save(tmp_path / "r18.nsk", report=False)
    loaded = ns.load(path)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), result.model.eval()(x))


def test_recorded_candidates_rebuild_the_evaluated_weights(reference, data):
    from netshrink.plugins.bioclust import BioclustConfig as Cfg
    from netshrink.plugins.bioclust import Candidate
    from netshrink.plugins.bioclust.search import apply, cluster_targets

    cfg = {"bits": 2, "population": 3, "keep_unperturbed": False}
    out, _, _ = run(reference, data, cfg, seed=1)
    recorded = out.summary["candidates"]
    assert len(recorded) == 3 and out.summary["chosen_candidate"] in recorded
    model = copy.deepcopy(reference)
    info = model_info(model)
    ctx = CompressionContext(data=data, info=info, seed=1, step_name="bioclust")
    layers = LayerSelector().resolve(
        model, head=info.head, default_types=list(Bioclust.capabilities.handles)
    )
    targets = cluster_targets(model, layers, ctx, Cfg.model_validate(cfg))
    for desc in recorded:  # each recorded candidate scores what the search measured
        apply(targets, Candidate.from_description(desc), "normal")
        assert ns.accuracy(model, data, "val") == pytest.approx(desc["val_acc"])
    apply(targets, Candidate.from_description(out.summary["chosen_candidate"]), "normal")
    for name, tensor in out.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
