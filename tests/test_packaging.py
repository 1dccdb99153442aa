"""Packaging and start-up: the public API resolves lazily (``import netshrink`` and
``netshrink --help`` do not import torch), and the recipes under ``recipes/`` ship in the wheel
as package ``netshrink.recipes``."""

from __future__ import annotations

import ast
import fnmatch
import json
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest

import netshrink as ns

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "matplotlib", "torchvision")

# Runs the console script's main() in a fresh interpreter, then names the heavy modules loaded.
PROBE = f"""
import json, sys
from netshrink.cli import main
sys.argv = ["netshrink", *json.loads(sys.argv[1])]
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print("PROBE", json.dumps([code, [m for m in {HEAVY} if m in sys.modules]]))
"""


def _probe(*args: str) -> tuple[int, list[str], str]:
    """Exit code, heavy modules loaded, and the output of ``netshrink ARGS`` in a subprocess."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(args)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    line = next(x for x in proc.stdout.splitlines() if x.startswith("PROBE "))
    code, loaded = json.loads(line[len("PROBE "):])
    return code or 0, loaded, proc.stdout + proc.stderr


def test_importing_netshrink_and_the_cli_does_not_import_torch():
    code = f"import sys, netshrink, netshrink.cli; print([m for m in {HEAVY} if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


@pytest.mark.parametrize(("args", "exit_code"), [
    (["--help"], 0), (["compress", "--help"], 0), (["recipes", "--help"], 0),
    (["report", "--help"], 0), ([], 2),  # no command: the help, as a usage error
], ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_help_does_not_import_torch(args, exit_code):
    code, loaded, out = _probe(*args)
    assert code == exit_code, out
    assert loaded == [], f"netshrink {' '.join(args)} imported {loaded}"
    assert "Usage: netshrink" in out


# -- the public API, resolved on first use ------------------------------------------------------


def test_every_public_name_resolves_to_its_defining_module():
    assert set(ns._EXPORTS) == set(ns.__all__)
    for name in ns.__all__:
        value = getattr(ns, name)
        module = sys.modules[ns._EXPORTS[name]]
        expected = module if module.__name__ == f"netshrink.{name}" else getattr(module, name)
        assert value is expected, name
    assert set(ns.__all__) <= set(dir(ns))


def test_type_checking_block_imports_exactly_the_public_api():
    """Type checkers and IDEs read the ``if TYPE_CHECKING:`` imports: the same names as __all__,
    from the modules the lazy table names."""
    tree = ast.parse((ROOT / "core" / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If)
                 and ast.unparse(n.test) == "TYPE_CHECKING")
    imported: dict[str, str] = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom)
        for alias in node.names:
            module = node.module if node.module != "netshrink" else f"netshrink.{alias.name}"
            imported[alias.asname or alias.name] = module
    assert imported == ns._EXPORTS


def test_submodules_and_unknown_names():
    assert ns.lowrank.truncated_svd is ns.truncated_svd
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        _ = ns.nonexistent
    from netshrink import Compressor, hookimpl  # the plugin authors' import line

    assert Compressor.__module__ == "netshrink.compressor" and callable(hookimpl)


# -- packaged recipes ---------------------------------------------------------------------------


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _folder(package: str, package_dir: dict[str, str]) -> Path:
    """The source folder of ``package`` under setuptools' ``package-dir`` (longest prefix)."""
    for prefix in sorted(package_dir, key=len, reverse=True):
        if package == prefix or package.startswith(prefix + "."):
            rest = package[len(prefix):].lstrip(".").split(".") if package != prefix else []
            return ROOT.joinpath(package_dir[prefix], *[p for p in rest if p])
    return ROOT.joinpath(*package.split("."))


def test_package_data_covers_every_recipe():
    tool = _pyproject()["tool"]["setuptools"]
    assert "netshrink.recipes" in tool["packages"]
    assert _folder("netshrink.recipes", tool["package-dir"]) == ROOT / "recipes"
    patterns = tool["package-data"]["netshrink.recipes"]
    shipped = sorted(
        p.name for p in (ROOT / "recipes").iterdir()
        if p.is_file() and p.suffix != ".py" and p.name != ".DS_Store"
    )
    assert shipped, "recipes/ is empty"
    missing = [n for n in shipped if not any(fnmatch.fnmatch(n, pat) for pat in patterns)]
    assert missing == [], f"recipes not in the wheel's package data: {missing}"


def test_every_package_data_pattern_matches_a_file():
    """A pattern that matches nothing ships nothing (``netshrink = ["recipes/*.yaml"]`` pointed
    at core/recipes/, which does not exist)."""
    tool = _pyproject()["tool"]["setuptools"]
    for package, patterns in tool["package-data"].items():
        folder = _folder(package, tool["package-dir"])
        for pattern in patterns:
            assert list(folder.glob(pattern)), f"package-data {package}: {pattern!r} in {folder}"


def test_packaged_recipes_are_the_recipes_folder():
    """importlib.resources sees what the wheel carries: every recipes/*.yaml, byte for byte."""
    packaged = {p.name: p for p in files("netshrink.recipes").iterdir() if p.name.endswith(".yaml")}
    on_disk = {p.name: p for p in (ROOT / "recipes").glob("*.yaml")}
    assert sorted(packaged) == sorted(on_disk)
    for name, path in on_disk.items():
        assert packaged[name].read_bytes() == path.read_bytes()
