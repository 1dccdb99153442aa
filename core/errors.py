"""Exception hierarchy: every netshrink error subclasses :class:`NetshrinkError` and a builtin."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class NetshrinkError(Exception):
    """Base class of every error netshrink raises on purpose."""


class UnknownNameError(NetshrinkError, KeyError):
    """A name (compressor, dataset, adapter, selector preset) that no plugin registered."""

    def __init__(self, kind: str, name: str, known: Iterable[str]) -> None:
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        msg = f"Unknown {kind} {name!r}.{hint} Registered {kind}s: {', '.join(known) or '(none)'}."
        super().__init__(msg)
        self.kind, self.name, self.known, self.suggestions = kind, name, known, close

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class DuplicateNameError(NetshrinkError, ValueError):
    """Two plugins registered the same name."""


class ConfigError(NetshrinkError, ValueError):
    """A configuration value is invalid; the message names the step and the field."""


class RecipeError(ConfigError):
    """A recipe or pipeline step is invalid (validated before any work is done)."""


class SelectionError(NetshrinkError, ValueError):
    """A layer selector selected nothing, or selected layers a step cannot handle."""


class ModelSpecError(NetshrinkError, ValueError):
    """A model spec string could not be turned into a model."""


class DataError(NetshrinkError, ValueError):
    """A dataset is missing, malformed, or would need a download."""


class ArtifactError(NetshrinkError, ValueError):
    """A netshrink artifact is corrupted, truncated, foreign or inconsistent."""


class EncodingError(NetshrinkError, ValueError):
    """A tensor cannot be represented by the requested encoding."""


class WriteError(NetshrinkError, OSError):
    """A file could not be written (read-only folder, a folder in the way, disk full); the
    message names the path and the reason, and no temp file is left behind."""


class StepError(NetshrinkError, RuntimeError):
    """A step failed inside its compressor or its fine-tuning (e.g. the model's own forward
    raised); the message names the step, the compressor and the model, and the original
    exception is chained as ``__cause__``."""


class ExportError(NetshrinkError, ValueError):
    """An artifact could not be exported (``netshrink export``): the message names the format,
    the tensor and its encoding where one is at fault, and what to do instead."""


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``: how an error names the exception it wraps (torch's
    messages can run for pages; the whole one stays in the chained traceback)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
