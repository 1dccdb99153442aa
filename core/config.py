"""Base class of every configuration model, and helpers to turn validation errors into text."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError


class NetshrinkConfig(BaseModel):
    """Base of every netshrink config: unknown keys are errors, not silently ignored options."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def format_validation_error(exc: ValidationError, where: str = "") -> str:
    """One line per failing field: ``<where> field.path: message (got value)``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(config)"
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        got = err.get("input")
        got_text = "" if err["type"] == "missing" else f" (got {got!r})"
        if len(got_text) > 80:
            got_text = got_text[:77] + "...)"
        lines.append(f"{where}{': ' if where else ''}field '{loc}': {msg}{got_text}")
    return "\n".join(lines)
