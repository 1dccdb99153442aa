"""Layer selector semantics and its error message."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

import netshrink as ns
from netshrink.errors import SelectionError
from netshrink.selector import LayerSelector


@pytest.fixture(scope="module")
def vgg():
    return ns.load_model("zoo:vgg_small")


def names(selector: LayerSelector, model, head=None):
    return [n for n, _ in selector.resolve(model, head=head)]


def test_types_and_order(vgg):
    convs = names(LayerSelector(types=["Conv2d"]), vgg)
    assert convs == [f"features.{i}" for i in (0, 3, 7, 10, 14, 17)]
    assert names(LayerSelector(types=["Linear"]), vgg, head="classifier") == ["fc1"]
    assert names(LayerSelector(types=["Linear"], protect_head=False), vgg, head="classifier") == [
        "fc1",
        "classifier",
    ]


def test_globs_regex_exclude(vgg):
    assert names(LayerSelector(types=["Conv2d"], names=["features.1*"]), vgg) == [
        "features.10",
        "features.14",
        "features.17",
    ]
    assert names(LayerSelector(types=["Conv2d"], names=["re:^features\\.(0|3)$"]), vgg) == [
        "features.0",
        "features.3",
    ]
    assert "features.0" not in names(LayerSelector(types=["Conv2d"], exclude=["features.0"]), vgg)


def test_sizes_channels_skips(vgg):
    assert names(LayerSelector(types=["Conv2d"], min_channels=128), vgg) == [
        "features.14",
        "features.17",
    ]
    assert names(LayerSelector(types=["Conv2d"], max_channels=32), vgg) == [
        "features.0",
        "features.3",
    ]
    assert names(LayerSelector(types=["Conv2d"], max_params=300), vgg) == ["features.0"]
    assert names(LayerSelector(types=["Conv2d"], min_params=100_000), vgg) == ["features.17"]
    assert names(LayerSelector(types=["Conv2d"], skip_first=1, skip_last=2), vgg) == [
        "features.3",
        "features.7",
        "features.10",
    ]


def test_skip_depthwise():
    from torch import nn

    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 1))
    assert names(LayerSelector(types=["Conv2d"], skip_depthwise=True), model) == ["1"]


def test_empty_selection_explains(vgg):
    with pytest.raises(SelectionError) as err:
        LayerSelector(types=["Conv2d"], min_channels=1000).resolve(vgg)
    msg = str(err.value)
    assert "min_channels" in msg and "selected no layers" in msg
    assert "Conv2d x6" in msg and "Linear x2" in msg


def test_bad_fields():
    with pytest.raises(ValidationError, match="unknown layer type"):
        LayerSelector(types=["Conv"])
    with pytest.raises(ValidationError, match="Extra inputs"):
        LayerSelector(typez=["Conv2d"])
    with pytest.raises(ValidationError):
        LayerSelector(min_params=-1)


@pytest.mark.parametrize("field", ["names", "exclude"])
def test_bad_regex_fails_validation_not_the_run(field):
    with pytest.raises(ValidationError, match=r"pattern 're:fc\[1' is not a valid regex"):
        LayerSelector(**{field: ["re:fc[1"]})
    with pytest.raises(ns.RecipeError) as info:
        ns.step("magnitude", select={field: ["re:fc[1"]})
    text = str(info.value)
    assert f"field 'select.{field}'" in text
    assert "valid string" not in text  # the preset-name branch of the union is not the problem
