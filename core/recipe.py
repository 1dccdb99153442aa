"""Recipes: an ordered list of steps ``{compressor, config, overrides, select, finetune}`` plus
settings.

A recipe is a Pydantic model, loadable from YAML, JSON or TOML and buildable in Python with
:func:`step`. Recipe files are treated as untrusted input: a file over
:data:`MAX_RECIPE_BYTES` is refused unread, YAML aliases may expand to at most
:data:`MAX_YAML_VALUES` values, duplicate keys are errors in every format, and messages show at
most :data:`MAX_VALUE_CHARS` characters of an offending value.

Every step is also checked against its registered compressor when it is built (:func:`step`,
:meth:`Recipe.parse`):
an unknown name lists the registered ones, and the config and per-layer overrides are
validated, every step's problems reported at once.
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator

from netshrink.compressor import Compressor, CompressorConfig
from netshrink.config import NetshrinkConfig, _config_class_names, _is_union_tag
from netshrink.errors import ConfigError, RecipeError
from netshrink.selector import LayerSelector, check_name_patterns
from netshrink.training import FinetuneConfig

#: A recipe file larger than this is refused before it is parsed (a recipe is a page of text).
MAX_RECIPE_BYTES = 2 * 2**20
#: The most values (scalars, lists, mappings) a YAML recipe may hold once its aliases are
#: expanded: a "billion laughs" file is a few dozen aliases that expand to billions.
MAX_YAML_VALUES = 100_000
#: An error message shows at most this many characters of an offending value.
MAX_VALUE_CHARS = 200
_MAX_LINE_CHARS = 2 * MAX_VALUE_CHARS + 400  # one message line, value and explanation
_MAX_NAME_CHARS = 60  # a step's label or compressor name, or a field name, in a message

#: How a recipe finds a compressor class by name (raises ``KeyError`` for an unknown name).
CompressorLookup = Callable[[str], type[Compressor]]
_lookup: CompressorLookup | None = None


def set_compressor_lookup(lookup: CompressorLookup | None) -> CompressorLookup | None:
    """Install how steps find their compressor class by name, and return the previous lookup.

    ``None`` (the default) looks names up in the plugin registry
    (``netshrink.registry.get_compressor``); tests install their own.
    """
    global _lookup
    previous, _lookup = _lookup, lookup
    return previous


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple = 3, 6, 6, 6
_REPR.maxset, _REPR.maxfrozenset, _REPR.maxdeque, _REPR.maxarray = 6, 6, 6, 6
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = MAX_VALUE_CHARS, MAX_VALUE_CHARS, 40


def short_repr(value: Any, limit: int = MAX_VALUE_CHARS) -> str:
    """``repr(value)`` in at most ``limit`` characters, ending in ``...`` when cut.

    Nested containers are summarised (``reprlib``) rather than rendered whole, so a huge or
    deeply shared value (a YAML alias bomb, a list repeated by reference) costs no more than a
    small one.
    """
    try:
        text = _REPR.repr(value)
    except Exception:  # a repr that fails, or an int too long to print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cap_lines(text: str) -> str:
    """Each line of an error message cut to a readable length."""
    return "\n".join(_cut(line, _MAX_LINE_CHARS) for line in text.splitlines())


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
        """Load a ``.yaml``/``.yml``, ``.json`` or ``.toml`` recipe (validated).

        Refused with a :class:`RecipeError` naming the file (and, for YAML, the line): a file
        over :data:`MAX_RECIPE_BYTES`, text that is not UTF-8, a duplicate key, YAML aliases
        expanding to more than :data:`MAX_YAML_VALUES` values, and anything that fails to parse.
        """
        path = Path(path)
        if not path.is_file():
            what = "is not a regular file" if path.exists() else "does not exist"
            raise RecipeError(f"recipe file {str(path)!r} {what}")
        if path.suffix not in (".yaml", ".yml", ".json", ".toml"):
            raise RecipeError(
                f"recipe {path}: unknown extension {path.suffix!r} (use .yaml, .json, .toml)"
            )
        text = _read_recipe_text(path)
        try:
            if path.suffix == ".json":
                data = json.loads(text, object_pairs_hook=_json_object)
            elif path.suffix == ".toml":
                try:
                    import tomllib
                except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
                    import tomli as tomllib

                data = tomllib.loads(text)  # refuses duplicate keys itself
            else:
                data = yaml.load(text, Loader=_RecipeYamlLoader)  # a SafeLoader subclass
        except _YamlLimitError as exc:
            line = exc.problem_mark.line + 1 if exc.problem_mark else "?"
            raise RecipeError(f"recipe {path}, line {line}: {exc.problem}") from None
        except _DuplicateJsonKey as exc:
            raise RecipeError(
                f"recipe {path}: duplicate key {short_repr(exc.key)} in a JSON object (the last "
                "would silently win); keep one"
            ) from None
        except RecursionError:
            raise RecipeError(f"recipe {path}: cannot parse: nested too deeply") from None
        except Exception as exc:  # yaml/json/toml parse errors
            raise RecipeError(_cap_lines(f"recipe {path}: cannot parse: {exc}")) from None
        return cls.parse(data, source=str(path))

    @classmethod
    def parse(cls, data: Any, source: str = "recipe") -> Recipe:
        """Validate a dict into a recipe; errors name the step index, compressor and field.

        Every step's problems are reported at once, in one :class:`RecipeError`: the recipe's
        own fields, and (when a compressor lookup is installed) each step's compressor name,
        config and per-layer overrides.
        """
        if not isinstance(data, dict):
            raise RecipeError(
                f"{source}: expected a mapping with 'steps', got {type(data).__name__}"
            )
        problems: list[tuple[int, str]] = []
        recipe: Recipe | None = None
        try:
            recipe = cls.model_validate(data)
        except ValidationError as exc:
            problems += _structure_problems(exc, source, data)
        steps = list(enumerate(recipe.steps)) if recipe is not None else _valid_steps(data)
        for index, item in steps:
            problems += [(index, f"{source}: {line}") for line in check_step(item, index)]
        if problems:
            ordered = sorted(problems, key=lambda problem: problem[0])  # stable: by step
            raise RecipeError("\n".join(line for _, line in ordered))
        assert recipe is not None  # no problems: it validated
        return recipe


def check_step(step: Step, index: int | None = None) -> list[str]:
    """Every problem of ``step`` against its compressor, one message line each: an unknown
    compressor (listing the registered ones), config fields, per-layer overrides.

    Compressors are found in the plugin registry, or by the lookup installed with
    :func:`set_compressor_lookup`.
    """
    if _lookup is None:
        from netshrink.registry import get_compressor as lookup
    else:
        lookup = _lookup
    where = _title(step.label or step.compressor, index)
    try:
        cls = lookup(step.compressor)
    except KeyError as exc:
        return [_cut(f"{where}: field 'compressor': {exc}", 4 * _MAX_LINE_CHARS)]
    try:
        step_config(step, cls, where)
    except ConfigError as exc:
        return str(exc).splitlines()
    return []


def step_config(step: Step, cls: type[Compressor], where: str) -> CompressorConfig:
    """``step.config`` validated by ``cls.Config``, with ``step.overrides`` checked against it
    (:meth:`Compressor.override_configs`).

    Raises :class:`RecipeError` with one line per problem, each starting with ``where`` and
    naming ``config.<field>`` or ``overrides.<pattern>.<field>``, values cut to
    :data:`MAX_VALUE_CHARS` characters.
    """
    try:
        config = cls.Config.model_validate(step.config)
    except ValidationError as exc:
        raise RecipeError(validation_lines(exc, where, prefix="config")) from None
    try:
        cls.override_configs(config, step.overrides, where=where)
    except ConfigError as exc:
        raise RecipeError(_cap_lines(str(exc))) from None
    return config


def validation_lines(exc: ValidationError, where: str, prefix: str = "") -> str:
    """One line per failing field, ``<where>: field '<prefix>.<path>': <message> (got <value>)``,
    with the value cut to :data:`MAX_VALUE_CHARS` characters (never rendered whole)."""
    return "\n".join(_error_line(err, where, err["loc"], prefix) for err in _substantive(exc))


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "list", "dict", "tuple", "set"})


def _union_prefix(loc: tuple[Any, ...], tags: set[str]) -> tuple[Any, ...] | None:
    """The location of the field whose union member ``loc`` names (``('select',)`` for
    ``('select', 'str')`` or ``('select', 'LayerSelector', 'types')``), None if none does."""
    for i, part in enumerate(loc):
        if isinstance(part, str) and (
            part in tags or part in _TYPE_TAGS or part.split("[", 1)[0] in _TYPE_TAGS
        ):
            return tuple(loc[:i])
    return None


def _substantive(exc: ValidationError) -> list[Any]:
    """The errors worth showing: for a field of several types (a selector or a preset name),
    "Input should be a valid string" beside a real error in the selector is noise, so a type
    error of one union member is dropped when another member of that field has a real error."""
    errors = exc.errors()
    tags = _config_class_names()
    real = [tuple(e["loc"]) for e in errors if not e["type"].endswith("_type")]
    kept = []
    for err in errors:
        prefix = _union_prefix(tuple(err["loc"]), tags)
        if (
            err["type"].endswith("_type")
            and prefix is not None
            and any(loc[: len(prefix)] == prefix and len(loc) > len(prefix) for loc in real)
        ):
            continue
        kept.append(err)
    return kept


def _error_line(err: Any, where: str, loc: tuple[Any, ...], prefix: str = "") -> str:
    tags = _config_class_names()
    parts = [
        _cut(str(p), _MAX_NAME_CHARS)
        for i, p in enumerate(loc)
        if not _is_union_tag(p, i == len(loc) - 1, tags)
    ]
    field = ".".join([prefix, *parts] if prefix else parts) or "(value)"
    msg = _cut(err["msg"].removeprefix("Value error, "), _MAX_LINE_CHARS)
    got = "" if err["type"] == "missing" else f" (got {short_repr(err.get('input'))})"
    return f"{where}: field '{field}': {msg}{got}"


def _title(name: Any, index: int | None) -> str:
    """``step 2 (tucker)`` (as :meth:`Step.title`), ``step (tucker)`` without an index, or
    ``step 2`` when the step has no usable name."""
    number = "step" if index is None else f"step {index}"
    if not isinstance(name, str) or not name:
        return number
    return f"{number} ({_cut(name, _MAX_NAME_CHARS)})"


def _raw_steps(data: dict[str, Any]) -> list[Any]:
    raw = data.get("steps")
    if isinstance(raw, (Step, dict)):
        return [raw]
    return raw if isinstance(raw, list) else []


def _raw_title(data: dict[str, Any], index: int) -> str:
    """How a step that failed validation is named: its label or compressor when readable."""
    steps = _raw_steps(data)
    item = steps[index] if index < len(steps) else None
    if isinstance(item, Step):
        return item.title(index)
    names = [item.get("label"), item.get("compressor")] if isinstance(item, dict) else []
    return _title(next((n for n in names if isinstance(n, str) and n), None), index)


def _structure_problems(
    exc: ValidationError, source: str, data: dict[str, Any]
) -> list[tuple[int, str]]:
    """The recipe's own validation errors as ``(step index or -1, line)``."""
    problems = []
    for err in _substantive(exc):
        loc = tuple(err["loc"])
        if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
            line = _error_line(err, f"{source}: {_raw_title(data, loc[1])}", loc[2:])
            problems.append((loc[1], line))
        else:
            problems.append((-1, _error_line(err, source, loc)))
    return problems


def _valid_steps(data: dict[str, Any]) -> list[tuple[int, Step]]:
    """For a recipe that failed validation, each step's compressor, config and overrides as a
    step of their own where they validate, so that their checks are reported too (a bad
    ``finetune`` does not hide a bad ``config``)."""
    valid = []
    for index, item in enumerate(_raw_steps(data)):
        if isinstance(item, Step):
            valid.append((index, item))
            continue
        if not isinstance(item, dict):
            continue
        own = {k: item[k] for k in ("compressor", "config", "overrides") if k in item}
        if isinstance(item.get("label"), str):
            own["label"] = item["label"]
        try:
            valid.append((index, Step.model_validate(own)))
        except ValidationError:
            continue  # reported with the recipe's errors
    return valid


def _read_recipe_text(path: Path) -> str:
    """The file's text, refused unread past :data:`MAX_RECIPE_BYTES` (a BOM is dropped)."""
    try:
        with path.open("rb") as stream:
            raw = stream.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise RecipeError(f"recipe {path}: cannot read it: {exc.strerror or exc}") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(
            f"recipe {path}: larger than {MAX_RECIPE_BYTES // 2**20} MiB, refused unread (a "
            "recipe is a short text file; is this the right file?)"
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"recipe {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None


class _DuplicateJsonKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a repeated key (``json`` would keep the last value silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateJsonKey(key)
        out[key] = value
    return out


class _YamlLimitError(yaml.MarkedYAMLError):
    """A YAML recipe broke one of the loader's rules (its mark is the offending node)."""


class _RecipeYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys, recursive aliases and aliases that
    expand to more than :data:`MAX_YAML_VALUES` values.

    Aliases share one Python object, so loading a "billion laughs" file is cheap; what costs
    hours and all memory is everything that walks it afterwards (validation, ``repr`` in an
    error). So while composing, each node's *expanded* size is counted (an alias counts the
    whole node it names) and the file is refused as soon as one exceeds the limit.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._sizes: dict[int, int] = {}  # id(node) -> values once aliases are expanded

    def compose_node(self, parent: Any, index: Any) -> Any:
        is_alias = self.check_event(yaml.AliasEvent)
        mark = self.peek_event().start_mark
        node = super().compose_node(parent, index)
        if is_alias:
            size = self._sizes.get(id(node))
            if size is None:
                raise _YamlLimitError(
                    problem="an alias refers to the collection that contains it (a recursive "
                    "alias); write the value out",
                    problem_mark=mark,
                )
        else:
            size = 1 + sum(self._sizes[id(child)] for child in _children(node))
            self._sizes[id(node)] = size
        if size > MAX_YAML_VALUES:
            raise _YamlLimitError(
                problem=f"aliases here expand to more than {MAX_YAML_VALUES:,} values (a YAML "
                "'billion laughs'?); a recipe needs far fewer: write the values out or alias "
                "less",
                problem_mark=mark,
            )
        return node

    def compose_mapping_node(self, anchor: Any) -> Any:
        node = super().compose_mapping_node(anchor)
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue  # '<<' merges are meant to be overridden by the keys beside them
            key = self.construct_object(key_node)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the constructor reports it
                continue
            if first is not key_node:
                raise _YamlLimitError(
                    problem=f"duplicate key {short_repr(key)} (first on line "
                    f"{first.start_mark.line + 1}; the last would silently win); keep one",
                    problem_mark=key_node.start_mark,
                )
        return node


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def step(
    compressor: str,
    select: LayerSelector | dict[str, Any] | str | None = None,
    finetune: FinetuneConfig | dict[str, Any] | None = None,
    label: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    **config: Any,
) -> Step:
    """Build a step: ``step("magnitude", select={"types": ["Linear"]}, sparsity=0.9)``;
    ``overrides={"fc1": {"bits": 3}}`` sets config fields per layer (see :class:`Step`).

    A mistake fails here, not later in ``compress``: the step's own fields and, once the
    registry has installed its lookup, the compressor name (listing the registered ones), its
    config and the per-layer overrides (a :class:`RecipeError` listing every problem).
    """
    try:
        made = Step(
            compressor=compressor,
            config=config,
            overrides=overrides or {},
            select=select,
            finetune=finetune,
            label=label,
        )
    except ValidationError as exc:
        raise RecipeError(validation_lines(exc, _title(label or compressor, None))) from None
    problems = check_step(made)
    if problems:
        raise RecipeError("\n".join(problems))
    return made


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
