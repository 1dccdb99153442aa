"""The model-adapter contract: what builds a model for a spec prefix, and what it tells the rest
(:class:`ModelInfo`). :func:`netshrink.load_model` looks adapters up in the registry."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar
from urllib.parse import parse_qsl

from torch import nn

from netshrink.errors import ModelSpecError

_INFO_ATTR = "_netshrink_info"


@dataclass
class ModelInfo:
    """What the rest of netshrink needs to know about a model built from a spec."""

    spec: str
    """``prefix:name`` the model was built from (without options)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Adapter options (JSON-able); ``spec`` + ``options`` rebuild the architecture."""
    input_shape: tuple[int, ...] | None = None
    """Shape of one input without the batch dimension, e.g. ``(1, 28, 28)``."""
    num_classes: int | None = None
    head: str | None = None
    """Qualified name of the classifier module, protected from compression by default."""
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelInfo:
        """Inverse of :meth:`to_json`."""
        data = dict(data)
        for key in ("input_shape", "mean", "std"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


class ModelAdapter(ABC):
    """Builds models for one spec prefix; registered through ``register_model_adapters``."""

    prefix: ClassVar[str]
    description: ClassVar[str] = ""

    @abstractmethod
    def load(self, name: str, **options: Any) -> tuple[nn.Module, ModelInfo]:
        """Build model ``name`` with ``options``; raise :class:`ModelSpecError` if unknown."""


def parse_spec(spec: str) -> tuple[str, str, dict[str, Any]]:
    """Split ``prefix:name?key=value&...`` into prefix, name and JSON-decoded options."""
    if ":" not in spec:
        raise ModelSpecError(
            f"model spec {spec!r} has no prefix; use e.g. 'zoo:lenet5', 'timm:resnet18', "
            "'torchvision:resnet18' or 'file:model.nsk'"
        )
    prefix, rest = spec.split(":", 1)
    name, _, query = rest.partition("?")
    options: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return prefix, name, options


def set_model_info(model: nn.Module, info: ModelInfo) -> None:
    """Attach ``info`` to ``model`` (survives ``copy.deepcopy``)."""
    model.__dict__[_INFO_ATTR] = info


def model_info(model: nn.Module) -> ModelInfo | None:
    """The :class:`ModelInfo` attached by :func:`load_model`, if any."""
    return model.__dict__.get(_INFO_ATTR)


def last_linear(model: nn.Module) -> str | None:
    """Qualified name of the last ``nn.Linear`` (the usual classifier head)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None
