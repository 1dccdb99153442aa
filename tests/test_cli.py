"""The command line: listing, describing, compressing, reporting, clean errors."""

from __future__ import annotations

import json

from click.testing import CliRunner

from netshrink.cli import cli


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_methods_and_describe():
    out = run("methods")
    assert out.exit_code == 0 and "magnitude" in out.output and "quantize" in out.output
    out = run("describe", "magnitude")
    assert out.exit_code == 0
    assert (
        "sparsity" in out.output and ">= 0.0" in out.output and "Fraction of weights" in out.output
    )
    schema = json.loads(run("describe", "quantize", "--json").output)
    assert schema["properties"]["bits"]["maximum"] == 8


def test_unknown_method_is_one_clean_line():
    out = CliRunner().invoke(cli, ["describe", "magnitud"])
    assert out.exit_code == 2
    assert "Did you mean 'magnitude'" in out.output and "Traceback" not in out.output


def test_plugins_datasets_selectors():
    assert "digits28" in run("datasets").output
    assert "convs-except-first" in run("selectors").output
    listing = json.loads(run("plugins", "--json").output)
    assert any(p["name"] == "zoo" for p in listing)


def test_compress_and_report(tmp_path, lenet300):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - compressor: magnitude\n    config: {sparsity: 0.75}\n")
    out = run(
        "compress",
        "zoo:lenet300",
        "--data",
        "digits28",
        "--recipe",
        str(recipe),
        "--out",
        str(tmp_path / "out"),
        "--no-latency",
    )
    assert out.exit_code == 0, out.output
    artifact = tmp_path / "out" / "lenet300.nsk"
    assert artifact.is_file() and (tmp_path / "out" / "lenet300.report.json").is_file()
    size = artifact.stat().st_size
    assert f"{size:,} bytes; report says {size:,}" in out.output.replace("\n", "")
    assert "test accuracy" in out.output
    rep = run("report", str(artifact))
    assert rep.exit_code == 0 and "fc1" in rep.output and f"{size:,} bytes" in rep.output


def test_bad_recipe_names_step_and_field(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - compressor: quantize\n    config: {bits: 1}\n")
    out = CliRunner().invoke(
        cli, ["validate", str(recipe), "--model", "zoo:lenet300", "--data", "digits28"]
    )
    assert out.exit_code == 2
    assert "step 0 (quantize)" in out.output and "config.bits" in out.output
    assert "Traceback" not in out.output


def test_validate_ok(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - compressor: magnitude\n    select: convs-except-first\n")
    out = run("validate", str(recipe), "--model", "zoo:lenet5", "--data", "digits28")
    assert out.exit_code == 0 and "conv2" in out.output and "valid" in out.output
