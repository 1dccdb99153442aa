"""The search's byte budget (:func:`parse_budget`) and the recipe that applies a plan
(:func:`plan_recipe`: one step per compressor, per-layer ``overrides``), as YAML.
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from netshrink.compressor import Compressor
from netshrink.errors import ConfigError
from netshrink.recipe import Recipe
from netshrink.registry import get_compressor
from netshrink.search_candidates import Candidate, _order, _pattern, _per_layer
from netshrink.training import FinetuneConfig

_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(x|b|kb|kib|mb|mib)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2}


def parse_budget(budget: int | str, reference_bytes: int) -> int:
    """The byte budget: an int or ``"123456"`` (bytes), ``"40x"`` (the dense artifact's size
    divided by 40), or a size with a unit (``"120kB"``, ``"1.5MiB"``)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, str)):
        raise ConfigError(
            f"search field 'budget': give bytes or a ratio like '40x', got {budget!r}"
        )
    if isinstance(budget, int):
        value, unit = float(budget), "b"
    else:
        match = _BUDGET.match(budget)
        if not match:
            raise ConfigError(
                f"search field 'budget': {budget!r} is not a size; give a ratio like '40x', "
                "bytes like '120000', or a size like '120kB' / '1.5MiB'"
            )
        value, unit = float(match.group(1)), (match.group(2) or "b").lower()
    if unit == "x":
        if value <= 1:
            raise ConfigError(f"search field 'budget': a ratio must be above 1x, got {budget!r}")
        return int(reference_bytes / value)
    if value <= 0:
        raise ConfigError(f"search field 'budget': must be positive, got {budget!r}")
    return int(value * _UNITS[unit])


def plan_recipe(
    plan: dict[str, Candidate],
    *,
    model: str | None = None,
    data: str | None = None,
    seed: int = 0,
    finetune: FinetuneConfig | dict[str, Any] | None = None,
    latency: bool = False,
    head: str | None = None,
) -> Recipe:
    """The recipe that applies ``plan`` (layer -> candidate): one step per compressor in
    chain order (structural, pruning, value-encoding), selecting exactly its layers, with the
    most common setting as the step's config and per-layer ``overrides`` for the rest; a
    compressor without per-layer fields gets one step per distinct setting instead."""
    by_method: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for layer, cand in plan.items():
        for option in cand.options:
            by_method.setdefault(option.compressor, []).append((layer, option.config))
    classes = {name: get_compressor(name) for name in by_method}
    steps: list[dict[str, Any]] = []
    for name in sorted(by_method, key=lambda n: (_order(classes[n]), n)):
        cls, entries = classes[name], by_method[name]
        if all(_per_layer(cls, cfg) for _, cfg in entries):
            steps.append(_overrides_step(cls, entries, head))
        else:
            groups: dict[str, list[str]] = {}
            configs: dict[str, dict[str, Any]] = {}
            for layer, cfg in entries:
                text = json.dumps(cfg, sort_keys=True)
                groups.setdefault(text, []).append(layer)
                configs[text] = cfg
            for text, layers in groups.items():
                steps.append(
                    {"compressor": name, "config": configs[text], "select": _select(layers, head),
                     "label": f"search: {name}"}
                )
    if not steps:
        raise ConfigError(
            "search field 'budget': the uncompressed model already fits it and no option "
            "lowers the validation loss, so there is nothing to compress; give a smaller budget"
        )
    body: dict[str, Any] = {"seed": seed, "steps": steps, "latency": latency}
    if model:
        body["model"] = model
    if data:
        body["data"] = data
    if finetune is not None:
        body["finetune"] = finetune if isinstance(finetune, dict) else finetune.model_dump()
    return Recipe.model_validate(body)


def _overrides_step(
    cls: type[Compressor], entries: list[tuple[str, dict[str, Any]]], head: str | None
) -> dict[str, Any]:
    texts = [json.dumps(cfg, sort_keys=True) for _, cfg in entries]
    common = max(dict.fromkeys(texts), key=texts.count)
    overrides = {
        _pattern(layer): cfg
        for (layer, cfg), text in zip(entries, texts, strict=True)
        if text != common
    }
    step: dict[str, Any] = {
        "compressor": cls.name,
        "config": json.loads(common),
        "select": _select([layer for layer, _ in entries], head),
        "label": f"search: {cls.name}",
    }
    if overrides:
        step["overrides"] = overrides
    return step


def _select(layers: list[str], head: str | None) -> dict[str, Any]:
    select: dict[str, Any] = {"names": [_pattern(n) for n in layers]}
    if head and head in layers:
        select["protect_head"] = False
    return select


def recipe_yaml(recipe: Recipe) -> str:
    """The recipe as YAML (what ``netshrink compress --recipe`` reads back to the same run)."""
    return yaml.safe_dump(recipe.model_dump(exclude_defaults=True), sort_keys=False)


__all__ = [
    "parse_budget",
    "plan_recipe",
    "recipe_yaml",
]
