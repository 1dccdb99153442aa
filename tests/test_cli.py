"""The command line: listing, describing, compressing, reporting, clean errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from netshrink import ConfigError, NetshrinkError, hookimpl, registry
from netshrink import cli as cli_module
from netshrink.cli import cli


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _error_lines(output: str) -> int:
    """The number of ``error:`` lines (a first torch import may add its own warning line)."""
    return sum(line.startswith("error:") for line in output.splitlines())


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


# -- packaged recipes ---------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def test_recipes_lists_and_prints_the_packaged_recipes():
    out = run("recipes")
    assert out.exit_code == 0
    assert "lenet5" in out.output and "paper003" in out.output
    assert "The README's main job" in out.output  # the description from the header comment
    shown = run("recipes", "lenet5")
    assert shown.output == (ROOT / "recipes" / "lenet5.yaml").read_text()


def test_recipe_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here: the name resolves in the package
    out = run("validate", "lenet5")
    assert out.exit_code == 0, out.output
    assert "recipe is valid" in out.output


def test_unknown_recipe_name_lists_the_packaged_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args in (["compress", "zoo:lenet5", "--recipe", "lenet"], ["validate", "lenet"],
                 ["recipes", "lenet"]):
        out = CliRunner().invoke(cli, args)
        assert out.exit_code == 2, args
        assert "Did you mean 'lenet5'" in out.output and "paper003" in out.output
        assert "Traceback" not in out.output and _error_lines(out.output) == 1


def test_an_existing_file_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lenet5").write_text("steps: []\n")
    out = CliRunner().invoke(cli, ["validate", "lenet5"])
    assert out.exit_code == 2 and "unknown extension" in out.output
    missing = CliRunner().invoke(cli, ["validate", "sub/lenet5"])  # a path, never a name
    assert missing.exit_code == 2 and "does not exist" in missing.output
    (tmp_path / "paper003").mkdir()
    folder = CliRunner().invoke(cli, ["validate", "paper003"])
    assert folder.exit_code == 2 and "'paper003' is a folder" in folder.output


def test_compress_takes_the_model_from_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - compressor: magnitude\n")
    out = CliRunner().invoke(cli, ["compress", "--recipe", str(recipe)])
    assert out.exit_code == 2 and "no model: pass MODEL or set 'model' in the recipe" in out.output


# -- errors: one line, exit code 2 --------------------------------------------------------------


def _raising(exc: Exception):
    """A throwaway sub-command that raises ``exc``; the caller removes it."""

    @cli.command(name="raise-for-test")
    def raiser() -> None:
        raise exc

    return raiser


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (PermissionError(13, "Permission denied", "/x/out/m.nsk"),
         "error: cannot use /x/out/m.nsk: Permission denied"),
        (NetshrinkError("field [bold]bits[/bold] in [/x]"),
         "error: field [bold]bits[/bold] in [/x]"),
    ],
    ids=["os-error", "markup-like-text"],
)
def test_errors_are_one_clean_line(exc, expected):
    _raising(exc)
    try:
        out = CliRunner().invoke(cli, ["raise-for-test"])
    finally:
        cli.commands.pop("raise-for-test", None)
    assert out.exit_code == 2
    assert out.output.strip().startswith(expected) and "Traceback" not in out.output
    assert _error_lines(out.output) == 1


def test_bad_thread_count_is_one_line(monkeypatch, capsys):
    assert cli_module._parse_threads("") is None and cli_module._parse_threads("3") == 3
    monkeypatch.setenv("NETSHRINK_THREADS", "two")
    monkeypatch.setattr(sys, "argv", ["netshrink", "methods"])
    with pytest.raises(SystemExit) as info:
        cli_module.main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "NETSHRINK_THREADS must be a positive integer" in err and "'two'" in err
    with pytest.raises(ConfigError):
        cli_module._parse_threads("0")


# -- plugin commands: loaded for --help only when a plugin may have some ------------------------


class _CommandPlugin:
    @hookimpl
    def register_commands(self, cli: click.Group) -> None:
        @cli.command(name="clitest-hello")
        def hello() -> None:
            """Say hello (a test command)."""
            click.echo("hello")


@pytest.fixture
def command_plugin(monkeypatch):
    monkeypatch.setattr(cli_module, "_plugin_commands_added", False)
    registry.register_plugin(_CommandPlugin(), name="clitest-commands")
    try:
        yield
    finally:
        registry.unregister_plugin("clitest-commands")
        cli.commands.pop("clitest-hello", None)


def test_help_loads_plugins_only_when_one_may_add_commands(command_plugin, monkeypatch):
    monkeypatch.setattr(cli_module, "_command_plugin_modules", lambda: [])
    assert "clitest-hello" not in run("--help").output  # nothing declared: plugins not asked
    monkeypatch.setattr(cli_module, "_command_plugin_modules", lambda: ["some_plugin"])
    assert "clitest-hello" in run("--help").output


def test_an_unknown_command_loads_the_plugins(command_plugin, monkeypatch):
    monkeypatch.setattr(cli_module, "_command_plugin_modules", lambda: [])
    monkeypatch.setattr(cli_module, "_plugin_entry_points", lambda: ["an-entry-point"])
    out = run("clitest-hello")
    assert out.exit_code == 0 and out.output == "hello\n"


def test_plugin_sources_are_scanned_without_importing(tmp_path, monkeypatch):
    for name, body in (("clitest_with", "def register_commands(cli): ...\n"),
                       ("clitest_without", "raise RuntimeError('imported')\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli_module._may_add_commands("clitest_with")
    assert not cli_module._may_add_commands("clitest_without")  # and it was never run
    assert cli_module._may_add_commands("clitest_missing")  # unsure: load it and see
    assert not cli_module._may_add_commands("netshrink.plugins")  # built-ins add no command
