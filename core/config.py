"""Base class of every configuration model, and helpers to turn validation errors into text."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError


class NetshrinkConfig(BaseModel):
    """Base of every netshrink config: unknown keys are errors, not silently ignored options."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def _config_class_names() -> set[str]:
    """Names of every :class:`NetshrinkConfig` subclass defined so far."""
    names, todo = set(), [NetshrinkConfig]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


def _is_union_tag(part: object, is_last: bool, tags: set[str]) -> bool:
    """A config class name Pydantic puts in a location to say which union member failed (a
    dict key, e.g. a layer name in per-layer overrides, is never dropped unless it is one)."""
    return isinstance(part, str) and not is_last and part in tags


def format_validation_error(exc: ValidationError, where: str = "") -> str:
    """One line per failing field: ``<where> field.path: message (got value)``.

    For a field that accepts several types (a selector or a preset name), only the substantive
    error is shown: "Input should be a valid string" next to a real error in the selector is
    noise, and so is the member's class name in the field path.
    """
    errors = exc.errors()
    if any(not e["type"].endswith("_type") for e in errors):
        errors = [e for e in errors if not e["type"].endswith("_type")] or errors
    tags = _config_class_names()
    lines = []
    for err in errors:
        parts = err["loc"]
        loc = ".".join(
            str(p) for i, p in enumerate(parts) if not _is_union_tag(p, i == len(parts) - 1, tags)
        ) or "(config)"
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        got = err.get("input")
        got_text = "" if err["type"] == "missing" else f" (got {got!r})"
        if len(got_text) > 80:
            got_text = got_text[:77] + "...)"
        lines.append(f"{where}{': ' if where else ''}field '{loc}': {msg}{got_text}")
    return "\n".join(lines)
