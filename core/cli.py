"""The ``netshrink`` command line: plugins, methods, describe, compress, report, datasets, recipes.

Plugins add sub-commands through the ``register_commands(cli)`` hook. Start-up stays light:
torch, the registry and the pipeline are imported inside the commands that use them, and
``netshrink --help`` loads the plugins only when one of them may add a command
(:func:`_command_plugin_modules`).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from netshrink.errors import ArtifactError, ConfigError, NetshrinkError, RecipeError
from netshrink.scaffold import plugin_group

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint
    from importlib.resources.abc import Traversable

    from netshrink.artifact import read_manifest
    from netshrink.recipe import Recipe
    from netshrink.report import Report

# Reports are wide: keep them readable when output goes to a file or CI log.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

#: torch CPU threads for the command about to run (``NETSHRINK_THREADS``, read by :func:`main`).
_threads: int | None = None


class _OnFirstUse:
    """A module-level name whose import (and torch's) waits until a command uses it."""

    def __init__(self, load: Callable[[], Any]) -> None:
        self._load = load

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._load(), attr)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._load()(*args, **kwargs)


def _report_class() -> Any:
    from netshrink.report import Report

    return Report


def _read_manifest_function() -> Any:
    from netshrink.artifact import read_manifest

    return read_manifest


if not TYPE_CHECKING:  # the `report` command's body uses these two names
    Report = _OnFirstUse(_report_class)
    read_manifest = _OnFirstUse(_read_manifest_function)


def _fail(message: str) -> NoReturn:
    """Print ``message`` as one ``error:`` line per line and exit with code 2."""
    for line in message.splitlines() or [""]:
        err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
    sys.exit(2)


def _os_error_line(exc: OSError) -> str:
    """An OS error as one line that names the file (``exc.filename``) and the reason."""
    if exc.filename is None:
        return f"{exc.strerror or exc}"
    return f"cannot use {exc.filename}: {exc.strerror or exc} (check the path and its permissions)"


class _Group(click.Group):
    """The ``netshrink`` group: adds plugin commands on demand, and turns netshrink and OS errors
    into one clean line per problem (exit code 2), not a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        _ensure_plugin_commands(declared_only=True)
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and _ensure_plugin_commands(declared_only=False):
            command = super().get_command(ctx, cmd_name)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            if _threads is not None and "--help" not in ctx.args:  # help needs no torch
                import torch

                torch.set_num_threads(_threads)
            return super().invoke(ctx)
        except NetshrinkError as exc:
            _fail(str(exc))
        except BrokenPipeError:
            raise  # output piped to `head`: click ends quietly
        except OSError as exc:  # a folder in the way, no permission, disk full
            _fail(_os_error_line(exc))


@click.group(cls=_Group)
@click.version_option(package_name="netshrink")
def cli() -> None:
    """netshrink: compress PyTorch models with plugins, and report honest sizes."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins(as_json: bool) -> None:
    """List every loaded plugin with its distribution, version and what it registered."""

    from netshrink.registry import list_plugins

    infos = list_plugins()
    if as_json:
        click.echo(json.dumps([i.__dict__ for i in infos], indent=2))
        return
    table = Table(title="netshrink plugins")
    for col in ("plugin", "distribution", "version", "registered"):
        table.add_column(col)
    for info in infos:
        registered = "; ".join(f"{k}: {', '.join(v)}" for k, v in info.registered.items()) or "-"
        table.add_row(info.name, info.distribution or "(built-in)", info.version or "-", registered)
    console.print(table)


@cli.command()
def methods() -> None:
    """List the registered compressors."""

    from netshrink.registry import compressors

    table = Table(title="compressors")
    for col in (
        "name",
        "plugin",
        "handles",
        "needs data",
        "structural",
        "encodes values",
        "summary",
    ):
        table.add_column(col)
    for name, entry in sorted(compressors().items()):
        caps = entry.obj.capabilities
        table.add_row(
            name,
            entry.plugin,
            ", ".join(caps.handles),
            _yn(caps.needs_data),
            _yn(caps.changes_structure),
            _yn(caps.encodes_values),
            entry.description,
        )
    console.print(table)


def _yn(flag: bool) -> str:
    return "yes" if flag else "-"


def field_rows(model_cls: Any) -> list[dict[str, str]]:
    """Name, type, default, bounds and description of each field of a Pydantic config class."""
    schema = model_cls.model_json_schema()
    rows = []
    for name, field in model_cls.model_fields.items():
        prop = schema.get("properties", {}).get(name, {})
        bounds = []
        for key, sym in (
            ("minimum", ">="),
            ("exclusiveMinimum", ">"),
            ("maximum", "<="),
            ("exclusiveMaximum", "<"),
        ):
            if key in prop:
                bounds.append(f"{sym} {prop[key]}")
        if "enum" in prop:
            bounds.append("one of " + ", ".join(map(str, prop["enum"])))
        annotation = getattr(field.annotation, "__name__", None) or str(field.annotation)
        annotation = re.sub(r"(?:\w+\.)+(\w+)", r"\1", annotation)  # drop module paths
        default = (
            "required"
            if field.is_required()
            else repr(field.get_default(call_default_factory=True))
        )
        rows.append(
            {
                "field": name,
                "type": annotation,
                "default": default,
                "bounds": ", ".join(bounds),
                "description": field.description or "",
            }
        )
    return rows


@cli.command()
@click.argument("method")
@click.option("--json", "as_json", is_flag=True, help="Print the config's JSON schema.")
def describe(method: str, as_json: bool) -> None:
    """Show METHOD's configuration fields (types, bounds, defaults, docs) and capabilities."""

    from netshrink.registry import compressors, get_compressor

    cls = get_compressor(method)
    if as_json:
        click.echo(json.dumps(cls.Config.model_json_schema(), indent=2))
        return
    entry = compressors()[method]
    console.print(f"[bold]{cls.name}[/] — {cls.summary()}")
    console.print(f"plugin: {entry.plugin} ({entry.distribution or 'built-in'})")
    if cls.paper:
        console.print(f"paper: {cls.paper}", markup=False, highlight=False, soft_wrap=True)
    caps = cls.capabilities
    console.print(
        f"handles: {', '.join(caps.handles)}; needs data: {_yn(caps.needs_data)}; "
        f"changes structure: {_yn(caps.changes_structure)}; encodes values: "
        f"{_yn(caps.encodes_values)}; needs fine-tune: {_yn(caps.needs_finetune)}"
    )
    table = Table(title=f"{cls.name} config")
    for col in ("field", "type", "default", "bounds", "description"):
        table.add_column(col, overflow="fold")
    for row in field_rows(cls.Config):
        table.add_row(*row.values())
    console.print(table)


@cli.command()
@click.argument("model", required=False)
@click.option("--data", "data", default=None, help="Dataset name (default: the recipe's).")
@click.option(
    "--recipe",
    "recipe_path",
    required=True,
    help="Recipe file (.yaml, .json, .toml), or a packaged recipe's name (`netshrink recipes`).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default="out",
    show_default=True,
    help="Directory for the artifact, the report JSON and the plot.",
)
@click.option("--seed", type=int, default=None, help="Override the recipe's seed.")
@click.option("--no-latency", is_flag=True, help="Skip latency measurement.")
def compress(
    model: str | None,
    data: str | None,
    recipe_path: str,
    out_dir: str,
    seed: int | None,
    no_latency: bool,
) -> None:
    """Compress MODEL with a recipe and print the report.

    MODEL is a spec such as zoo:lenet5 (default: the recipe's model), --recipe a recipe file or
    a packaged recipe's name (`netshrink recipes`). With --data, a zoo/timm/torchvision spec is
    first trained on the data (cached), so the report compares accuracy before and after.
    """

    from netshrink.adapters import parse_spec
    from netshrink.pipeline import compress as run

    recipe = _load_recipe(recipe_path)
    spec = model or recipe.model
    if not spec:
        raise click.UsageError("no model: pass MODEL or set 'model' in the recipe")
    data = data or recipe.data
    result = run(spec, recipe, data=data, seed=seed, latency=False if no_latency else None)
    console.print(result.report.table())
    stem = parse_spec(spec)[1].replace("/", "_") or "model"
    path = result.save(Path(out_dir) / f"{stem}.nsk")
    size = path.stat().st_size
    console.print(
        f"wrote {path} ({size:,} bytes; report says {result.report.storage_bytes:,}), "
        f"{path.with_suffix('.report.json')}, {path.with_suffix('.report.png')}"
    )


@cli.command()
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--memory",
    is_flag=True,
    help="Also load ARTIFACT both ways (dense decode, packed runtime) and print the bytes each "
    "loaded model holds and how much this process's resident set grew.",
)
def report(artifact: str, memory: bool) -> None:
    """Print the report of an ARTIFACT (from its .report.json, or its manifest alone).

    The .report.json beside ARTIFACT is shown only if it parses and records ARTIFACT's SHA-256;
    a stale or malformed one is named in a warning and ignored.
    """

    path = Path(artifact)
    manifest = read_manifest(path)  # a bad artifact fails here, before its side file is read
    side = path.with_suffix(".report.json")
    if side.is_file():
        try:
            console.print(Report.load_json(side, artifact=path).table())
        except ArtifactError as exc:
            err_console.print(
                f"[bold yellow]warning:[/] ignoring {escape(str(exc))}",
                highlight=False,
                soft_wrap=True,
            )
    spec = manifest.get("arch", {}).get("spec", "(module tree)")
    console.print(
        f"artifact {path}: {path.stat().st_size:,} bytes, model {spec}, "
        f"{len(manifest.get('t', {}))} tensors, written by netshrink {manifest.get('netshrink')}",
        highlight=False,
        markup=False,
    )
    recipe = manifest.get("recipe")
    steps = recipe.get("steps") if isinstance(recipe, dict) else None
    names = [s.get("compressor", "?") if isinstance(s, dict) else "?" for s in steps or []]
    if names:
        console.print(f"recipe steps: {', '.join(map(str, names))}", highlight=False, markup=False)
    if memory:
        _print_memory(path)


def _rss_bytes() -> int | None:
    """This process's resident set size now (Linux), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _print_memory(path: Path) -> None:
    """Bytes held by the model loaded packed and dense, measured (see ``report --memory``)."""
    import gc

    from netshrink.artifact import load
    from netshrink.runtime import resident_bytes

    table = Table(title=f"memory once loaded ({path.stat().st_size:,} bytes on disk)")
    for col in ("runtime", "tensor bytes held", "resident set growth"):
        table.add_column(col, justify="right" if col != "runtime" else "left")
    load(path, runtime="packed")  # warm-up: imports and first-use allocations are not the model's
    for runtime in ("packed", "dense"):  # packed first: the dense load cannot reuse its pages
        gc.collect()
        before = _rss_bytes()
        model = load(path, runtime=runtime)
        gc.collect()
        after = _rss_bytes()
        grew = "n/a" if before is None or after is None else f"{max(after - before, 0):,}"
        table.add_row(runtime, f"{resident_bytes(model):,}", grew)
        del model
    console.print(table)
    console.print(
        "tensor bytes: every distinct tensor storage of the loaded model. Resident set growth: "
        "the process's RSS after the load minus before (after one warm-up load); the allocator "
        "may reuse freed pages, so it can read below the tensor bytes.",
        highlight=False,
        markup=False,
    )


@cli.command()
@click.argument("model")
@click.option("--data", required=True, help="Dataset name or spec.")
@click.option("--budget", required=True,
              help="Bytes, a size (120kB, 2MiB) or a ratio of the dense model (40x).")
@click.option("--max-drop", type=float, default=None,
              help="Validation accuracy (pp) one option alone may lose; worse options are dropped.")
@click.option("--warn-drop", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Without --max-drop: the validation accuracy (pp) the searched model may lose "
              "before a note says so.")
@click.option("--max-macs", type=click.IntRange(min=1), default=None,
              help="MACs budget of the searched layers (solved with scipy's MILP).")
@click.option("--max-latency", default=None,
              help="Latency budget of the whole model in the packed runtime at batch 1: seconds "
              "(0.002), a time (2ms, 150us) or a share of the dense model's measured latency "
              "(80%). Times every candidate in the scan; solved with scipy's MILP.")
@click.option("--method", "methods", multiple=True,
              help="Compressors to consider (repeat; default: every one that offers options).")
@click.option("--executor", default="local", show_default=True,
              help="Where the sensitivity scan runs: local, process (a process pool), ray "
              "(pip install 'netshrink[ray]'), or a plugin's executor.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Workers: process-pool size, or Ray tasks in flight.")
@click.option("--address", default=None,
              help="Ray cluster (--executor ray): HEAD:6379, 'auto' or ray://HEAD:10001; "
              "default $RAY_ADDRESS, else a local Ray.")
@click.option("--finetune-epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="Fine-tune epochs after the chosen settings are applied.")
@click.option("--pareto", "pareto_budgets", multiple=True,
              help="Also search these budgets; write the Pareto table and PNG.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Measure the solver's plan whole against re-solves and uniform plans and "
              "keep the best measured.")
@click.option("--objective", type=click.Choice(["kl", "loss"]), default="kl",
              show_default=True,
              help="What a layer's option costs: kl (how far the predictions move from the "
              "reference's) or loss (the labels' cross-entropy increase).")
@click.option("--activation-cache-mb", type=click.IntRange(min=0), default=1024,
              show_default=True,
              help="Memory per scanning process for the reference's activations, so each "
              "candidate runs only from its layer on (0: off; the figures are the same).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="out",
              show_default=True, help="Folder for the artifact, its recipe and tables.")
def search(model: str, data: str, budget: str, max_drop: float | None, warn_drop: float,
           max_macs: int | None, max_latency: str | None, methods: tuple[str, ...], executor: str,
           workers: int | None, address: str | None, finetune_epochs: int,
           pareto_budgets: tuple[str, ...], seed: int, verify: bool, objective: str,
           activation_cache_mb: int, out_dir: str) -> None:
    """Search per-layer settings across methods under a size BUDGET (docs/search.md): write
    the artifact, a recipe that reproduces it byte for byte, and the tables."""

    from netshrink.executors import get_executor
    from netshrink.layer_search import run_command

    run = get_executor(executor, workers, address=address)
    lines = run_command(model, data, budget, out_dir=out_dir, max_drop=max_drop,
                        warn_drop=warn_drop,
                        max_macs=max_macs, max_latency=max_latency,
                        methods=methods or None, executor=run,
                        workers=workers, finetune_epochs=finetune_epochs, seed=seed,
                        pareto_budgets=pareto_budgets, verify=verify, objective=objective,
                        activation_cache_mb=activation_cache_mb)
    for line in lines:
        console.print(line, highlight=False, markup=False)


@cli.command(name="export")
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["onnx", "pt2"]), default="onnx",
              show_default=True, help="onnx (low-bit weights behind DequantizeLinear) or pt2 "
              "(torch.export of the packed model).")
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True,
              help="The file to write (atomically).")
@click.option("--opset", type=int, default=None,
              help="ONNX opset (default 21: 4-bit initializers need it).")
@click.option("--strict", is_flag=True,
              help="Refuse instead of exporting a tensor dense when the format cannot keep its "
              "encoding.")
def export_command(artifact: str, fmt: str, out: str, opset: int | None, strict: bool) -> None:
    """Export ARTIFACT to a deployable ONNX or pt2 file (docs/export.md says how each encoding
    kind exports). Needs `pip install 'netshrink[onnx]'` for ONNX."""

    import warnings

    from netshrink.export import ExportWarning, export

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExportWarning)
        path = export(artifact, out, format=fmt, opset=opset, strict=strict)
    for warning in caught:
        if issubclass(warning.category, ExportWarning):
            err_console.print(f"[bold yellow]warning:[/] {escape(str(warning.message))}",
                              highlight=False, soft_wrap=True)
    console.print(f"wrote {path} ({Path(path).stat().st_size:,} bytes)", highlight=False,
                  markup=False)


@cli.command()
def datasets() -> None:
    """List registered datasets."""

    from netshrink.registry import datasets as registered

    table = Table(title="datasets")
    for col in ("name", "plugin", "description"):
        table.add_column(col)
    for name, entry in sorted(registered().items()):
        table.add_row(name, entry.plugin, entry.description)
    console.print(table)


@cli.command()
def selectors() -> None:
    """List registered layer-selector presets."""

    from netshrink.registry import selector_presets

    table = Table(title="selector presets")
    for col in ("name", "plugin", "selector", "description"):
        table.add_column(col)
    for name, entry in sorted(selector_presets().items()):
        table.add_row(name, entry.plugin, entry.obj.describe(), entry.description)
    console.print(table)


@cli.command()
@click.argument("recipe_path", metavar="RECIPE")
@click.option("--model", "model", default=None, help="Model spec (default: the recipe's).")
@click.option("--data", "data", default=None, help="Dataset (default: the recipe's).")
def validate(recipe_path: str, model: str | None, data: str | None) -> None:
    """Validate a recipe against a model without compressing anything.

    RECIPE is a recipe file or a packaged recipe's name (`netshrink recipes`).
    """

    from netshrink.datasets import load as load_data
    from netshrink.models import load_model
    from netshrink.pipeline import _info_for, plan

    recipe = _load_recipe(recipe_path)
    spec = model or recipe.model
    if not spec:
        raise click.UsageError("no model: pass --model or set 'model' in the recipe")
    splits = load_data(data or recipe.data) if (data or recipe.data) else None
    net = load_model(spec, **(splits.model_options() if splits else {}))
    for item in plan(recipe, net, _info_for(net, splits), splits):
        console.print(
            f"{item.title}: {len(item.layers)} layer(s): {', '.join(item.layers[:6])}"
            + (" ..." if len(item.layers) > 6 else "")
        )
    console.print("[green]recipe is valid[/]")


def _packaged_recipes() -> dict[str, Traversable]:
    """The recipes shipped in the wheel (package ``netshrink.recipes``), by name (file stem)."""
    from importlib.resources import files

    try:
        folder = files("netshrink.recipes")
    except ModuleNotFoundError:
        raise RecipeError(
            "the packaged recipes (netshrink.recipes) are not installed: reinstall netshrink "
            "(pip install -e . in a checkout)"
        ) from None
    found = {p.name[: -len(".yaml")]: p for p in folder.iterdir() if p.name.endswith(".yaml")}
    return dict(sorted(found.items()))


def _is_recipe_name(arg: str) -> bool:
    """Whether ``--recipe ARG`` names a packaged recipe: no path separator, no extension, and
    not an existing file."""
    return "/" not in arg and os.sep not in arg and not Path(arg).suffix and not Path(arg).is_file()


def _unknown_recipe(name: str, shipped: dict[str, Traversable]) -> RecipeError:
    close = difflib.get_close_matches(name, shipped, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return RecipeError(
        f"recipe {name!r}: no such file, and no packaged recipe of that name.{hint} "
        f"Packaged recipes: {', '.join(shipped) or '(none)'} (see `netshrink recipes`)."
    )


def _load_recipe(arg: str) -> Recipe:
    """The recipe ``--recipe ARG`` means: a file, or a packaged recipe's name (``lenet5``)."""
    from importlib.resources import as_file

    from netshrink.recipe import Recipe

    if Path(arg).is_dir():
        raise RecipeError(
            f"recipe {arg!r} is a folder: pass a recipe file in it, or a packaged recipe's name"
        )
    if not _is_recipe_name(arg):
        return Recipe.from_file(arg)
    shipped = _packaged_recipes()
    if arg not in shipped:
        raise _unknown_recipe(arg, shipped)
    with as_file(shipped[arg]) as path:
        return Recipe.from_file(path)


def recipe_summary(text: str) -> str:
    """A recipe's one-line description: the first sentence of its leading ``#`` comment (at most
    100 characters)."""
    words: list[str] = []
    for line in text.splitlines():
        body = line.strip()
        if not body.startswith("#"):
            break
        body = body.lstrip("#").strip()
        if not body or body.startswith("netshrink "):  # a blank comment line, or the command
            break
        words.append(body)
    joined = " ".join(words)
    end = re.search(r"\.(\s|$)", joined)
    first = joined[: end.start()] if end else joined
    return first if len(first) <= 100 else first[:99].rstrip() + "…"


@cli.command()
@click.argument("name", required=False)
def recipes(name: str | None) -> None:
    """List the packaged recipes, or print recipe NAME.

    A packaged recipe is used by name: `netshrink compress --recipe lenet5`.
    """

    import yaml

    shipped = _packaged_recipes()
    if name is not None:
        if name not in shipped:
            raise _unknown_recipe(name, shipped)
        click.echo(shipped[name].read_text(encoding="utf-8"), nl=False)
        return
    table = Table(title="packaged recipes (netshrink compress --recipe NAME)")
    for col in ("name", "model", "data", "description"):
        table.add_column(col, overflow="fold")
    for stem, resource in shipped.items():
        text = resource.read_text(encoding="utf-8")
        try:
            fields = yaml.safe_load(text)
        except yaml.YAMLError:
            fields = None
        fields = fields if isinstance(fields, dict) else {}
        table.add_row(
            stem, str(fields.get("model") or "-"), str(fields.get("data") or "-"),
            recipe_summary(text),
        )
    console.print(table)


def _attach_builtin_groups() -> None:

    cli.add_command(plugin_group())


_attach_builtin_groups()

#: Whether the plugins' commands were added (by :func:`_load_plugin_commands`).
_plugin_commands_added = False
#: Bytes of a plugin's source read to look for its commands before assuming it has some.
_SCAN_BUDGET = 4_000_000


def _load_plugin_commands() -> None:
    """Load every plugin (this imports torch) and let each add its commands to ``cli``."""
    global _plugin_commands_added
    from netshrink.registry import load_plugins, pm

    load_plugins()
    pm.hook.register_commands(cli=cli)
    _plugin_commands_added = True


def _env_names(var: str) -> list[str] | None:
    value = os.environ.get(var)
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _plugin_entry_points() -> list[EntryPoint]:
    """The third-party plugins that would load: the ``netshrink`` entry points, less those that
    ``NETSHRINK_PLUGINS`` leaves out or ``NETSHRINK_DISABLE_PLUGINS`` blocks (no import)."""
    from importlib.metadata import entry_points

    only = _env_names("NETSHRINK_PLUGINS")
    blocked = set(_env_names("NETSHRINK_DISABLE_PLUGINS") or ())
    return [
        ep
        for ep in entry_points(group="netshrink")
        if (only is None or ep.name in only) and ep.name not in blocked
    ]


def _source_files(module: str) -> Iterator[Path] | None:
    """The ``.py`` files of ``module`` (all of a package's), found without running it; None when
    they cannot be listed (no such module, or compiled only)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return (p for loc in spec.submodule_search_locations for p in Path(loc).rglob("*.py"))
    if spec.origin and spec.origin.endswith(".py"):
        return iter([Path(spec.origin)])
    return None


def _may_add_commands(module: str) -> bool:
    """Whether ``module``'s source mentions the ``register_commands`` hook (a text search, no
    import). True when unsure: the source cannot be listed or read, or is too large to scan."""
    files = _source_files(module)
    if files is None:
        return True
    budget = _SCAN_BUDGET
    for path in files:
        try:
            text = path.read_bytes()
        except OSError:
            return True
        budget -= len(text)
        if budget < 0 or b"register_commands" in text:
            return True
    return False


def _command_plugin_modules() -> list[str]:
    """The plugins (built-in package, third-party top-level modules) that may add commands."""
    modules = ["netshrink.plugins", *(ep.module.partition(".")[0] for ep in _plugin_entry_points())]
    return [m for m in dict.fromkeys(modules) if _may_add_commands(m)]


def _ensure_plugin_commands(*, declared_only: bool) -> bool:
    """Add the plugins' commands once, if a plugin may have any; True if it loaded them now.

    ``declared_only`` (listing for ``--help``): load only when a plugin's source mentions the
    hook, so ``netshrink --help`` stays free of torch. Otherwise (an unknown command name): load
    whenever any third-party plugin is installed.
    """
    if _plugin_commands_added:
        return False
    needed = bool(_command_plugin_modules()) or (not declared_only and bool(_plugin_entry_points()))
    if not needed:
        return False
    try:
        _load_plugin_commands()
    except NetshrinkError as exc:
        _fail(str(exc))
    return True


def _parse_threads(value: str | None) -> int | None:
    """``NETSHRINK_THREADS``: None when unset or empty, else a positive integer."""
    if not value:
        return None
    if not value.strip().isdigit() or int(value) < 1:
        raise ConfigError(
            f"NETSHRINK_THREADS must be a positive integer (torch CPU threads), got {value!r}"
        )
    return int(value)


def main() -> None:
    """Console-script entry point (``NETSHRINK_THREADS=N`` sets torch's CPU threads)."""
    global _threads
    try:
        _threads = _parse_threads(os.environ.get("NETSHRINK_THREADS"))
    except ConfigError as exc:
        _fail(str(exc))
    cli()


if __name__ == "__main__":
    main()
