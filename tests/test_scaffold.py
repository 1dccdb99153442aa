"""``netshrink plugin new``: scaffold a plugin into a temp directory, pip-install it (offline) into
a throwaway virtual environment layered on this one, and use it from fresh processes: listing,
describe, a recipe, the Python API, NETSHRINK_PLUGINS and blocking by name."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from netshrink.errors import NetshrinkError
from netshrink.scaffold import plugin_group, plugin_names, scaffold_plugin

NAME = "scaffoldtest"
DIST = f"netshrink-{NAME}"


def _venv_python(root: Path) -> Path:
    return root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def make_layered_venv(root: Path) -> Path:
    """A venv whose site-packages also sees this interpreter's (torch, netshrink, pip...).

    ``--system-site-packages`` would expose the *base* interpreter's packages, not this
    virtualenv's, so a ``.pth`` file adds ours with ``site.addsitedir`` (which also runs our
    ``.pth`` files, e.g. netshrink's editable-install hook). Installing into it leaves the
    project's environment untouched, so parallel test runs never see the plugin.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True,
                   capture_output=True, timeout=120)
    python = _venv_python(root)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]
    Path(purelib, "_netshrink_parent_env.pth").write_text(
        f"import site; site.addsitedir({ours!r})\n")
    return python


def _env(**overrides: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NETSHRINK_PLUGINS", "NETSHRINK_DISABLE_PLUGINS")}
    env["NETSHRINK_PROGRESS"] = "0"
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


class Installed:
    """The scaffolded distribution installed in a layered venv."""

    def __init__(self, python: Path, dist_dir: Path, work: Path) -> None:
        self.python, self.dist_dir, self.work = python, dist_dir, work

    def run(self, *args: str, check: bool = True, timeout: int = 300,
            **env: str | None) -> subprocess.CompletedProcess[str]:
        """Run ``python *args`` in a fresh process of the layered venv."""
        proc = subprocess.run([str(self.python), *args], cwd=self.work, env=_env(**env),
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def cli(self, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
        """``netshrink *args`` (the console script's ``main``) in a fresh process."""
        return self.run("-m", "netshrink.cli", *args, **kwargs)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Iterator[Installed]:
    work = tmp_path_factory.mktemp("scaffold")
    # Through the command itself, as a user would type `netshrink plugin new NAME --dest DIR`.
    result = CliRunner().invoke(plugin_group(), ["new", NAME, "--dest", str(work)])
    assert result.exit_code == 0, result.output
    dist_dir = work / DIST
    assert f"created {dist_dir}" in result.output
    python = make_layered_venv(work / "venv")
    pip = [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation",
           "--no-index", "-q", "-e", str(dist_dir)]
    proc = subprocess.run(pip, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    try:
        yield Installed(python, dist_dir, work)
    finally:
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", DIST],
                       capture_output=True, timeout=120)
        shutil.rmtree(work / "venv", ignore_errors=True)


def test_scaffold_layout(tmp_path):
    root = scaffold_plugin("my_method", tmp_path)
    assert root == tmp_path / "netshrink-my-method"
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == [".gitignore", "README.md", "netshrink_my_method/__init__.py",
                     "pyproject.toml", "recipe.yaml", "tests/test_my_method.py"]
    pyproject = (root / "pyproject.toml").read_text()
    assert '[project.entry-points.netshrink]\nmy-method = "netshrink_my_method"' in pyproject
    module = (root / "netshrink_my_method/__init__.py").read_text()
    assert "@netshrink.hookimpl\ndef register_compressors(register):" in module
    assert 'name = "my-method"' in module and "class MyMethodConfig(CompressorConfig)" in module
    assert "conformance_cases(MyMethod)" in (root / "tests/test_my_method.py").read_text()
    for path in root.rglob("*.py"):
        compile(path.read_text(), str(path), "exec")  # the templates are valid Python


def test_scaffold_refuses_to_overwrite_and_bad_names(tmp_path):
    scaffold_plugin("dup", tmp_path)
    with pytest.raises(NetshrinkError, match="already exists; pass --force"):
        scaffold_plugin("dup", tmp_path)
    (tmp_path / "netshrink-dup" / "notes.txt").write_text("mine")
    scaffold_plugin("dup", tmp_path, force=True)
    assert (tmp_path / "netshrink-dup" / "notes.txt").read_text() == "mine"
    for bad in ("Bad Name", "1abc", "a--b", "", "x.y"):
        with pytest.raises(NetshrinkError, match="not valid"):
            plugin_names(bad)
    assert plugin_names("netshrink-foo_bar") == {
        "name": "foo-bar", "dist": "netshrink-foo-bar", "module": "netshrink_foo_bar",
        "cls": "FooBar"}
    result = CliRunner().invoke(plugin_group(), ["new", "Bad Name", "--dest", str(tmp_path)])
    assert result.exit_code != 0 and "not valid" in str(result.exception or result.output)


def test_installed_plugin_is_listed(installed):
    table = installed.cli("plugins").stdout
    assert NAME in table and DIST in table and "0.1.0" in table


def test_describe_shows_its_config(installed):
    out = installed.cli("describe", NAME).stdout
    assert "sparsity" in out and "Fraction of each selected layer's weights to remove." in out
    assert f"({DIST})" in out


def test_recipe_using_the_plugin(installed):
    out_dir = installed.work / "out"
    proc = installed.cli("compress", "zoo:lenet300", "--data", "digits", "--recipe",
                         str(installed.dist_dir / "recipe.yaml"), "--out", str(out_dir),
                         "--no-latency", timeout=480)
    artifact = out_dir / "lenet300.nsk"
    assert artifact.is_file(), proc.stdout
    size = artifact.stat().st_size
    assert f"{size:,} bytes" in proc.stdout
    report = json.loads(artifact.with_suffix(".report.json").read_text())
    assert report["steps"][0]["compressor"] == NAME
    assert report["storage_bytes"] == size < report["dense_bytes"] * 0.75


def test_python_api_in_a_fresh_process(installed):
    code = """
import json, netshrink as ns
from netshrink_scaffoldtest import Scaffoldtest
assert ns.registry.get_compressor("scaffoldtest") is Scaffoldtest
info = next(i for i in ns.registry.list_plugins() if i.name == "scaffoldtest")
m = ns.load_model("zoo:lenet300", input_size=8)
r = ns.compress(m, [ns.step("scaffoldtest", sparsity=0.8)], latency=False)
print(json.dumps({"dist": info.distribution, "version": info.version, "builtin": info.builtin,
                  "registered": info.registered,
                  "zeros": round(float((r.model.fc1.weight == 0).float().mean()), 3)}))
"""
    got = json.loads(installed.run("-c", code).stdout)
    assert got == {"dist": DIST, "version": "0.1.0", "builtin": False,
                   "registered": {"compressors": [NAME]}, "zeros": 0.8}


# Each setting is applied the way a user would (environment variables read when plugins load);
# one fresh process goes through them, with registry.reset() between settings.
LOADING = """
import json, os
from netshrink import registry
out = {}
for label, env in json.loads(os.environ["SETTINGS"]).items():
    for key in ("NETSHRINK_PLUGINS", "NETSHRINK_DISABLE_PLUGINS"):
        os.environ.pop(key, None)
    os.environ.update(env)
    registry.reset()
    out[label] = {"plugins": sorted(i.name for i in registry.list_plugins()),
                  "compressors": sorted(registry.compressors())}
print(json.dumps(out))
"""

SETTINGS = {
    "default": {},
    "only-builtins": {"NETSHRINK_PLUGINS": ""},
    "only-it": {"NETSHRINK_PLUGINS": NAME},
    "only-another": {"NETSHRINK_PLUGINS": "someotherplugin"},
    "block-it": {"NETSHRINK_DISABLE_PLUGINS": NAME},
    "block-builtin": {"NETSHRINK_DISABLE_PLUGINS": "magnitude"},
}


@pytest.fixture(scope="module")
def loading(installed) -> dict[str, dict[str, list[str]]]:
    return json.loads(installed.run("-c", LOADING, SETTINGS=json.dumps(SETTINGS)).stdout)


def test_netshrink_plugins_env_limits_loading(loading):
    assert NAME in loading["default"]["plugins"] and NAME in loading["default"]["compressors"]
    assert NAME not in loading["only-builtins"]["plugins"]
    assert "magnitude" in loading["only-builtins"]["plugins"]
    assert NAME in loading["only-it"]["plugins"]
    assert NAME not in loading["only-another"]["plugins"]
    assert "magnitude" in loading["only-another"]["compressors"]


def test_blocking_by_name(installed, loading):
    assert NAME not in loading["block-it"]["plugins"]
    assert NAME not in loading["block-it"]["compressors"]
    assert "magnitude" in loading["block-it"]["compressors"]
    # Built-ins are blocked the same way.
    assert "magnitude" not in loading["block-builtin"]["plugins"]
    assert "magnitude" not in loading["block-builtin"]["compressors"]
    assert NAME in loading["block-builtin"]["compressors"]
    # And the CLI says so when a blocked compressor is asked for.
    proc = installed.cli("describe", NAME, check=False, NETSHRINK_DISABLE_PLUGINS=NAME)
    assert proc.returncode == 2 and f"Unknown compressor '{NAME}'" in proc.stderr


@pytest.mark.slow
def test_scaffolded_tests_pass(installed):
    # The generated tests: the conformance suite through the pytest11 plugin, plus its own.
    proc = installed.run("-m", "pytest", "-q", "-p", "no:cacheprovider", str(installed.dist_dir),
                         check=False, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def test_netshrink_cli_has_the_plugin_command(tmp_path):
    from netshrink import cli

    assert "plugin" in cli.cli.commands, \
        "netshrink.cli must attach netshrink.scaffold.plugin_group() as `netshrink plugin`"
    result = CliRunner().invoke(cli.cli, ["plugin", "new", "viacli", "--dest", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "netshrink-viacli" / "netshrink_viacli" / "__init__.py").is_file()
    bad = CliRunner().invoke(cli.cli, ["plugin", "new", "viacli", "--dest", str(tmp_path)])
    assert bad.exit_code == 2 and "already exists" in bad.output
