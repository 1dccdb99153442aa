"""The scan's reuse of the reference's activations (``netshrink.search_prefix``): a candidate
measured from its first changed module gives the figures of the whole model, and every case
where replaying would be wrong is caught."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from netshrink import search_scan
from netshrink.search_prefix import PrefixCache, PrefixMismatch

pytestmark = pytest.mark.usefixtures("single_thread")


class Block(nn.Module):
    """A residual block with a shared in-place ReLU (called twice) and ``out += identity``."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = Net()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):  # statistics that are not the identity
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _inputs(n: int = 40) -> torch.Tensor:
    return torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def _batches(inputs: torch.Tensor, size: int = 16) -> list[torch.Tensor]:
    return [inputs[i : i + size] for i in range(0, len(inputs), size)]


@torch.no_grad()
def _outputs(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(b) for b in _batches(inputs)])


@pytest.mark.parametrize("layer", ["stem", "blocks.0.conv2", "blocks.1.conv1", "fc"])
def test_replay_from_the_changed_layer_gives_the_whole_models_outputs(layer):
    reference, inputs = _net(), _inputs()
    cache = PrefixCache(reference, _batches(inputs), max_bytes=1 << 30)
    candidate = copy.deepcopy(reference)
    with torch.no_grad():
        candidate.get_submodule(layer).weight.mul_(0.5)
    expected = _outputs(candidate, inputs)
    order = list(dict.fromkeys(cache.order))
    for _ in range(2):  # the recorded outputs are intact after a replay
        with cache.patch(candidate) as patched:
            got = _outputs(candidate, inputs)
        assert torch.equal(got, expected)
    assert layer not in patched
    # patched: every module that runs only before the layer, except the shared ReLU of a
    # block that the layer is in (it also runs after the layer)
    before = order[: order.index(layer)]
    shared = {"blocks.0.relu"} if layer == "blocks.0.conv2" else set()
    if layer == "blocks.1.conv1":
        shared = {"blocks.1.relu"}
    assert set(patched) == set(before) - shared
    assert set(patched).isdisjoint(order[order.index(layer):])


def test_the_convolutions_before_the_layer_do_not_run(monkeypatch):
    reference, inputs = _net(), _inputs()
    cache = PrefixCache(reference, _batches(inputs), max_bytes=1 << 30)
    candidate = copy.deepcopy(reference)
    with torch.no_grad():
        candidate.fc.weight.mul_(0.5)
    calls, convolve = [0], nn.Conv2d._conv_forward

    def counted(self, *args):
        calls[0] += 1
        return convolve(self, *args)

    monkeypatch.setattr(nn.Conv2d, "_conv_forward", counted)
    with cache.patch(candidate):
        _outputs(candidate, inputs)
    assert calls[0] == 0
    _outputs(candidate, inputs)  # unpatched again after the block
    assert calls[0] == 5 * len(_batches(inputs))


def test_a_replaced_layer_is_where_replay_stops():
    reference, inputs = _net(), _inputs()
    cache = PrefixCache(reference, _batches(inputs), max_bytes=1 << 30)
    candidate = copy.deepcopy(reference)
    old = candidate.blocks[1].conv2
    candidate.blocks[1].conv2 = nn.Sequential(  # a factorised layer, as svd/tucker build
        nn.Conv2d(8, 2, 1, bias=False), nn.Conv2d(2, 8, 3, padding=1)
    )
    with torch.no_grad():
        candidate.blocks[1].conv2[1].bias.copy_(old.bias)
    with cache.patch(candidate) as patched:
        got = _outputs(candidate, inputs)
    assert torch.equal(got, _outputs(candidate, inputs))
    assert "blocks.1.conv1" in patched and "blocks.1.bn2" not in patched


def test_a_change_outside_every_leaf_module_turns_replay_off():
    class Scaled(Net):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return super().forward(x * self.scale)

    torch.manual_seed(0)
    reference, inputs = Scaled().eval(), _inputs()
    cache = PrefixCache(reference, _batches(inputs), max_bytes=1 << 30)
    candidate = copy.deepcopy(reference)
    with torch.no_grad():
        candidate.scale.fill_(2.0)
    with cache.patch(candidate) as patched:
        got = _outputs(candidate, inputs)
    assert patched == []
    assert torch.equal(got, _outputs(candidate, inputs))


def test_a_module_of_another_type_or_setting_is_not_replayed():
    reference, inputs = _net(), _inputs()
    cache = PrefixCache(reference, _batches(inputs), max_bytes=1 << 30)
    candidate = copy.deepcopy(reference)
    candidate.blocks[0].relu = nn.LeakyReLU(0.5)  # no parameters: the state is unchanged
    with torch.no_grad():
        candidate.fc.weight.mul_(0.5)
    with cache.patch(candidate) as patched:
        got = _outputs(candidate, inputs)
    # replay stops where the swapped module first runs, although the first change of a
    # tensor is at the head
    assert patched == ["stem", "blocks.0.conv1", "blocks.0.bn1"]
    assert torch.equal(got, _outputs(candidate, inputs))


class Branchy(nn.Module):
    """Calls ``a`` once more when the input's mean is positive (data-dependent control)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        y = self.a(x)
        if float(x.mean()) > 0:
            y = self.a(y)
        return self.b(y)


@pytest.mark.parametrize(("recorded", "replayed", "message"), [
    (-5, 5, "'a' called more often than recorded"),
    (5, -5, "'a' called 1 times, recorded 2"),
])
def test_data_dependent_calls_are_caught(recorded, replayed, message):
    torch.manual_seed(0)
    reference = Branchy().eval()
    inputs = torch.randn(8, 4)
    cache = PrefixCache(reference, [inputs + recorded], max_bytes=1 << 30)
    candidate = copy.deepcopy(reference)
    with torch.no_grad():
        candidate.b.weight.mul_(0.5)
    with pytest.raises(PrefixMismatch, match=message), cache.patch(candidate), \
            torch.no_grad():
        candidate(inputs + replayed)
    # a model whose calls depend on the data is not replayed again
    with cache.patch(candidate) as patched, torch.no_grad():
        candidate(inputs + recorded)
    assert patched == []


class MutatesWhenChanged(nn.Module):
    """Changes ``a``'s output in place only when ``c`` (after it) says so: the recording of
    the reference cannot see it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.c = nn.Linear(4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y = self.a(x)
        if float(self.c(y).sum()) > 1e6:
            y.mul_(2)
        return self.head(y)


def test_an_output_changed_in_place_breaks_the_cache_and_the_scan_measures_whole():
    torch.manual_seed(0)
    reference = MutatesWhenChanged().eval()
    inputs, targets = torch.randn(8, 4), torch.randint(0, 3, (8,))
    candidate = copy.deepcopy(reference)
    with torch.no_grad():
        candidate.c.bias.fill_(1e7)
    shared = search_scan._ScanInputs(reference, None, None, inputs, targets, 0,
                                     reuse_bytes=1 << 30, token="mutates")
    cache = search_scan._prefix_cache(shared)
    with pytest.raises(PrefixMismatch, match="'a' was changed in place"), \
            cache.patch(candidate), torch.no_grad():
        candidate(inputs)
    assert cache.broken
    # the scan's measurement of the candidate equals the whole model's, and the rebuilt cache
    # hands out copies
    got = search_scan._measure_candidate(shared, copy.deepcopy(candidate))
    assert got == search_scan._measure(copy.deepcopy(candidate), inputs, targets, None)
    assert search_scan._prefix_cache(shared).mutated == {"*"}


def test_outputs_changed_in_place_by_the_model_are_replayed_as_copies():
    reference, inputs = _net(), _inputs()
    cache = PrefixCache(reference, _batches(inputs), max_bytes=1 << 30)
    # bn1's output goes through the in-place ReLU; bn2's gets ``+= identity``
    assert {"blocks.0.bn1", "blocks.0.bn2", "blocks.1.bn2"} <= cache.mutated
    assert "stem" not in cache.mutated and "blocks.0.conv1" not in cache.mutated


def test_memory_cap_records_the_first_modules_only():
    reference, inputs = _net(), _inputs()
    full = PrefixCache(reference, _batches(inputs), max_bytes=1 << 30)
    per_module = {n: sum(t.numel() * t.element_size() for t in ts)
                  for n, ts in full.outputs.items()}
    order = list(dict.fromkeys(full.order))
    cap = per_module[order[0]] + per_module[order[1]] + 1
    small = PrefixCache(reference, _batches(inputs), max_bytes=cap)
    assert list(small.outputs) == order[:2] and small.recorded < cap
    assert PrefixCache(reference, _batches(inputs), max_bytes=0).outputs == {}


def _add_one(_module, _args, out):
    return out + 1


def test_a_modules_own_forward_hook_runs_once_on_the_replayed_output():
    reference, inputs = _net(), _inputs()
    reference.stem.register_forward_hook(_add_one)  # returns a new output
    cache = PrefixCache(reference, _batches(inputs), max_bytes=1 << 30)
    candidate = copy.deepcopy(reference)
    with torch.no_grad():  # the layer that takes the hooked output runs
        candidate.blocks[0].conv1.weight.mul_(0.5)
    with cache.patch(candidate) as patched:
        got = _outputs(candidate, inputs)
    assert patched == ["stem"]
    assert torch.equal(got, _outputs(candidate, inputs))


def test_a_forward_set_on_the_instance_is_put_back():
    reference, inputs = _net(), _inputs()
    cache = PrefixCache(reference, _batches(inputs), max_bytes=1 << 30)
    candidate = copy.deepcopy(reference)
    wrapped = candidate.stem.forward
    candidate.stem.forward = lambda x: wrapped(x)  # e.g. a library that wraps forward
    with torch.no_grad():
        candidate.fc.weight.mul_(0.5)
    with cache.patch(candidate) as patched:
        _outputs(candidate, inputs)
    assert "stem" in patched and candidate.stem.__dict__["forward"].__name__ == "<lambda>"
