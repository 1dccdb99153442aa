"""Per-layer overrides of a step (``Step.overrides``, ``Compressor.config_for``): they apply to
the matching layers only, the first matching pattern wins, and every mistake is refused before
any work, naming the step and ``overrides.<pattern>.<field>``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import ClassVar

import pytest
import torch
from pydantic import Field, model_validator

import netshrink as ns
from netshrink import registry
from netshrink.errors import ConfigError, NetshrinkError, RecipeError
from netshrink.recipe import Recipe


class KeepConfig(ns.CompressorConfig):
    """Configuration of :class:`Keep`."""

    keep_every: int = Field(2, ge=1, le=16, description="Keep one weight in this many.")
    max_keep_every: int = Field(16, ge=1, le=16, description="Upper limit of keep_every.")
    offset: int = Field(0, ge=0, description="First kept position (the same for every layer).")

    @model_validator(mode="after")
    def _within_limit(self) -> KeepConfig:
        if self.keep_every > self.max_keep_every:
            raise ValueError(
                f"keep_every must be <= max_keep_every, got keep_every={self.keep_every}, "
                f"max_keep_every={self.max_keep_every}"
            )
        return self


class Keep(ns.Compressor):
    """Keep every n-th weight of each layer, n per layer (a test compressor)."""

    name = "overridetest-keep"
    Config = KeepConfig
    capabilities = ns.Capabilities(handles=("Linear",))
    layer_fields = ("keep_every", "max_keep_every")
    calls: ClassVar[int] = 0

    def compress(self, model, layers, ctx):
        Keep.calls += 1
        records = []
        for lname, module in layers:
            n = self.config_for(lname).keep_every
            mask = torch.zeros(module.weight.numel(), dtype=torch.bool)
            mask[self.config.offset :: n] = True
            mask = mask.reshape(module.weight.shape)
            encoding = ns.Sparse.from_dense(module.weight.detach() * mask, mask=mask)
            ctx.encode(model, f"{lname}.weight", encoding)
            records.append(ns.LayerRecord(lname, {"keep_every": n}))
        return ns.StepResult(model, records)


class KeepPlugin:
    """Registers :class:`Keep`."""

    @ns.hookimpl
    def register_compressors(self, register: Callable[[type], None]) -> None:
        register(Keep)


@pytest.fixture
def keep() -> Iterator[type[Keep]]:
    plugin = KeepPlugin()
    registry.register_plugin(plugin, name="overridetest")
    Keep.calls = 0
    try:
        yield Keep
    finally:
        registry.unregister_plugin(plugin)


EVERY_LINEAR = {"protect_head": False}  # fc1, fc2, fc3


def _kept(lenet300, overrides, **config) -> dict[str, int]:
    step = ns.step("overridetest-keep", select=EVERY_LINEAR, overrides=overrides, **config)
    result = ns.compress(lenet300, [step], latency=False)
    for name in ("fc1", "fc2", "fc3"):  # the stored weights follow the per-layer config
        weight = result.model.get_submodule(name).weight
        n = next(r.details["keep_every"] for r in result.records if r.name == name)
        assert int((weight != 0).sum()) <= -(-weight.numel() // n)
    return {r.name: r.details["keep_every"] for r in result.records}


def test_step_carries_overrides_outside_the_config(keep):
    step = ns.step("overridetest-keep", overrides={"fc1": {"keep_every": 4}}, keep_every=3)
    assert step.overrides == {"fc1": {"keep_every": 4}} and step.config == {"keep_every": 3}
    parsed = Recipe.parse({"steps": [step.model_dump()]})
    assert parsed.steps[0].overrides == step.overrides


def test_override_applies_only_to_matching_layers(keep, lenet300):
    assert _kept(lenet300, {"fc2": {"keep_every": 8}}) == {"fc1": 2, "fc2": 8, "fc3": 2}
    assert _kept(lenet300, {"re:^fc[13]$": {"keep_every": 4}}, keep_every=3) == {
        "fc1": 4,
        "fc2": 3,
        "fc3": 4,
    }


def test_first_matching_pattern_wins(keep, lenet300):
    overrides = {"fc1": {"keep_every": 8}, "fc*": {"keep_every": 4}, "fc2": {"keep_every": 16}}
    assert _kept(lenet300, overrides) == {"fc1": 8, "fc2": 4, "fc3": 4}
    # An empty override shields a layer from later patterns: it keeps the step's config.
    assert _kept(lenet300, {"fc3": {}, "fc*": {"keep_every": 4}}) == {"fc1": 4, "fc2": 4, "fc3": 2}


def test_config_for_merges_and_falls_back():
    comp = Keep({"keep_every": 3, "offset": 1}, overrides={"fc1": {"max_keep_every": 8}})
    assert comp.config_for("fc1") == KeepConfig(keep_every=3, offset=1, max_keep_every=8)
    assert comp.config_for("fc2") is comp.config
    plain = Keep()
    assert plain.overrides == {} and plain.config_for("fc1") is plain.config


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # a bad value: Pydantic's message and the value
        (
            {"fc1": {"keep_every": 99}},
            r"field 'overrides\.fc1\.keep_every': .*less than or equal "
            r"to 16 \(got 99\)",
        ),
        # a cross-field rule of the merged config names the override itself
        (
            {"fc*": {"max_keep_every": 1}},
            r"field 'overrides\.fc\*': keep_every must be <= "
            r"max_keep_every, got keep_every=2, max_keep_every=1",
        ),
        # a field the config does not have, with a suggestion
        (
            {"fc1": {"keep_evry": 4}},
            r"field 'overrides\.fc1\.keep_evry': 'overridetest-keep' has "
            r"no config field 'keep_evry' \(got 4\); per-layer fields: keep_every, max_keep_every; "
            r"did you mean 'keep_every'\?",
        ),
        # a field the compressor reads once for the whole step
        (
            {"fc1": {"offset": 1}},
            r"field 'overrides\.fc1\.offset': 'overridetest-keep' reads "
            r"'offset' once for the whole step, not per layer \(got 1\); per-layer fields",
        ),
    ],
)
def test_bad_override_refused_before_work_naming_step_and_field(
    keep, lenet300, overrides, expected
):
    steps = [
        ns.Step(compressor="magnitude", config={"sparsity": 0.5}),
        ns.Step(compressor="overridetest-keep", select=EVERY_LINEAR, overrides=overrides),
    ]
    with pytest.raises(RecipeError, match=r"step 1 \(overridetest-keep\): " + expected):
        ns.compress(lenet300, steps, latency=False)
    assert keep.calls == 0


def test_every_bad_override_is_listed(keep, lenet300):
    overrides = {"fc1": {"keep_every": 0}, "fc2": {"offset": 3}}
    with pytest.raises(RecipeError) as info:
        steps = [ns.Step(compressor="overridetest-keep", overrides=overrides)]
        ns.compress(lenet300, steps, latency=False)
    lines = str(info.value).splitlines()
    assert len(lines) == 2
    lines = [line.removeprefix("recipe: ") for line in lines]  # when the recipe checks it
    assert lines[0].startswith("step 0 (overridetest-keep): field 'overrides.fc1.keep_every'")
    assert lines[1].startswith("step 0 (overridetest-keep): field 'overrides.fc2.offset'")


def test_bad_pattern_refused_naming_step_and_field(tmp_path):
    with pytest.raises(RecipeError, match=r"field 'overrides': pattern 're:fc\[' is not a valid"):
        ns.step("overridetest-keep", overrides={"re:fc[": {"keep_every": 4}})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "steps:\n  - compressor: magnitude\n  - compressor: quantize\n"
        "    overrides: {'re:(': {bits: 4}}\n"
    )
    with pytest.raises(
        RecipeError, match=r"step 1 \(quantize\): field 'overrides': pattern 're:\(' is not"
    ):
        Recipe.from_file(recipe)
    # The compressor checks its own overrides too (used without a recipe).
    with pytest.raises(ConfigError, match=r"field 'overrides\.re:fc\[': pattern .* not a valid"):
        Keep(overrides={"re:fc[": {"keep_every": 4}})


def test_compressor_without_layer_fields_refuses_overrides(lenet300):
    step = ns.Step(compressor="tucker", config={"rank": 0.5}, overrides={"fc1": {"rank": 0.25}})
    with pytest.raises(
        RecipeError,
        match=r"step 0 \(tucker\): field 'overrides\.fc1\.rank': 'tucker' reads 'rank' once for "
        r"the whole step, not per layer \(got 0\.25\); 'tucker' takes no overrides",
    ):
        ns.compress(lenet300, [step], latency=False)


def test_pattern_that_applies_to_no_layer_is_a_warning(keep, lenet300, caplog):
    overrides = {"fc*": {"keep_every": 4}, "fc2": {"keep_every": 8}, "conv9": {"keep_every": 8}}
    with caplog.at_level(logging.WARNING, logger="netshrink"):
        kept = _kept(lenet300, overrides)
    assert kept == {"fc1": 4, "fc2": 4, "fc3": 4}
    text = caplog.text
    assert "field 'overrides.fc2' applies to no selected layer (an earlier pattern" in text
    assert "field 'overrides.conv9' applies to no selected layer (it matches none)" in text
    assert "'overrides.fc*'" not in text


def test_layer_fields_must_name_config_fields():
    class Bad(Keep):
        name = "overridetest-bad"
        layer_fields = ("keep_every", "nope")

    with pytest.raises(NetshrinkError, match=r"layer_fields must be a tuple .*'nope'"):
        Bad.validate_class()


def test_builtin_per_layer_fields_are_config_fields():
    for entry in registry.compressors().values():
        entry.obj.validate_class()
    assert registry.get_compressor("bioclust").layer_fields[:3] == ("bits", "k", "noise_scale")
    assert registry.get_compressor("joint").layer_fields == ("sparsities", "min_bits", "max_bits")
