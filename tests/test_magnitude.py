"""magnitude: the warning when one global threshold all but empties a layer."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from netshrink import CompressionContext
from netshrink.plugins.magnitude import Magnitude


def _two_scales() -> tuple[nn.Sequential, list[tuple[str, nn.Module]]]:
    """Two layers whose weights differ in scale by 1000x: a global threshold reaches the small
    one first."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 20), nn.Linear(20, 20))
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.0)
        model[1].weight.uniform_(0.0005, 0.001)
    return model, [("0", model[0]), ("1", model[1])]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.getMessage().startswith("magnitude:")]


def test_global_scope_names_the_layer_it_empties(caplog):
    model, layers = _two_scales()
    with caplog.at_level(logging.WARNING, logger="netshrink"):
        result = Magnitude({"sparsity": 0.5, "scope": "global"}).compress(
            model, layers, CompressionContext())
    assert model[1].weight.count_nonzero() == 0
    assert {r.name: r.details["sparsity"] for r in result.records} == {"0": 0.0, "1": 1.0}
    (message,) = _warnings(caplog)
    assert "1 layer(s): 1 (100.00%)" in message and "scope 'layer'" in message


def test_no_warning_when_every_layer_keeps_weights(caplog):
    for scope in ("layer", "global"):
        model, layers = _two_scales()
        if scope == "global":
            with torch.no_grad():
                model[1].weight.uniform_(0.5, 1.0)
        with caplog.at_level(logging.WARNING, logger="netshrink"):
            Magnitude({"sparsity": 0.5, "scope": scope}).compress(
                model, layers, CompressionContext())
        assert model[1].weight.count_nonzero() > 0
    assert _warnings(caplog) == []
