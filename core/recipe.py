"""Recipes: an ordered list of steps ``{compressor, config, overrides, select, finetune}`` plus
settings.

A recipe is a Pydantic model, loadable from YAML, JSON or TOML and buildable in Python with
:func:`step`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from netshrink.config import NetshrinkConfig, format_validation_error
from netshrink.errors import RecipeError
from netshrink.selector import LayerSelector, check_name_patterns
from netshrink.training import FinetuneConfig


class Step(NetshrinkConfig):
    """One compression step."""

    compressor: str = Field(description="Registered compressor name (see `netshrink methods`).")
    config: dict[str, Any] = Field(
        default_factory=dict, description="The compressor's config (see `netshrink describe NAME`)."
    )
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-layer config: {layer-name pattern (a glob, or a regex after 're:', as "
        "in selectors): {field: value}}. A selected layer gets `config` with the fields of the "
        "first pattern its qualified name matches replaced, e.g. {'fc1': {'bits': 3}}. Only the "
        "compressor's per-layer fields may be set (listed in the compressor reference); each "
        "merged config is validated before any work.",
    )
    select: LayerSelector | str | None = Field(
        None,
        description="Layers to act on: a selector, or the name of a registered preset. "
        "Default: every layer of the types the compressor handles, except the classifier head.",
    )
    finetune: FinetuneConfig | None = Field(
        None, description="Fine-tune after this step (pruned zeros and quantized values are kept)."
    )
    label: str | None = Field(None, description="A name for this step in reports.")

    @field_validator("overrides")
    @classmethod
    def _patterns_compile(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        check_name_patterns(value)
        return value

    def title(self, index: int) -> str:
        """``step 2 (tucker)`` — how errors and reports name this step."""
        return f"step {index} ({self.label or self.compressor})"


class Recipe(NetshrinkConfig):
    """A complete compression recipe."""

    model: str | None = Field(
        None, description="Model spec (e.g. zoo:lenet5); the CLI argument wins."
    )
    data: str | None = Field(None, description="Dataset name (e.g. digits28); the CLI option wins.")
    seed: int = Field(
        0, ge=0, description="Seed for every random choice (results are reproducible)."
    )
    steps: list[Step] = Field(min_length=1, description="The steps, applied in order.")
    finetune: FinetuneConfig | None = Field(None, description="Fine-tune after the last step.")
    latency: bool = Field(True, description="Measure latency (batch 1 and 64) in the report.")

    @field_validator("steps", mode="before")
    @classmethod
    def _steps_list(cls, value: Any) -> Any:
        if isinstance(value, (Step, dict)):
            return [value]
        return value

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        """Load a ``.yaml``/``.yml``, ``.json`` or ``.toml`` recipe (validated)."""
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            elif path.suffix == ".json":
                data = json.loads(text)
            elif path.suffix == ".toml":
                try:
                    import tomllib
                except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
                    import tomli as tomllib

                data = tomllib.loads(text)
            else:
                raise RecipeError(
                    f"recipe {path}: unknown extension {path.suffix!r} (use .yaml, .json, .toml)"
                )
        except RecipeError:
            raise
        except Exception as exc:  # yaml/json/toml parse errors
            raise RecipeError(f"recipe {path}: cannot parse: {exc}") from None
        return cls.parse(data, source=str(path))

    @classmethod
    def parse(cls, data: Any, source: str = "recipe") -> Recipe:
        """Validate a dict into a recipe; errors name the step index and field."""
        if not isinstance(data, dict):
            raise RecipeError(
                f"{source}: expected a mapping with 'steps', got {type(data).__name__}"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RecipeError(_recipe_errors(exc, source)) from None


def _recipe_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = list(err["loc"])
        where = source
        if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
            where = f"{source}: step {loc[1]}"
            loc = loc[2:]
        field = ".".join(str(p) for p in loc) or "(value)"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: field '{field}': {msg}")
    return "\n".join(lines)


def step(
    compressor: str,
    select: LayerSelector | dict[str, Any] | str | None = None,
    finetune: FinetuneConfig | dict[str, Any] | None = None,
    label: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    **config: Any,
) -> Step:
    """Build a step: ``step("magnitude", select={"types": ["Linear"]}, sparsity=0.9)``;
    ``overrides={"fc1": {"bits": 3}}`` sets config fields per layer (see :class:`Step`)."""
    try:
        return Step(
            compressor=compressor,
            config=config,
            overrides=overrides or {},
            select=select,
            finetune=finetune,
            label=label,
        )
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, f"step ({compressor})")) from None


def as_recipe(
    steps: Recipe | list[Step | dict[str, Any]] | Step | str | Path, **settings: Any
) -> Recipe:
    """Accept a recipe, a list of steps, one step, or a recipe file path."""
    if isinstance(steps, Recipe):
        recipe = steps
    elif isinstance(steps, (str, Path)):
        recipe = Recipe.from_file(steps)
    else:
        items = [steps] if isinstance(steps, (Step, dict)) else list(steps)
        recipe = Recipe.parse(
            {"steps": [s.model_dump() if isinstance(s, Step) else s for s in items]}
        )
    updates = {
        k: (v.model_dump() if isinstance(v, NetshrinkConfig) else v)
        for k, v in settings.items()
        if v is not None
    }
    if updates:
        recipe = Recipe.parse({**recipe.model_dump(exclude_unset=True), **updates})
    return recipe
