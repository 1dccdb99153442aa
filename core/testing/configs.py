"""Config checks of the conformance suite: JSON round trip, and invalid values built from the
JSON schema (out-of-bounds numbers, values outside an enum, wrong types, unknown keys)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError


@dataclass(frozen=True)
class InvalidValue:
    """One invalid config value the suite expects to be refused, and why it is invalid."""

    field: str
    value: Any
    reason: str


def _branches(schema: dict[str, Any], defs: dict[str, Any]) -> list[dict[str, Any]]:
    """The alternatives of a field schema (``anyOf``/``oneOf``), with ``$ref`` resolved."""
    if "$ref" in schema:
        schema = defs.get(schema["$ref"].rsplit("/", 1)[-1], {})
    for key in ("anyOf", "oneOf"):
        if key in schema:
            out: list[dict[str, Any]] = []
            for sub in schema[key]:
                out.extend(_branches(sub, defs))
            return out
    return [schema]


def _accepts_type(branches: list[dict[str, Any]], kinds: set[str]) -> bool:
    return any(b.get("type") in kinds or not b for b in branches)


def _step(branch: dict[str, Any], bound: float) -> float:
    """A step past ``bound`` that survives float rounding."""
    return 1 if branch.get("type") == "integer" else max(1e-6, abs(bound) * 1e-6)


def invalid_values(config_cls: type[BaseModel]) -> list[InvalidValue]:
    """Values that ``config_cls`` must refuse, derived from its JSON schema.

    For every numeric field with a bound: a value just past each bound. For every enum/Literal:
    a value outside it. For numeric, boolean and string fields: a value of the wrong type. Plus
    an unknown key (netshrink configs forbid extra keys).
    """
    schema = config_cls.model_json_schema()
    defs = schema.get("$defs", {})
    out: list[InvalidValue] = [InvalidValue("__not_a_field__", 1, "unknown key")]
    for name, prop in schema.get("properties", {}).items():
        branches = _branches(prop, defs)
        numeric = [b for b in branches if b.get("type") in ("number", "integer")]
        for b in numeric:
            if "minimum" in b:
                out.append(InvalidValue(name, b["minimum"] - _step(b, b["minimum"]),
                                        f"below minimum {b['minimum']}"))
            if "exclusiveMinimum" in b:
                out.append(InvalidValue(name, b["exclusiveMinimum"],
                                        f"not above exclusive minimum {b['exclusiveMinimum']}"))
            if "maximum" in b:
                out.append(InvalidValue(name, b["maximum"] + _step(b, b["maximum"]),
                                        f"above maximum {b['maximum']}"))
            if "exclusiveMaximum" in b:
                out.append(InvalidValue(name, b["exclusiveMaximum"],
                                        f"not below exclusive maximum {b['exclusiveMaximum']}"))
        enums = [b for b in branches if "enum" in b or "const" in b]
        if enums and len(enums) == len(branches):
            out.append(InvalidValue(name, "__not_an_option__", "not one of the allowed values"))
        # A wrong-typed value: only where no branch would accept it (e.g. not for str | float).
        if numeric and not _accepts_type(branches, {"string", "object", "array"}):
            out.append(InvalidValue(name, "not-a-number", "a string for a number"))
        elif (all(b.get("type") == "boolean" for b in branches)):
            out.append(InvalidValue(name, "maybe", "a non-boolean string for a boolean"))
        elif all(b.get("type") == "string" for b in branches) and not enums:
            out.append(InvalidValue(name, ["a", "list"], "a list for a string"))
    # Bounds can repeat when anyOf branches share them; keep the first of each.
    seen: set[tuple[str, str]] = set()
    unique = []
    for item in out:
        key = (item.field, json.dumps(item.value, default=str))
        if key not in seen:
            seen.add(key)
            unique.append(item)
    return unique


def check_roundtrip(config_cls: type[BaseModel], values: dict[str, Any] | None = None) -> None:
    """``Config.model_validate_json(cfg.model_dump_json()) == cfg`` and the schema is JSON."""
    cfg = config_cls.model_validate(values or {})
    again = config_cls.model_validate_json(cfg.model_dump_json())
    if again != cfg:
        raise AssertionError(
            f"{config_cls.__name__} does not round-trip through JSON: {cfg!r} -> "
            f"{cfg.model_dump_json()} -> {again!r}"
        )
    also = config_cls.model_validate(json.loads(json.dumps(cfg.model_dump(mode="json"))))
    if also != cfg:
        raise AssertionError(f"{config_cls.__name__}: model_dump(mode='json') does not round-trip")
    json.dumps(config_cls.model_json_schema())


def check_invalid(config_cls: type[BaseModel], base: dict[str, Any] | None = None) -> list[str]:
    """Build every :func:`invalid_values` case on top of ``base`` and return the failures (a
    value that was accepted, or refused without naming its field)."""
    failures = []
    for bad in invalid_values(config_cls):
        values = {**(base or {}), bad.field: bad.value}
        try:
            config_cls.model_validate(values)
        except ValidationError as exc:
            fields = {str(err["loc"][0]) for err in exc.errors() if err["loc"]}
            # Model-level validators report an empty loc; accept them if the message names it.
            if bad.field not in fields and bad.field not in str(exc):
                failures.append(f"{bad.field}={bad.value!r} ({bad.reason}) was refused but the "
                                f"error does not name the field: {exc}")
        else:
            failures.append(f"{bad.field}={bad.value!r} ({bad.reason}) was accepted")
    return failures


def undocumented_fields(config_cls: type[BaseModel]) -> list[str]:
    """Fields without a ``description`` (the CLI and the docs render descriptions)."""
    return [name for name, field in config_cls.model_fields.items() if not field.description]
