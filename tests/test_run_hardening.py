"""A compression run refuses bad models and data before any work, wraps failures inside a step
in a netshrink error, and gives the same bytes whether the reference model was just trained or
loaded from the cache (issue 18)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import netshrink as ns
from netshrink import registry
from netshrink.data import DataSplits
from netshrink.errors import StepError

pytestmark = pytest.mark.usefixtures("single_thread")


def _registered(plugin: object, name: str) -> Iterator[object]:
    registry.register_plugin(plugin, name=name)
    try:
        yield plugin
    finally:
        registry.unregister_plugin(plugin)


# -- throwaway compressors ---------------------------------------------------------------------


class GradConfig(ns.CompressorConfig):
    """Configuration of :class:`GradPrune`."""


class GradPrune(ns.Compressor):
    """Taylor-style pruning that reads ``weight.grad`` after one backward pass without zeroing
    it first: it sees whatever gradient the model object already carries."""

    name = "hardening-gradprune"
    Config = GradConfig
    capabilities = ns.Capabilities(handles=("Linear", "Conv2d"), needs_data=True)

    def compress(self, model, layers, ctx):
        x, y = ctx.data.batch("train", 64)
        F.cross_entropy(model(x), y).backward()
        for name, module in layers:
            score = (module.weight.grad * module.weight).abs()
            ctx.prune(model, f"{name}.weight", score >= score.median())
        return ns.StepResult(model, [ns.LayerRecord(n, {}) for n, _ in layers], {})


class NanConfig(ns.CompressorConfig):
    """Configuration of :class:`NanStep`."""


class NanStep(ns.Compressor):
    """Writes a NaN into the first selected layer's weight (a broken method)."""

    name = "hardening-nan"
    Config = NanConfig
    capabilities = ns.Capabilities(handles=("Linear", "Conv2d"))

    def compress(self, model, layers, ctx):
        with torch.no_grad():
            layers[0][1].weight.view(-1)[0] = float("nan")
        return ns.StepResult(model, [], {})


class Plugin:
    """Registers the throwaway compressors."""

    @ns.hookimpl
    def register_compressors(self, register):
        register(GradPrune)
        register(NanStep)


@pytest.fixture
def plugin() -> Iterator[object]:
    yield from _registered(Plugin(), "hardening-test")


# -- models and data ---------------------------------------------------------------------------


class Mlp(nn.Module):
    """A small classifier on 8 features."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Fragile(Mlp):
    """Its forward fails once it is put back into training mode (as fine-tuning does)."""

    def forward(self, x):
        if self.training:
            raise RuntimeError("fragile forward: no training, please\nsecond line")
        return super().forward(x)


def _blobs(n: tuple[int, int, int] = (40, 10, 10), features: int = 8) -> DataSplits:
    gen = torch.Generator().manual_seed(0)
    total = sum(n)
    x = torch.randn(total, features, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    a, b = n[0], n[0] + n[1]
    return DataSplits(
        "blobs", TensorDataset(x[:a], y[:a]), TensorDataset(x[a:b], y[a:b]),
        TensorDataset(x[b:], y[b:]), num_classes=3,
    )


# -- cold vs warm reference cache --------------------------------------------------------------


def test_cold_and_warm_reference_cache_give_identical_bytes(plugin, monkeypatch, tmp_path, digits):
    from netshrink import models

    monkeypatch.setenv("NETSHRINK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(models.REFERENCE_EPOCHS, "lenet300", 2)  # a short training is enough
    steps = [
        ns.step("hardening-gradprune", select={"types": ["Linear"]}),
        ns.step("magnitude", sparsity=0.5, finetune={"epochs": 1}),
        ns.step("quantize", bits=6),
    ]
    runs = [ns.compress("zoo:lenet300", steps, data=digits, seed=3, latency=False)
            for _ in range(2)]
    assert list((tmp_path / "cache" / "reference").glob("*.safetensors"))  # it was cold once
    assert runs[0].artifact == runs[1].artifact


def test_mode_and_gradients_left_on_the_model_do_not_change_the_bytes(plugin, digits):
    # What training leaves on a model object (train mode, .grad) must not reach the run: a
    # method that runs a forward in the mode it finds would update BatchNorm statistics.
    model = ns.load_model("zoo:vgg_small", input_size=8)
    x, y = digits.batch("train", 8)
    F.cross_entropy(model.train()(x), y).backward()
    steps = [ns.step("hardening-gradprune", select={"types": ["Conv2d"]})]
    fresh = ns.compress(model, steps, data=digits, seed=0, latency=False)
    for p in model.parameters():
        p.grad = None
    loaded = ns.compress(model.eval(), steps, data=digits, seed=0, latency=False)
    assert fresh.artifact == loaded.artifact


# -- non-finite weights ------------------------------------------------------------------------


def test_nan_weights_are_refused_before_any_work():
    model = Mlp()
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
        model.fc2.bias[1] = float("inf")
    with pytest.raises(ns.ModelSpecError) as info:
        ns.compress(model, [ns.step("magnitude", sparsity=0.5)], latency=False)
    msg = str(info.value)
    assert "fc1.weight" in msg and "fc2.bias" in msg and "2 tensor" in msg
    assert "NaN" in msg


def test_many_nan_tensors_are_counted_and_the_list_cut():
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(8)])
    for p in model.parameters():
        p.data.fill_(float("nan"))
    with pytest.raises(ns.ModelSpecError, match=r"16 tensors: 0\.weight, 0\.bias, .*, \.\.\."):
        ns.compress(model, [ns.step("magnitude", sparsity=0.5)], latency=False)


def test_nan_buffer_is_refused():
    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    model[1].running_var.fill_(float("nan"))
    with pytest.raises(ns.ModelSpecError, match=r"1\.running_var"):
        ns.compress(model, [ns.step("magnitude", sparsity=0.5)], latency=False)


def test_step_that_produces_nan_is_named(plugin):
    with pytest.raises(ns.NetshrinkError) as info:
        ns.compress(Mlp(), [ns.step("magnitude", sparsity=0.5),
                            ns.step("hardening-nan", label="broken")], latency=False)
    msg = str(info.value)
    assert "step 1 (broken)" in msg and "hardening-nan" in msg and "fc1.weight" in msg


# -- data --------------------------------------------------------------------------------------


def test_empty_train_split_is_refused_by_datasplits():
    empty = TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))
    full = TensorDataset(torch.zeros(4, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ns.DataError, match=r"'tiny'.*'train' split is empty"):
        DataSplits("tiny", empty, full, full, num_classes=3)


@pytest.mark.parametrize("split", ["val", "test"])
def test_empty_val_or_test_split_is_refused_at_validation(split):
    data = _blobs((40, 0, 10) if split == "val" else (40, 10, 0))
    with pytest.raises(ns.DataError, match=rf"'blobs'.*'{split}' split is empty"):
        ns.compress(Mlp(), [ns.step("magnitude", sparsity=0.5)], data=data, latency=False)


def test_data_that_does_not_fit_the_model_is_refused_before_any_step(plugin):
    data = _blobs(features=5)
    with pytest.raises(ns.DataError) as info:
        # The nan step would corrupt the model if it ran: the probe must come first.
        ns.compress(Mlp(), [ns.step("hardening-nan")], data=data, latency=False)
    msg = str(info.value)
    assert "(5,)" in msg and "Mlp" in msg and "mat1 and mat2" in msg
    assert info.value.__cause__ is not None


def test_data_shape_mismatch_names_the_spec(digits28):
    model = ns.load_model("zoo:lenet5", input_size=8)  # built for 8x8, data is 28x28
    with pytest.raises(ns.DataError, match=r"\(1, 28, 28\).*zoo:lenet5"):
        ns.compress(model, [ns.step("magnitude", sparsity=0.5)], data=digits28, latency=False)


def test_class_count_mismatch_is_refused():
    with pytest.raises(ns.DataError, match=r"3 classes.*5 outputs"):
        ns.compress(Mlp(classes=5), [ns.step("magnitude", sparsity=0.5)], data=_blobs(),
                    latency=False)


# -- errors inside a step ----------------------------------------------------------------------


def test_model_forward_error_during_finetune_is_wrapped():
    steps = [ns.step("magnitude", sparsity=0.5, label="prune", finetune={"epochs": 1})]
    with pytest.raises(StepError) as info:
        ns.compress(Fragile(), steps, data=_blobs(), latency=False)
    msg = str(info.value)
    assert "step 0 (prune)" in msg and "magnitude" in msg and "Fragile" in msg
    assert "fragile forward: no training, please" in msg and "second line" not in msg
    assert isinstance(info.value.__cause__, RuntimeError)


class RaisingConfig(ns.CompressorConfig):
    """Configuration of :class:`Raising`."""


class Raising(ns.Compressor):
    """Raises a chosen exception from ``compress``."""

    name = "hardening-raise"
    Config = RaisingConfig
    capabilities = ns.Capabilities(handles=("Linear",))
    error: BaseException = ValueError("boom")

    def compress(self, model, layers, ctx):
        raise type(self).error


class RaisingPlugin:
    """Registers :class:`Raising`."""

    @ns.hookimpl
    def register_compressors(self, register):
        register(Raising)


@pytest.fixture
def raising() -> Iterator[type[Raising]]:
    for _ in _registered(RaisingPlugin(), "hardening-raise"):
        yield Raising


def test_plugin_error_inside_compress_is_wrapped(raising):
    model = ns.load_model("zoo:lenet300")
    with pytest.raises(StepError, match=r"step 0 \(hardening-raise\).*zoo:lenet300.*boom"):
        ns.compress(model, [ns.step("hardening-raise")], latency=False)


@pytest.mark.parametrize("error", [MemoryError("out"), KeyboardInterrupt()])
def test_memory_error_and_interrupt_pass_through(raising, monkeypatch, error):
    monkeypatch.setattr(raising, "error", error)
    with pytest.raises(type(error)):
        ns.compress(Mlp(), [ns.step("hardening-raise")], latency=False)


def test_file_spec_is_checked_before_reference_training(tmp_path, monkeypatch, digits28):
    from netshrink import models

    def no_training(*args, **kwargs):
        raise AssertionError("reference training started before the checks")

    monkeypatch.setattr(models, "train", no_training)
    monkeypatch.setenv("NETSHRINK_CACHE", str(tmp_path / "cache"))
    small = ns.load_model("zoo:lenet5", input_size=8)
    ns.save(small, tmp_path / "small.nsk")
    with pytest.raises(ns.DataError, match=r"\(1, 28, 28\).*zoo:lenet5"):
        ns.compress(f"file:{tmp_path / 'small.nsk'}", [ns.step("magnitude", sparsity=0.5)],
                    data=digits28, latency=False)
    # Artifacts with NaN are refused by the reader; plain weights are checked here.
    from safetensors.torch import save_file

    with torch.no_grad():
        small.conv1.weight[0, 0, 0, 0] = float("nan")
    save_file(small.state_dict(), str(tmp_path / "nan.safetensors"))
    spec = f"file:{tmp_path / 'nan.safetensors'}?arch=zoo:lenet5"
    with pytest.raises(ns.ModelSpecError, match=r"non-finite .*conv1\.weight"):
        ns.compress(spec, [ns.step("magnitude", sparsity=0.5)], data="digits", latency=False)
