"""The compressor contract: a named plugin class, a Pydantic config, declared capabilities."""

from __future__ import annotations

import difflib
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import ValidationError
from torch import nn

from netshrink.config import NetshrinkConfig, format_validation_error
from netshrink.errors import ConfigError, NetshrinkError, SelectionError
from netshrink.selector import LAYER_TYPES, check_name_patterns, name_matches

if TYPE_CHECKING:
    from netshrink.context import CompressionContext

_NAME = re.compile(r"^[a-z][a-z0-9-]*$")


class CompressorConfig(NetshrinkConfig):
    """Base class of every compressor's ``Config``: typed fields with bounds and descriptions."""

    def merged(self, override: Mapping[str, Any]) -> CompressorConfig:
        """This config with ``override``'s fields replacing its own, validated (raises
        ``ValidationError``): the config of the layers a step's ``overrides`` pattern matches.

        Fields nobody set stay unset, so a rule such as "give either bits or k" sees only what
        was given. A config with alternative fields overrides this to drop the alternative an
        override replaces (bioclust: an override's ``bits`` replaces the step's ``k``)."""
        return self.model_validate({**self.model_dump(exclude_unset=True), **override})


@dataclass(frozen=True)
class Capabilities:
    """What a compressor declares about itself; the pipeline validates recipes against it."""

    handles: tuple[str, ...]
    """Layer types it can compress (names from :data:`netshrink.selector.LAYER_TYPES`)."""
    needs_data: bool = False
    """It evaluates or trains on data (the pipeline refuses to run it without)."""
    changes_structure: bool = False
    """It changes module shapes or replaces modules (channel pruning, factorisation)."""
    needs_finetune: bool = False
    """Accuracy usually needs a fine-tune after it (planning a recipe logs a warning when
    neither this step nor a later one nor the recipe fine-tunes)."""
    encodes_values: bool = False
    """It restricts values to a grid or codebook (quantize, cluster): later steps may not
    rewrite those values."""
    default_types: tuple[str, ...] | None = None
    """Layer types selected when a step's selector names none (default: ``handles``)."""

    @property
    def selected_by_default(self) -> list[str]:
        """The layer types a selector without ``types`` picks for this compressor."""
        return list(self.default_types or self.handles)


@dataclass
class LayerRecord:
    """What a step did to one selected layer: ``LayerRecord(name, {"sparsity": 0.9})``.

    A compressor fills ``name`` and ``details``; the pipeline fills ``method`` and
    ``params_before``, which it knows."""

    name: str
    """Qualified module name of the layer (as selected)."""
    details: dict[str, Any] = field(default_factory=dict)
    """Method-specific figures (chosen ratio, rank, bits, clusters, ...), JSON-able."""
    method: str = field(default="", kw_only=True)
    """The compressor's name (filled by the pipeline)."""
    params_before: int = field(default=0, kw_only=True)
    """Parameters of the layer before the step (filled by the pipeline)."""


@dataclass(frozen=True)
class LayerOption:
    """One setting a compressor offers for one layer, for :func:`netshrink.search`:
    ``LayerOption("magnitude", {"sparsity": 0.9}, bytes=26_712)``.

    ``config`` holds config fields for that layer only (a step's per-layer override when they
    are all in the compressor's :attr:`~Compressor.layer_fields`, else the config of a step that
    selects just that layer); ``bytes`` are the exact stored bytes of the layer's tensors with
    this option alone, from the encodings (weight and bias, new tensors of a factorised layer)."""

    compressor: str
    """The compressor's registered name."""
    config: dict[str, Any]
    """Config fields for this layer (JSON-able values)."""
    bytes: int
    """Exact stored bytes of the layer's tensors with this option applied alone."""
    macs: int | None = None
    """Multiply-accumulates per sample of the layer with this option (None: as dense)."""

    @property
    def label(self) -> str:
        """A short label, e.g. ``magnitude(sparsity=0.9)``."""
        fields = ",".join(f"{k}={v}" for k, v in sorted(self.config.items()))
        return f"{self.compressor}({fields})"


@dataclass
class StepResult:
    """A compressor's output: the compressed model, per-layer records, step-level figures."""

    model: nn.Module
    records: list[LayerRecord] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


class Compressor(ABC):
    """Base class of every compression method.

    Subclasses set ``name`` (kebab-case id), ``Config`` (a :class:`CompressorConfig`),
    ``capabilities`` and ideally ``paper``; and implement :meth:`compress`, which must record
    how each tensor it changed is stored, through ``ctx.encode(model, tensor_name, encoding)``.
    A compressor that honours a step's per-layer ``overrides`` lists the fields in
    ``layer_fields`` and reads them through ``self.config_for(layer_name)``.

    Example::

        class RandomPrune(Compressor):
            \"\"\"Prune a random fraction of weights (a baseline).\"\"\"
            name = "random-prune"
            class Config(CompressorConfig):
                sparsity: float = Field(0.5, ge=0, lt=1, description="Fraction removed.")
            capabilities = Capabilities(handles=("Linear", "Conv2d"))

            def compress(self, model, layers, ctx):
                ...
                return StepResult(model, records)
    """

    name: ClassVar[str]
    Config: ClassVar[type[CompressorConfig]] = CompressorConfig
    capabilities: ClassVar[Capabilities]
    paper: ClassVar[str | None] = None
    #: Config fields a step's ``overrides`` may set per layer: those :meth:`compress` reads
    #: through :meth:`config_for`. Empty: one config for every layer, and overrides are refused
    #: (rather than silently ignored).
    layer_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        config: CompressorConfig | dict[str, Any] | None = None,
        *,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        if isinstance(config, self.Config):
            self.config = config
        else:
            self.config = self.Config.model_validate(config or {})
        self.overrides: dict[str, dict[str, Any]] = {
            pattern: dict(fields) for pattern, fields in (overrides or {}).items()
        }
        """The step's per-layer overrides: layer-name pattern -> partial config."""
        self._layer_configs = self.override_configs(self.config, self.overrides)

    def config_for(self, layer: str) -> CompressorConfig:
        """The config for layer ``layer``: the step's config merged with the first override
        whose pattern matches ``layer`` (validated when the compressor was built), or the
        step's config when no pattern matches."""
        for pattern, config in self._layer_configs:
            if name_matches(pattern, layer):
                return config
        return self.config

    @classmethod
    def override_configs(
        cls,
        config: CompressorConfig,
        overrides: Mapping[str, Mapping[str, Any]],
        where: str = "",
    ) -> list[tuple[str, CompressorConfig]]:
        """Validate per-layer ``overrides`` against the step's ``config``: each pattern
        compiles, sets only :attr:`layer_fields`, and merges into a valid config.

        Returns ``(pattern, merged config)`` in order. Raises :class:`ConfigError` with one
        line per problem, each naming ``overrides.<pattern>.<field>`` (prefixed by ``where``).
        """
        prefix = f"{where}: " if where else ""
        problems: list[str] = []
        merged: list[tuple[str, CompressorConfig]] = []
        for pattern, fields in overrides.items():
            key = f"overrides.{pattern}"
            try:
                check_name_patterns([pattern])
            except ValueError as exc:
                problems.append(f"{prefix}field '{key}': {exc}")
                continue
            refused = [
                f"{prefix}field '{key}.{name}': {cls._not_per_layer(name, value)}"
                for name, value in fields.items()
                if name not in cls.layer_fields
            ]
            if refused:
                problems += refused
                continue
            try:
                merged.append((pattern, config.merged(fields)))
            except ValidationError as exc:
                # Lines read "field 'bits': ..." or, for a cross-field rule, "field '(config)'".
                for line in format_validation_error(exc).splitlines():
                    name, _, message = line.removeprefix("field '").partition("': ")
                    path = key if name == "(config)" else f"{key}.{name}"
                    problems.append(f"{prefix}field '{path}': {message}")
        if problems:
            raise ConfigError("\n".join(problems))
        return merged

    @classmethod
    def _not_per_layer(cls, name: str, value: Any) -> str:
        allowed = ", ".join(cls.layer_fields)
        valid = f"per-layer fields: {allowed}" if allowed else f"{cls.name!r} takes no overrides"
        if name in cls.Config.model_fields:
            return (
                f"{cls.name!r} reads {name!r} once for the whole step, not per layer "
                f"(got {value!r}); {valid}"
            )
        close = difflib.get_close_matches(name, cls.layer_fields, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{cls.name!r} has no config field {name!r} (got {value!r}); {valid}{hint}"

    @abstractmethod
    def compress(
        self, model: nn.Module, layers: list[tuple[str, nn.Module]], ctx: CompressionContext
    ) -> StepResult:
        """Compress ``layers`` of ``model`` (in place or a new module) and return the result."""

    @classmethod
    def layer_options(cls, module: nn.Module, name: str) -> list[LayerOption]:
        """The settings this compressor offers for layer ``name`` (``module``) in a search,
        each with its exact stored bytes computed from the encodings without data (build the
        encoding of the weight and take its ``payload_bytes``). Default: none (the compressor
        takes no part in :func:`netshrink.search`).

        A compressor that implements it joins the search with no change to the core; options
        from compressors that do not change structure combine on one layer (prune, then
        quantize), in the order structural, then pruning, then value-encoding."""
        return []

    @classmethod
    def option(
        cls, config: Mapping[str, Any], *, bytes: int, macs: int | None = None
    ) -> LayerOption:
        """A :class:`LayerOption` of this compressor (for :meth:`layer_options`): ``config``
        is validated against :attr:`Config` now, so a bad option fails where it is declared."""
        try:
            cls.Config.model_validate(dict(config))
        except ValidationError as exc:
            raise ConfigError(
                f"{cls.name!r} declares an invalid layer option {dict(config)!r}: "
                f"{format_validation_error(exc)}"
            ) from None
        return LayerOption(cls.name, dict(config), int(bytes), macs)

    @classmethod
    def capabilities_for(cls, config: CompressorConfig) -> Capabilities:
        """The capabilities with this ``config`` (e.g. structural only in a channel mode);
        the pipeline validates recipes with it. Default: :attr:`capabilities`."""
        return cls.capabilities

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    @classmethod
    def handled_types(cls) -> tuple[type[nn.Module], ...]:
        """The torch classes of :attr:`Capabilities.handles`."""
        return tuple(LAYER_TYPES[t] for t in cls.capabilities.handles)

    @classmethod
    def check_layers(cls, layers: list[tuple[str, nn.Module]], where: str = "") -> None:
        """Refuse layers of types this compressor does not declare."""
        bad = [(n, type(m).__name__) for n, m in layers if not isinstance(m, cls.handled_types())]
        if bad:
            shown = ", ".join(f"{n} ({t})" for n, t in bad[:5])
            raise SelectionError(
                f"{where}{cls.name!r} handles {list(cls.capabilities.handles)} but the selector "
                f"picked {shown}{' ...' if len(bad) > 5 else ''}; add 'types' to the selector"
            )

    @classmethod
    def validate_class(cls) -> None:
        """Check the class is a well-formed plugin (called when it is registered)."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not _NAME.match(name):
            raise NetshrinkError(f"{cls.__qualname__}.name must be a kebab-case id, got {name!r}")
        if not (isinstance(cls.Config, type) and issubclass(cls.Config, CompressorConfig)):
            raise NetshrinkError(f"{cls.__qualname__}.Config must subclass CompressorConfig")
        caps = getattr(cls, "capabilities", None)
        if not isinstance(caps, Capabilities):
            raise NetshrinkError(f"{cls.__qualname__}.capabilities must be a Capabilities")
        unknown = [t for t in caps.handles if t not in LAYER_TYPES]
        if unknown or not caps.handles:
            raise NetshrinkError(
                f"{cls.__qualname__}.capabilities.handles has unknown types {unknown}; "
                f"known: {sorted(LAYER_TYPES)}"
            )
        per_layer = cls.layer_fields
        if not isinstance(per_layer, tuple) or any(
            f not in cls.Config.model_fields for f in per_layer
        ):
            raise NetshrinkError(
                f"{cls.__qualname__}.layer_fields must be a tuple of its Config's field names, "
                f"got {per_layer!r}; fields: {sorted(cls.Config.model_fields)}"
            )
