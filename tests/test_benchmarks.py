"""The benchmark harness: its catalogue plans on every model, and one small run writes the page."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import netshrink as ns
from netshrink.pipeline import _info_for, plan
from netshrink.recipe import Recipe

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def catalogue(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import catalogue

    return catalogue


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
def test_every_catalogue_method_plans_on_its_model(catalogue, quick):
    """Compressor names, every config field and every selector of every benchmark row are valid
    for the model it runs on (so a long run cannot die on a typo an hour in)."""
    for model_name, (spec, data_name) in catalogue.MODELS.items():
        if spec.startswith("timm:"):
            pytest.importorskip("timm")
        data = ns.datasets.load(data_name)
        model = ns.load_model(spec, **data.model_options())
        info = _info_for(model, data)
        for label, steps in catalogue.netshrink_methods(model_name, quick).items():
            try:
                plan(Recipe(steps=steps), model, info, data)
            except ns.NetshrinkError as exc:  # pragma: no cover - the message is the point
                pytest.fail(f"{model_name} / {label}: {exc}")


def test_one_small_run_writes_page_plot_and_verdict(tmp_path):
    out = tmp_path / "benchmarks.md"
    env = {**os.environ, "NETSHRINK_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--models", "lenet300",
         "--only", "quantize 4-bit,dynamic int8", "--out", str(out), "--timeout", "300"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    page = out.read_text()
    assert "Produced by `NETSHRINK_THREADS=1 python -m benchmarks --quick" in page
    rows = [line for line in page.splitlines() if line.startswith("| ")]
    labels = [r.split("|")[1].strip() for r in rows[1:]]
    assert labels == ["dense", "quantize 4-bit/ch", "PyTorch dynamic int8"]
    assert "failed" not in page
    assert "vs **PyTorch dynamic int8**" in page  # a verdict computed from the two rows
    assert (tmp_path / "benchmarks" / "pareto_lenet300.png").stat().st_size > 10_000
