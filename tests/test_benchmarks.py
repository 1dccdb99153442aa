"""The benchmark harness: every page's compressions plan on their models, pages use only the
public API, the statistics are right, and the runner writes a page with command and commit."""

from __future__ import annotations

import ast
import subprocess
import types
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import netshrink as ns
from netshrink.cli import cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def bench(monkeypatch):
    """The ``benchmarks`` package (it lives at the repository root, not in the install)."""
    monkeypatch.syspath_prepend(str(ROOT))
    import benchmarks.__main__ as runner
    from benchmarks import harness
    from benchmarks.pages import PAGES

    return types.SimpleNamespace(runner=runner, h=harness, PAGES=PAGES)


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
def test_every_page_case_plans_on_its_model(bench, quick, tmp_path):
    """Compressor names, config fields and selectors of every compression a page runs are valid
    for its model (`netshrink validate`), so a long run cannot die on a typo an hour in."""
    checked = 0
    for page_name, page in bench.PAGES.items():
        for label, (model, steps) in page.cases(quick).items():
            spec, data, _ = bench.h.MODELS[model]
            if spec.startswith("timm:"):
                pytest.importorskip("timm")
            recipe = tmp_path / "r.yaml"
            recipe.write_text(yaml.safe_dump({"steps": steps}))
            args = ["validate", str(recipe), "--model", spec, "--data", data]
            out = CliRunner().invoke(cli, args)
            assert out.exit_code == 0, f"{page_name} / {label}: {out.output}{out.exception or ''}"
            checked += 1
    assert checked > 30


def _netshrink_uses(tree: ast.AST) -> list[str]:
    """Every netshrink name a module imports or reads (``ns.X``, ``h.ns.X``)."""
    used = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            used += [a.name for a in node.names if a.name.startswith("netshrink")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("netshrink"):
            used += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute) and (
            (isinstance(node.value, ast.Name) and node.value.id == "ns")
            or (isinstance(node.value, ast.Attribute) and node.value.attr == "ns")
        ):
            used.append(f"netshrink.{node.attr}")
    return used


def test_benchmarks_use_only_the_public_api():
    """No ``netshrink.<submodule>`` import, no name outside ``netshrink.__all__``."""
    allowed = {"netshrink", *(f"netshrink.{n}" for n in ns.__all__)}
    files = sorted((ROOT / "benchmarks").rglob("*.py"))
    assert len(files) >= 10
    bad = [f"{f.relative_to(ROOT)}: {name}" for f in files
           for name in _netshrink_uses(ast.parse(f.read_text())) if name not in allowed]
    assert not bad, bad
    # The check itself can fail:
    assert _netshrink_uses(ast.parse("from netshrink.training import evaluate")) == [
        "netshrink.training.evaluate"]


def test_intervals_and_verdicts(bench):
    h = bench.h
    lo, hi = h.wilson(0.5, 100)
    assert (round(lo, 3), round(hi, 3)) == (0.404, 0.596)
    assert h.wilson(1.0, 360)[1] == 1.0 and h.wilson(1.0, 360)[0] > 0.98
    # Seeds share the test set: the interval is on its n, however many seeds.
    assert h.acc_cell([0.9, 0.92], 360) == "91.00 ± 1.41% [87.6, 93.5] n=360"
    assert h.acc_compare([0.99], [0.90], 360) == "higher"
    assert h.acc_compare([0.90], [0.99], 360) == "lower"
    assert h.acc_compare([0.97], [0.98], 360) == "indistinguishable"
    assert h.at_least([0.99], 360, 0.95) == "**met**"
    assert h.at_least([0.90], 360, 0.95) == "**missed**"
    assert h.at_least([0.95], 360, 0.95).startswith("undecided")


def test_isolated_turns_failures_into_rows(bench):
    out = bench.h.isolated(bench.h.reference, "no-such-model", timeout=120)
    assert out["error"].startswith("KeyError") and out["peak_rss_mb"] > 0
    assert bench.h.isolated(bench.h.reference, "lenet300", timeout=0.01) == {
        "error": "timed out after 0 s"}


def test_runner_writes_page_with_command_commit_and_intervals(bench, tmp_path, monkeypatch):
    """A tiny page through the same runner as every page: header, table, plot."""
    h = bench.h

    def run(b):
        model, data = h.reference("lenet300")
        runs = h.compress(model, [ns.step("quantize", bits=4)], data, b.seeds)
        lat = h.speedups(model, {"q": runs.first.model}, data.val.tensors[0][:1], rounds=2,
                         min_time=0.01)["q"]
        path, link = b.plot("tiny.png")
        h.save_plot(lambda ax: ax.plot([1, 2], [runs.accs[0], runs.accs[-1]]), path)
        return [*h.table(["method", "acc", "speedup b1"], [["quantize 4-bit", runs.acc(), lat[1]]]),
                f"![tiny]({link})"]

    page = types.SimpleNamespace(TITLE="Tiny", OUT="benchmarks/tiny.md", ABOUT=["About it."],
                                 cases=lambda quick: {}, run=run)
    monkeypatch.setitem(bench.PAGES, "tiny", page)
    monkeypatch.setenv("NETSHRINK_THREADS", "1")
    out = bench.runner.main(["tiny", "--quick", "--seeds", "2", "--out", str(tmp_path)])
    assert out == tmp_path / "benchmarks" / "tiny.md"
    text = out.read_text()
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()
    assert f"Produced by `NETSHRINK_THREADS=1 python -m benchmarks tiny --quick --seeds 2` at " \
           f"commit `{head}" in text
    assert "load average (1 min)" in text and "About it." in text
    row = next(line for line in text.splitlines() if line.startswith("| quantize 4-bit"))
    assert " ± " in row and "n=360" in row  # two seeds: mean ± std, interval on the test n
    assert "x (" in row  # the speedup with its spread
    assert (tmp_path / "benchmarks" / "tiny.png").stat().st_size > 5_000
