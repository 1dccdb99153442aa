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
