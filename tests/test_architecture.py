"""The import architecture, checked on the source: layers point one way, core has no import
cycles, and plugins use only the public API (``from netshrink import ...``).

An import-linter contract cannot see this layout (``netshrink.plugins`` and ``netshrink.registry``
live outside ``core/``, joined by setuptools' ``package-dir``), so the graph is read with ``ast``:
every import counts, at module level or inside a function, except under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"netshrink": ROOT / "core", "netshrink.registry": ROOT / "registry",
            "netshrink.plugins": ROOT / "plugins"}

#: Top to bottom: a unit may import units of its own layer or below, never above. Every module
#: of core/ and registry/ must be placed here (a new module fails the test until it is).
LAYERS: list[set[str]] = [
    {"cli", "docgen", "scaffold", "testing"},  # tools
    {"__root__"},  # the public surface, netshrink/__init__.py
    # the run; the search runs it (layer_search re-exports its search_* parts)
    {"pipeline", "layer_search", "search_candidates", "search_checkpoint", "search_cli",
     "search_latency", "search_pareto", "search_prefix", "search_recipe", "search_run",
     "search_scan", "search_solver", "search_verify"},
    {"report", "report_render", "export"},  # reads what the pipeline built; exports it
    {"context"},  # what a compressor receives (it can size the artifact)
    {"artifact", "manifest"},  # builds and reads the artifact; the manifest's schema
    {"models", "datasets", "recipe", "executors"},  # resolved through the registry
    {"registry"},
    {"training", "lowrank"},
    {"compressor"},
    {"runtime"},  # the packed run-time form of encodings
    {"selector", "adapters", "data", "encodings", "modules", "metrics", "attention"},  # contracts
    {"checkedfile", "config", "errors", "fileio", "progress", "timelimit", "version"},
]
LAYER_OF = {unit: depth for depth, units in enumerate(LAYERS) for unit in units}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            if "build" in path.parts:
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _imports(module: str, path: Path) -> set[str]:
    """The netshrink modules ``module`` imports (outside ``if TYPE_CHECKING:`` blocks)."""
    tree = ast.parse(path.read_text(), str(path))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "netshrink")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "netshrink":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in MODULES else base)
    return out


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _unit(module: str) -> str | None:
    """The layer unit of a core/registry module (``netshrink.encodings.kinds`` -> ``encodings``);
    None for plugins."""
    if module.startswith("netshrink.plugins"):
        return None
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__root__"


def test_every_core_module_has_a_layer():
    units = {_unit(m) for m in MODULES} - {None}
    assert units - set(LAYER_OF) == set(), "place new core modules in LAYERS"


def test_layers_point_down():
    bad = []
    for module, targets in GRAPH.items():
        unit = _unit(module)
        if unit is None:
            continue
        for target in targets:
            other = _unit(target)
            if other is not None and other != unit and LAYER_OF[other] < LAYER_OF[unit]:
                bad.append(f"{module} imports {target} (a higher layer)")
    assert bad == []


def test_no_import_cycles_in_core():
    """Tarjan's strongly connected components over the core units: none larger than one."""
    edges: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        unit = _unit(module)
        if unit is None:
            continue
        edges.setdefault(unit, set()).update(
            u for t in targets if (u := _unit(t)) is not None and u != unit
        )
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in list(edges):
        if node not in index:
            visit(node)
    assert cycles == []


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if m.startswith("netshrink.plugins.")), ids=str
)
def test_plugins_import_only_the_public_api(module):
    own = ".".join(module.split(".")[:3])
    bad = sorted(
        t for t in GRAPH[module] if t != "netshrink" and t != own and not t.startswith(own + ".")
    )
    assert bad == [], f"{module}: use `from netshrink import ...` (the public API) instead"


def test_the_checks_see_a_violation(tmp_path):
    """The graph reader finds a lazy, aliased import of an internal module (so the checks above
    can fail), and ignores one under TYPE_CHECKING."""
    source = tmp_path / "x.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from netshrink.pipeline import compress\n"
        "def f():\n    import netshrink.training as t\n    from netshrink import encodings\n"
    )
    found = _imports("netshrink.plugins.x", source)
    assert found == {"netshrink.training", "netshrink.encodings"}
