"""The model-adapter contract: what builds a model for a spec prefix, and what it tells the rest
(:class:`ModelInfo`). :func:`netshrink.load_model` looks adapters up in the registry."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar
from urllib.parse import parse_qsl

import torch
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
    input_dtype: str | None = None
    """torch dtype name of the input when it is not float32, e.g. ``"int64"`` for token ids."""

    def example_input(
        self, batch: int = 1, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Zeros of ``(batch, *input_shape)`` in the input's dtype (token id 0 for integer
        inputs), for tools that need an input without data (MACs, latency, export)."""
        if self.input_shape is None:
            raise ModelSpecError(f"{self.spec or 'the model'}: no known input shape")
        dtype = getattr(torch, self.input_dtype or "float32", None)
        if not isinstance(dtype, torch.dtype):
            raise ModelSpecError(
                f"{self.spec or 'the model'}: input_dtype {self.input_dtype!r} is not a torch "
                "dtype name (e.g. 'float32', 'int64')"
            )
        return torch.zeros((batch, *self.input_shape), dtype=dtype, device=device)

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
