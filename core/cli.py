"""The ``netshrink`` command line: plugins, methods, describe, compress, report, datasets.

Plugins add sub-commands through the ``register_commands(cli)`` hook.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from netshrink.adapters import parse_spec
from netshrink.artifact import read_manifest
from netshrink.datasets import load as load_data
from netshrink.errors import NetshrinkError
from netshrink.models import load_model
from netshrink.pipeline import _info_for, plan
from netshrink.pipeline import compress as run
from netshrink.recipe import Recipe
from netshrink.registry import (
    compressors,
    get_compressor,
    list_plugins,
    load_plugins,
    pm,
    selector_presets,
)
from netshrink.registry import datasets as registered
from netshrink.report import Report
from netshrink.scaffold import plugin_group

# Reports are wide: keep them readable when output goes to a file or CI log.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


class _Group(click.Group):
    """Turns netshrink errors into one clean line per problem (exit code 2), not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NetshrinkError as exc:
            for line in str(exc).splitlines():
                err_console.print(f"[bold red]error:[/] {line}", highlight=False, markup=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="netshrink")
def cli() -> None:
    """netshrink: compress PyTorch models with plugins, and report honest sizes."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins(as_json: bool) -> None:
    """List every loaded plugin with its distribution, version and what it registered."""

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
@click.argument("model")
@click.option("--data", "data", default=None, help="Dataset name (e.g. digits28).")
@click.option(
    "--recipe",
    "recipe_path",
    type=click.Path(dir_okay=False),
    required=True,
    help="Recipe file (.yaml, .json, .toml).",
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
    model: str, data: str | None, recipe_path: str, out_dir: str, seed: int | None, no_latency: bool
) -> None:
    """Compress MODEL (e.g. zoo:lenet5) with a recipe and print the report.

    With --data, a zoo/timm/torchvision spec is first trained on the data (cached), so the
    report compares accuracy before and after.
    """

    recipe = Recipe.from_file(recipe_path)
    data = data or recipe.data
    result = run(model, recipe, data=data, seed=seed, latency=False if no_latency else None)
    console.print(result.report.table())
    stem = parse_spec(model)[1].replace("/", "_") or "model"
    path = result.save(Path(out_dir) / f"{stem}.nsk")
    size = path.stat().st_size
    console.print(
        f"wrote {path} ({size:,} bytes; report says {result.report.storage_bytes:,}), "
        f"{path.with_suffix('.report.json')}, {path.with_suffix('.report.png')}"
    )


@cli.command()
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False))
def report(artifact: str) -> None:
    """Print the report of an ARTIFACT (from its .report.json, or its manifest alone)."""

    path = Path(artifact)
    side = path.with_suffix(".report.json")
    if side.is_file():
        console.print(Report.load_json(side).table())
    manifest = read_manifest(path)
    size = path.stat().st_size
    spec = manifest.get("arch", {}).get("spec", "(module tree)")
    console.print(
        f"artifact {path}: {size:,} bytes, model {spec}, "
        f"{len(manifest.get('t', {}))} tensors, written by netshrink {manifest.get('netshrink')}"
    )
    summary = manifest.get("summary") or {}
    if summary.get("accuracy_after") is not None:
        console.print(
            f"stored accuracy: {summary['accuracy_before']:.4f} -> {summary['accuracy_after']:.4f}"
        )


@cli.command()
def datasets() -> None:
    """List registered datasets."""

    table = Table(title="datasets")
    for col in ("name", "plugin", "description"):
        table.add_column(col)
    for name, entry in sorted(registered().items()):
        table.add_row(name, entry.plugin, entry.description)
    console.print(table)


@cli.command()
def selectors() -> None:
    """List registered layer-selector presets."""

    table = Table(title="selector presets")
    for col in ("name", "plugin", "selector", "description"):
        table.add_column(col)
    for name, entry in sorted(selector_presets().items()):
        table.add_row(name, entry.plugin, entry.obj.describe(), entry.description)
    console.print(table)


@cli.command()
@click.argument("recipe_path", type=click.Path(dir_okay=False))
@click.option("--model", "model", default=None, help="Model spec (default: the recipe's).")
@click.option("--data", "data", default=None, help="Dataset (default: the recipe's).")
def validate(recipe_path: str, model: str | None, data: str | None) -> None:
    """Validate a recipe against a model without compressing anything."""

    recipe = Recipe.from_file(recipe_path)
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


def _attach_builtin_groups() -> None:

    cli.add_command(plugin_group())


_attach_builtin_groups()


def _load_plugin_commands() -> None:

    load_plugins()
    pm.hook.register_commands(cli=cli)


def main() -> None:
    """Console-script entry point (``NETSHRINK_THREADS=N`` sets torch's CPU threads)."""
    threads = os.environ.get("NETSHRINK_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    try:
        _load_plugin_commands()
    except NetshrinkError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)
    cli()


if __name__ == "__main__":
    main()
