"""The compressor contract: a named plugin class, a Pydantic config, declared capabilities."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from netshrink.config import NetshrinkConfig
from netshrink.errors import NetshrinkError, SelectionError
from netshrink.selector import LAYER_TYPES

if TYPE_CHECKING:
    from netshrink.context import CompressionContext

_NAME = re.compile(r"^[a-z][a-z0-9-]*$")


class CompressorConfig(NetshrinkConfig):
    """Base class of every compressor's ``Config``: typed fields with bounds and descriptions."""


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
    #: Fast config overrides the conformance suite (netshrink.testing) uses for this compressor.
    conformance_config: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: CompressorConfig | dict[str, Any] | None = None) -> None:
        if isinstance(config, self.Config):
            self.config = config
        else:
            self.config = self.Config.model_validate(config or {})

    @abstractmethod
    def compress(
        self, model: nn.Module, layers: list[tuple[str, nn.Module]], ctx: CompressionContext
    ) -> StepResult:
        """Compress ``layers`` of ``model`` (in place or a new module) and return the result."""

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
