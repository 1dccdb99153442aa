"""Recipes and the pipeline: validation before work, end-to-end compression, determinism."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import netshrink as ns
from netshrink.errors import RecipeError, SelectionError
from netshrink.pipeline import _info_for, plan
from netshrink.recipe import Recipe
from netshrink.registry import compressors

ROOT = Path(__file__).resolve().parent.parent


def test_unknown_compressor_did_you_mean(lenet5):
    with pytest.raises(RecipeError) as err:
        ns.compress(lenet5, [ns.Step(compressor="magnitud")], data="digits28")
    msg = str(err.value)
    assert (
        "step 0 (magnitud)" in msg
        and "field 'compressor'" in msg
        and "Did you mean 'magnitude'" in msg
    )
    # The message lists exactly what is registered (sorted), so the user sees every choice.
    listed = msg.split("Registered compressors: ", 1)[1].rstrip(".").split(", ")
    assert listed == sorted(compressors())


def test_bad_config_names_step_and_field(lenet5):
    with pytest.raises(RecipeError) as err:
        ns.compress(
            lenet5,
            [
                ns.Step(compressor="magnitude", config={"sparsity": 0.5}),
                ns.Step(compressor="quantize", config={"bits": 12}),
            ],
            data="digits28",
        )
    msg = str(err.value)
    assert "step 1 (quantize)" in msg and "config.bits" in msg and "12" in msg
    with pytest.raises(RecipeError, match=r"config\.sparsity"):
        ns.compress(
            lenet5, [ns.Step(compressor="magnitude", config={"sparsity": 1.5})], data="digits28"
        )
    with pytest.raises(RecipeError, match=r"config\.sparsty"):
        ns.compress(
            lenet5, [ns.Step(compressor="magnitude", config={"sparsty": 0.5})], data="digits28"
        )
    # A layer pattern in per-layer overrides stays in the path, even one that looks like a class.
    with pytest.raises(RecipeError, match=r"step 0 \(bioclust\): field 'overrides\.Conv1\.bits'"):
        ns.compress(lenet5, [ns.Step(compressor="bioclust", overrides={"Conv1": {"bits": 99}})])


def test_selection_errors_name_step(lenet5):
    with pytest.raises(
        SelectionError, match=r"step 0 \(magnitude\): field 'select'.*selected no layers"
    ):
        ns.compress(lenet5, [ns.step("magnitude", select={"names": ["nothing*"]})], data="digits28")
    with_conv1d = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(24, 8), nn.Linear(8, 2))
    with pytest.raises(SelectionError, match="handles \\['Linear', 'Conv2d'\\]"):
        ns.compress(with_conv1d, [ns.step("svd", select={"types": ["Conv1d"]})])


def test_structural_after_quantize_refused(lenet5):
    with pytest.raises(
        RecipeError, match=r"step 1 \(svd\).*changes the model's structure after step 0"
    ):
        ns.compress(lenet5, [ns.step("quantize", bits=4), ns.step("svd")], data="digits28")
    with pytest.raises(RecipeError, match="would rewrite layers"):
        ns.compress(lenet5, [ns.step("quantize", bits=4), ns.step("magnitude")], data="digits28")


def test_finetune_needs_data():
    model = ns.load_model("zoo:lenet300")
    with pytest.raises(RecipeError, match="needs data"):
        ns.compress(model, [ns.step("magnitude", finetune={"epochs": 1})])


def test_recipe_file_errors(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("steps:\n  - compressor: magnitude\n    finetune: {epochs: -1}\n")
    with pytest.raises(RecipeError, match=r"step 0 \(magnitude\): field 'finetune\.epochs'"):
        Recipe.from_file(bad)
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.from_file(tmp_path / "missing.yaml")
    (tmp_path / "r.txt").write_text("x")
    with pytest.raises(RecipeError, match="unknown extension"):
        Recipe.from_file(tmp_path / "r.txt")
    (tmp_path / "r.json").write_text("{not json")
    with pytest.raises(RecipeError, match="cannot parse"):
        Recipe.from_file(tmp_path / "r.json")


def test_json_and_toml_recipes_load_like_yaml(tmp_path):
    (tmp_path / "r.json").write_text(
        '{"steps": [{"compressor": "magnitude", "config": {"sparsity": 0.8}}]}'
    )
    (tmp_path / "r.toml").write_text(
        '[[steps]]\ncompressor = "magnitude"\n[steps.config]\nsparsity = 0.8\n'
    )
    for name in ("r.json", "r.toml"):
        recipe = Recipe.from_file(tmp_path / name)
        assert recipe.steps[0].compressor == "magnitude"
        assert recipe.steps[0].config == {"sparsity": 0.8}


README_RECIPES = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text("utf-8"), re.S)
SHIPPED = [pytest.param(p, id=p.name) for p in sorted((ROOT / "recipes").glob("*.yaml"))] + [
    pytest.param(text, id=f"README.md-{i}") for i, text in enumerate(README_RECIPES)
]


def test_readme_shows_a_recipe():
    assert README_RECIPES, "README.md has no ```yaml recipe block: update README_RECIPES"


@pytest.mark.parametrize("source", SHIPPED)
def test_shipped_recipes_plan_on_their_model(source, tmp_path, caplog, small_shapes):
    """Every shipped recipe, and the README's, validates against its own model and data the way
    a run starts (compressors, configs, overrides, selectors, data needs), without compressing."""
    path = source
    if isinstance(source, str):  # a README block
        path = tmp_path / "readme.yaml"
        path.write_text(source, encoding="utf-8")
    recipe = Recipe.from_file(path)
    assert recipe.model and recipe.data, "a shipped recipe names its model and its data"
    if recipe.model.startswith("timm:"):
        pytest.importorskip("timm")
    splits = ns.datasets.load(recipe.data)
    model = ns.load_model(recipe.model, **splits.model_options())
    with caplog.at_level(logging.WARNING, logger="netshrink"):
        planned = plan(recipe, model, _info_for(model, splits), splits)
    assert [item.compressor.name for item in planned] == [s.compressor for s in recipe.steps]
    modules = dict(model.named_modules())
    for item in planned:
        assert item.layers, f"{item.title} selects no layer"
        assert set(item.layers) <= set(modules)
    # An override pattern that matches no selected layer is a typo in a shipped recipe.
    unused = [r.getMessage() for r in caplog.records if "applies to no selected" in r.getMessage()]
    assert unused == []


def test_end_to_end_lenet5_magnitude(lenet5, tmp_path):
    result = ns.compress(
        lenet5,
        [
            ns.step(
                "magnitude",
                sparsity=0.8,
                scope="global",
                select={"types": ["Conv2d", "Linear"]},
                finetune={"epochs": 1},
            )
        ],
        data="digits28",
        seed=0,
        latency=False,
    )
    rep = result.report
    assert rep.accuracy_before > 0.9
    assert rep.accuracy_after > rep.accuracy_before - 0.05
    pruned = [r for r in rep.rows if r.methods == "magnitude"]
    assert {r.name for r in pruned} == {"conv1", "conv2", "fc1"}  # the head fc2 is protected
    kept = sum(
        int((p != 0).sum())
        for n, p in result.model.named_parameters()
        if n.endswith("weight") and not n.startswith("fc2")
    )
    total = sum(
        p.numel()
        for n, p in result.model.named_parameters()
        if n.endswith("weight") and not n.startswith("fc2")
    )
    assert kept <= 0.2 * total + 1
    assert lenet5.fc1.weight.count_nonzero() == lenet5.fc1.weight.numel()  # input untouched
    path = result.save(tmp_path / "m.nsk")
    assert path.stat().st_size == rep.storage_bytes
    assert (tmp_path / "m.report.json").is_file() and (tmp_path / "m.report.png").is_file()


def test_deterministic_given_seed(lenet300):
    steps = [ns.step("magnitude", sparsity=0.7, finetune={"epochs": 1})]
    a = ns.compress(lenet300, steps, data="digits28", seed=3, latency=False)
    b = ns.compress(lenet300, steps, data="digits28", seed=3, latency=False)
    assert a.artifact == b.artifact


def test_honest_ratio_magnitude_then_quantize(lenet300, tmp_path):
    """90% magnitude + 4-bit quantize: a count-the-zeros report would claim ~80x; the honest
    ratio (indices, scales, header, biases all counted) lands in the 20-35x range."""
    result = ns.compress(
        lenet300,
        [
            ns.step("magnitude", sparsity=0.9, select="everything"),
            ns.step("quantize", bits=4, select="everything"),
        ],
        data="digits28",
        latency=False,
    )
    rep = result.report
    naive = 32 / 4 / 0.1
    assert 20 <= rep.compression_ratio <= 35 < naive
    path = result.save(tmp_path / "q.nsk", report=False)
    assert path.stat().st_size == rep.storage_bytes
    loaded = ns.load(path)
    x = ns.datasets.load("digits28").test.tensors[0][:32]
    assert torch.equal(loaded(x), result.model(x))


def test_plain_module_without_spec(tmp_path):
    from torch import nn

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    result = ns.compress(model, [ns.step("magnitude", sparsity=0.5)], data="digits", latency=False)
    path = result.save(tmp_path / "plain.nsk", report=False)
    loaded = ns.load(path)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(loaded(x), result.model(x))
