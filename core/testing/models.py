"""Tiny models for the conformance suite: one per layer type, sized for the 8x8 ``digits`` data.

They are served by a ``conformance:`` model adapter (``conformance:mlp``, ``conformance:cnn``...)
so that an artifact saved from them can be rebuilt by :func:`netshrink.load` like any zoo model.
The adapter is registered on demand by :func:`ensure_registered` (the conformance suite and the
pytest plugin call it), not as a built-in: it is a test fixture, not a model anyone ships.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from netshrink.adapters import ModelAdapter, ModelInfo
from netshrink.errors import ModelSpecError, UnknownNameError
from netshrink.registry import hookimpl

PREFIX = "conformance"
PLUGIN_NAME = "netshrink-testing"
INPUT_SHAPE = (1, 8, 8)
NUM_CLASSES = 10


class TinyMLP(nn.Module):
    """Linear layers: 64 → 32 → 32 → 10."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(self.flatten(x)))
        return self.head(torch.relu(self.fc2(x)))


class TinyCNN(nn.Module):
    """Conv2d layers: two 3x3 convs (16 and 32 channels), each followed by a max-pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(32 * 2 * 2, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.head(self.flatten(x))


class TinyBNCNN(nn.Module):
    """BatchNorm2d layers: conv-BN-ReLU-pool twice and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(32 * 2 * 2, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        return self.head(self.flatten(x))


class TinyConv1d(nn.Module):
    """Conv1d layers: the 8x8 image read as 8 channels of length 8."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(8, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv1d(16, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool1d(4)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(32 * 2, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 8, 8)
        x = self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x)))))
        return self.head(self.flatten(x))


class TinyConv3d(nn.Module):
    """Conv3d layers: the image as a one-frame volume, (1, 3, 3) kernels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(1, 16, (1, 3, 3), padding=(0, 1, 1))
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool3d((1, 2, 2))
        self.conv2 = nn.Conv3d(16, 32, (1, 3, 3), padding=(0, 1, 1))
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool3d((1, 2, 2))
        self.flatten = nn.Flatten()
        self.head = nn.Linear(32 * 2 * 2, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x.unsqueeze(2))))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.head(self.flatten(x))


class TinyDeconv(nn.Module):
    """ConvTranspose2d layers: a strided conv down to 4x4, two transposed convs back to 8x8."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.relu0 = nn.ReLU()
        self.up1 = nn.ConvTranspose2d(8, 16, 2, stride=2)
        self.relu1 = nn.ReLU()
        self.up2 = nn.ConvTranspose2d(16, 16, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(4)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(16 * 2 * 2, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.up1(self.relu0(self.down(x))))
        return self.head(self.flatten(self.pool(self.relu2(self.up2(x)))))


class TinyEmbedding(nn.Module):
    """Embedding layer: each pixel quantised to one of 16 levels; (position, level) pairs are
    embedded, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        # Normalised digits pixels lie in about [-0.8, 2.7]; 15 edges give 16 levels. Not
        # persistent: the constructor rebuilds them, so the artifact need not store them.
        self.register_buffer("edges", torch.linspace(-0.8, 2.7, 15), persistent=False)
        self.register_buffer("offsets", torch.arange(64) * 16, persistent=False)
        self.embed = nn.Embedding(64 * 16, 4)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(64 * 4, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = torch.bucketize(x.reshape(x.shape[0], -1), self.edges) + self.offsets
        return self.head(self.flatten(self.embed(tokens)))


#: Tiny model name → (class, layer types it exercises).
TINY_MODELS: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "mlp": (TinyMLP, ("Linear",)),
    "cnn": (TinyCNN, ("Conv2d",)),
    "bn": (TinyBNCNN, ("BatchNorm2d",)),
    "conv1d": (TinyConv1d, ("Conv1d",)),
    "conv3d": (TinyConv3d, ("Conv3d",)),
    "deconv": (TinyDeconv, ("ConvTranspose2d",)),
    "embedding": (TinyEmbedding, ("Embedding",)),
}


def model_for_type(layer_type: str) -> str | None:
    """The tiny model (``conformance:<name>`` spec) that exercises ``layer_type``, if any."""
    for name, (_, types) in TINY_MODELS.items():
        if layer_type in types:
            return f"{PREFIX}:{name}"
    return None


class ConformanceAdapter(ModelAdapter):
    """``conformance:<name>``: the suite's tiny models (untrained unless ``trained=1``)."""

    prefix = PREFIX
    description = "netshrink.testing tiny models: " + ", ".join(TINY_MODELS)

    def load(self, name: str, **options: Any) -> tuple[nn.Module, ModelInfo]:
        if name not in TINY_MODELS:
            raise UnknownNameError("conformance model", name, TINY_MODELS)
        if options:
            raise ModelSpecError(f"conformance:{name} takes no options, got {sorted(options)}")
        # Seeded so that a rebuilt architecture (artifact load) starts from the same init.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = TINY_MODELS[name][0]()
        info = ModelInfo(spec=f"{PREFIX}:{name}", options={}, input_shape=INPUT_SHAPE,
                         num_classes=NUM_CLASSES, head="head")
        return model, info

    def names(self) -> list[str]:
        return list(TINY_MODELS)


class _AdapterPlugin:
    """The throwaway plugin object that registers :class:`ConformanceAdapter`."""

    @hookimpl
    def register_model_adapters(self, register: Any) -> None:
        register(ConformanceAdapter())


def ensure_registered() -> None:
    """Register the ``conformance:`` adapter unless it is already there (idempotent; call it
    again after :func:`netshrink.registry.reset`)."""
    from netshrink.registry import model_adapters, pm, register_plugin

    if PREFIX in model_adapters():
        return
    if pm.has_plugin(PLUGIN_NAME):  # registered but shadowed: let the registry say why
        return
    register_plugin(_AdapterPlugin(), name=PLUGIN_NAME)


_TRAINED: dict[str, dict[str, torch.Tensor]] = {}


def tiny_model(spec: str, *, trained: bool = True, epochs: int = 3) -> nn.Module:
    """A fresh copy of a tiny model, briefly trained on ``digits`` (weights cached per process),
    so that accuracy-driven compressors see a model that has learned something."""
    from netshrink.datasets import load as load_data
    from netshrink.models import load_model
    from netshrink.training import FinetuneConfig, train

    ensure_registered()
    model = load_model(spec)
    if trained:
        if spec not in _TRAINED:
            reference = copy.deepcopy(model)
            train(reference, load_data("digits"), FinetuneConfig(epochs=epochs, lr=3e-3),
                  seed=0, desc=f"training {spec}")
            _TRAINED[spec] = {k: v.detach().clone() for k, v in reference.state_dict().items()}
        model.load_state_dict(_TRAINED[spec])
    model.eval()
    return model
