"""Layer selectors: which modules of a model a step acts on."""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from collections.abc import Callable, Iterable

from pydantic import Field, field_validator
from torch import nn

from netshrink.config import NetshrinkConfig
from netshrink.errors import SelectionError

#: Layer-type names a selector accepts, mapped to torch classes (subclasses match too).
LAYER_TYPES: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear,
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "Conv3d": nn.Conv3d,
    "ConvTranspose2d": nn.ConvTranspose2d,
    "BatchNorm2d": nn.BatchNorm2d,
    "Embedding": nn.Embedding,
}


def name_matches(pattern: str, name: str) -> bool:
    """True if layer ``name`` matches ``pattern``: a shell glob, or a regex after ``re:``
    (searched anywhere in the name; anchor it with ``^...$`` for a whole-name match)."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def check_name_patterns(patterns: Iterable[str]) -> None:
    """Raise ``ValueError`` naming the first ``re:`` pattern that is not a valid regex.

    For Pydantic validators of fields holding layer-name patterns (selectors, per-layer
    overrides), so that a typo fails validation instead of the run.
    """
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise ValueError(f"pattern {pattern!r} is not a valid regex: {exc}") from None


def out_channels(module: nn.Module) -> int | None:
    """Output channels of a conv, output features of a linear layer, else None."""
    for attr in ("out_channels", "out_features", "num_embeddings"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    return None


def is_depthwise(module: nn.Module) -> bool:
    """True for a grouped conv with one input channel per group."""
    groups = getattr(module, "groups", 1)
    return groups > 1 and groups == getattr(module, "in_channels", -1)


def own_params(module: nn.Module) -> int:
    """Number of parameters a module holds directly."""
    return sum(p.numel() for p in module.parameters(recurse=False))


class LayerSelector(NetshrinkConfig):
    """Picks the layers a step acts on; resolves against a model to ordered (name, module) pairs.

    Name patterns are shell globs (``features.*``) or regular expressions prefixed with ``re:``.
    """

    types: list[str] | None = Field(
        None,
        description="Layer types to select (e.g. ['Conv2d', 'Linear']); subclasses match. "
        "Default: the types the step's compressor selects by default (usually all it handles).",
    )
    names: list[str] | None = Field(
        None,
        description="Only layers whose qualified name matches one of these globs/'re:' regexes.",
    )
    exclude: list[str] = Field(
        default_factory=list, description="Drop layers whose name matches one of these patterns."
    )
    min_params: int | None = Field(
        None, ge=0, description="Only layers with at least this many parameters."
    )
    max_params: int | None = Field(
        None, ge=0, description="Only layers with at most this many parameters."
    )
    min_channels: int | None = Field(
        None, ge=0, description="Only layers with at least this many output channels/features."
    )
    max_channels: int | None = Field(
        None, ge=0, description="Only layers with at most this many output channels/features."
    )
    skip_first: int = Field(0, ge=0, description="Skip this many of the first matching layers.")
    skip_last: int = Field(0, ge=0, description="Skip this many of the last matching layers.")
    skip_depthwise: bool = Field(False, description="Skip depthwise convolutions.")
    protect_head: bool = Field(
        True, description="Leave the model's classifier head alone (the adapter names it)."
    )

    @field_validator("names", "exclude")
    @classmethod
    def _valid_patterns(cls, value: list[str] | None) -> list[str] | None:
        check_name_patterns(value or [])
        return value

    @field_validator("types")
    @classmethod
    def _known_types(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value:
                raise ValueError("types must not be empty; omit it to use the compressor's types")
            unknown = [t for t in value if t not in LAYER_TYPES]
            if unknown:
                raise ValueError(f"unknown layer type(s) {unknown}; known: {sorted(LAYER_TYPES)}")
        return value

    def describe(self) -> str:
        """The non-default fields, compactly."""
        return str(self.model_dump(exclude_defaults=True)) or "{}"

    def resolve(
        self, model: nn.Module, *, head: str | None = None, default_types: list[str] | None = None
    ) -> list[tuple[str, nn.Module]]:
        """The selected ``(qualified_name, module)`` pairs in model order.

        Raises :class:`SelectionError` naming what was asked and what the model has when
        nothing is selected.
        """
        picked = self.filter(model, head=head, default_types=default_types)
        if not picked:
            raise SelectionError(
                f"selector {self.describe()} selected no layers"
                + (
                    f" (types default to {default_types})"
                    if self.types is None and default_types
                    else ""
                )
                + f". The model has: {summarize_layers(model)}"
                + (
                    f"; head {head!r} is protected (set protect_head: false to include it)"
                    if head and self.protect_head
                    else ""
                )
            )
        return picked

    def filter(
        self, model: nn.Module, *, head: str | None = None, default_types: list[str] | None = None
    ) -> list[tuple[str, nn.Module]]:
        """Like :meth:`resolve` but returns an empty list instead of raising."""
        type_names = self.types or default_types or list(LAYER_TYPES)
        classes = tuple(LAYER_TYPES[t] for t in type_names if t in LAYER_TYPES)
        found = [(n, m) for n, m in model.named_modules() if n and isinstance(m, classes)]
        if self.skip_first:
            found = found[self.skip_first :]
        if self.skip_last:
            found = found[: len(found) - self.skip_last] if self.skip_last < len(found) else []
        keep: Callable[[str, nn.Module], bool] = self._predicate(head)
        return [(n, m) for n, m in found if keep(n, m)]

    def _predicate(self, head: str | None) -> Callable[[str, nn.Module], bool]:
        def keep(name: str, module: nn.Module) -> bool:
            if self.names is not None and not any(name_matches(p, name) for p in self.names):
                return False
            if any(name_matches(p, name) for p in self.exclude):
                return False
            if self.protect_head and head and (name == head or name.startswith(head + ".")):
                return False
            params = own_params(module)
            if self.min_params is not None and params < self.min_params:
                return False
            if self.max_params is not None and params > self.max_params:
                return False
            channels = out_channels(module)
            if channels is not None:
                if self.min_channels is not None and channels < self.min_channels:
                    return False
                if self.max_channels is not None and channels > self.max_channels:
                    return False
            return not (self.skip_depthwise and is_depthwise(module))

        return keep


def summarize_layers(model: nn.Module, limit: int = 6) -> str:
    """E.g. ``Conv2d x2 (conv1, conv2), Linear x3 (fc1, fc2, fc3)``."""
    groups: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if name and isinstance(module, tuple(LAYER_TYPES.values())):
            groups.setdefault(type(module).__name__, []).append(name)
    if not groups:
        counts = Counter(type(m).__name__ for n, m in model.named_modules() if n)
        return (
            "no Linear/Conv layers (modules: "
            + ", ".join(f"{k} x{v}" for k, v in counts.items())
            + ")"
        )
    parts = []
    for kind, names in groups.items():
        shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
        parts.append(f"{kind} x{len(names)} ({shown})")
    return ", ".join(parts)
