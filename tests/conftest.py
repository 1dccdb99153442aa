"""Test configuration: hermetic plugin loading, a shared cache, quiet progress bars."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Third-party plugins installed in the environment must not leak into the in-process tests
# (subprocess tests set their own environment). Built-ins always load.
os.environ["NETSHRINK_PLUGINS"] = ""
os.environ.setdefault("NETSHRINK_PROGRESS", "0")
os.environ.setdefault("NETSHRINK_CACHE", str(Path(__file__).resolve().parent.parent / ".cache"))


@pytest.fixture
def small_shapes(monkeypatch):
    """Make every ``shapes`` dataset name load a 400-image build of the same generator at the
    same size and channels: enough to plan or validate against, not 70,000 images."""
    import netshrink.plugins.shapes as shapes_plugin

    full = shapes_plugin.shapes
    monkeypatch.setattr(shapes_plugin, "shapes", lambda size, gray, **_: full(
        size, gray, n_train=200, n_val=100, n_test=100))


@pytest.fixture(scope="session")
def digits28():
    """The 28x28 digits splits."""
    import netshrink as ns

    return ns.datasets.load("digits28")


@pytest.fixture(scope="session")
def digits():
    """The 8x8 digits splits (the fastest to train on)."""
    import netshrink as ns

    return ns.datasets.load("digits")


@pytest.fixture(scope="session")
def lenet(digits):
    """LeNet-5 trained on the 8x8 digits (cached): two convs, two linear layers; trains fast."""
    import netshrink as ns

    return ns.reference_model("zoo:lenet5", digits)


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module: tiny models train much faster so on a busy machine.

    Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def lenet5(digits28):
    """LeNet-5 trained on digits28 (cached on disk across runs)."""
    import netshrink as ns

    return ns.reference_model("zoo:lenet5", digits28)


@pytest.fixture(scope="session")
def lenet300(digits28):
    """LeNet-300-100 trained on digits28 (cached on disk across runs)."""
    import netshrink as ns

    return ns.reference_model("zoo:lenet300", digits28)


@pytest.fixture
def fresh_registry():
    """Reload plugins from scratch around a test (env changes take effect)."""
    from netshrink import registry

    registry.reset()
    try:
        yield registry
    finally:
        registry.reset()


@pytest.fixture
def split_net():
    """A factory of a small CNN whose channel split Torch-Pruning cannot update: pruning
    ``conv1``'s outputs breaks module ``mix`` (its split sizes live in an attribute, as in timm's
    MixedConv2d). ``conv1`` and ``conv2`` have clearly weak filters (2 and 3)."""
    import torch
    from torch import nn

    class FixedSplit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.sizes = [4, 4]

        def forward(self, x):
            xa, xb = torch.split(x, self.sizes, 1)
            return torch.cat([self.a(xa), self.b(xb)], 1)

    class SplitNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
            self.mix = FixedSplit()
            self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            x = self.mix(torch.relu(self.conv1(x)))
            return self.fc(self.pool(torch.relu(self.conv2(x))).flatten(1))

    def build() -> nn.Module:
        torch.manual_seed(0)
        model = SplitNet().eval()
        with torch.no_grad():
            model.conv1.weight[[1, 5]] *= 0.01
            model.conv2.weight[[2, 7, 11]] *= 0.01
        return model

    return build
