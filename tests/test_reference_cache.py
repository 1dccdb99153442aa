"""Reference models: a cache that cannot lie (key + SHA-256, structural checks, ``file:``
content in the key), visible progress without a terminal, and training that resumes after an
interruption with the same result."""

from __future__ import annotations

import dataclasses
import logging
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save_file as st_save_file
from torch.utils.data import Subset

import netshrink as ns
from netshrink import models
from netshrink.checkedfile import write_checked

pytestmark = pytest.mark.usefixtures("single_thread")

SPEC = "zoo:lenet300"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private, empty cache folder; returns its ``reference`` subfolder."""
    monkeypatch.setenv("NETSHRINK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "reference"


@pytest.fixture
def trainings(monkeypatch):
    """Counts the calls of ``train`` made by ``reference_model``; ``stop_after`` (set it to an
    epoch count) raises KeyboardInterrupt at the start of the next epoch, as Ctrl-C would."""

    class Spy:
        calls = 0
        epochs_run = 0
        stop_after: int | None = None

    real = models.train

    def spy(*args, **kwargs):
        Spy.calls += 1

        def before_epoch(state):
            if Spy.stop_after is not None and state.epoch == Spy.stop_after:
                raise KeyboardInterrupt
            Spy.epochs_run += 1

        return real(*args, before_epoch=before_epoch, **kwargs)

    monkeypatch.setattr(models, "train", spy)
    return Spy


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _only_file(folder):
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 1, files
    return files[0]


def _warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# -- integrity of the cache file -------------------------------------------------------------


def test_cache_hit_loads_without_training(cache, digits, trainings, caplog):
    first = _weights(ns.reference_model(SPEC, digits, epochs=2))
    assert trainings.calls == 1
    again = ns.reference_model(SPEC, digits, epochs=2)
    assert trainings.calls == 1 and _same(first, _weights(again))
    assert not _warnings(caplog)


def test_tampered_weights_are_detected_and_retrained(cache, digits, trainings, caplog):
    good = _weights(ns.reference_model(SPEC, digits, epochs=2))
    path = _only_file(cache)
    with safe_open(str(path), "pt") as handle:  # keep the key and checksum, change values
        meta = handle.metadata()
    tensors = load_file(str(path))
    tampered = {k: (v.flip(0) if v.is_floating_point() else v) for k, v in tensors.items()}
    st_save_file(tampered, str(path), metadata=meta)

    model = ns.reference_model(SPEC, digits, epochs=2)
    assert trainings.calls == 2
    assert _same(good, _weights(model))
    assert str(path) in _warnings(caplog) and "checksum" in _warnings(caplog)
    assert _same(good, load_file(str(path)))  # rewritten
    caplog.clear()
    ns.reference_model(SPEC, digits, epochs=2)
    assert trainings.calls == 2 and not _warnings(caplog)


def test_a_subset_under_the_same_name_trains_its_own_reference(cache, digits, trainings):
    """The cache is keyed by the data's name and its split sizes: a user's subset that kept
    the name does not get the full data's weights."""
    full = _weights(ns.reference_model(SPEC, digits, epochs=2))
    half = dataclasses.replace(digits, train=Subset(digits.train, range(len(digits.train) // 2)))
    assert half.name == digits.name
    subset = _weights(ns.reference_model(SPEC, half, epochs=2))
    assert trainings.calls == 2 and not _same(full, subset)
    assert len(list(cache.glob("*.safetensors"))) == 2


def test_copy_of_another_cache_entry_is_detected(cache, digits, trainings, caplog):
    seed0 = _weights(ns.reference_model(SPEC, digits, epochs=2, seed=0))
    path0 = _only_file(cache)
    ns.reference_model(SPEC, digits, epochs=2, seed=1)
    (path1,) = set(cache.glob("*.safetensors")) - {path0}
    shutil.copyfile(path1, path0)  # a valid file, but written for other settings

    model = ns.reference_model(SPEC, digits, epochs=2, seed=0)
    assert trainings.calls == 3
    assert _same(seed0, _weights(model))
    assert str(path0) in _warnings(caplog) and "other settings" in _warnings(caplog)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda b: b[: len(b) // 2], "safetensors"),  # truncated
        (lambda b: b"", "truncated"),
        (lambda b: bytes(range(256)) * 40, "safetensors"),  # random bytes
        (lambda b: (2**62).to_bytes(8, "little") + b[8:], "truncated"),  # absurd header size
        (lambda b: b + b"\0" * (4 << 20), "more than"),  # far larger than the model
    ],
    ids=["truncated", "empty", "random-bytes", "huge-header", "oversized"],
)
def test_unreadable_cache_file_is_rebuilt(cache, digits, trainings, caplog, damage, reason):
    good = _weights(ns.reference_model(SPEC, digits, epochs=1))
    path = _only_file(cache)
    path.write_bytes(damage(path.read_bytes()))

    model = ns.reference_model(SPEC, digits, epochs=1)
    assert trainings.calls == 2
    assert _same(good, _weights(model))
    warning = _warnings(caplog)
    assert str(path) in warning and reason in warning
    assert _same(good, load_file(str(path)))


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda t: {("x" + k if i == 0 else k): v for i, (k, v) in enumerate(t.items())},
         "do not match"),
        (lambda t: {k: (v[:1] if i == 0 else v) for i, (k, v) in enumerate(t.items())},
         "the model needs"),
        (lambda t: {k: v.double() for k, v in t.items()}, "the model needs"),
        (lambda t: {k: (v * float("nan") if i == 0 else v) for i, (k, v) in enumerate(t.items())},
         "non-finite"),
    ],
    ids=["names", "shapes", "dtypes", "nan"],
)
def test_well_sealed_but_unfit_tensors_are_rebuilt(cache, digits, trainings, caplog, change,
                                                   reason):
    """A file with the right key and a valid checksum can still not fit the model."""
    good = _weights(ns.reference_model(SPEC, digits, epochs=1))
    path = _only_file(cache)
    with safe_open(str(path), "pt") as handle:
        key = handle.metadata()["key"]
    write_checked(path, change(load_file(str(path))), fmt=models.REFERENCE_FORMAT, key=key)

    model = ns.reference_model(SPEC, digits, epochs=1)
    assert trainings.calls == 2 and _same(good, _weights(model))
    assert str(path) in _warnings(caplog) and reason in _warnings(caplog)


def test_file_spec_is_keyed_by_content(cache, digits, trainings, tmp_path):
    weights = tmp_path / "start.safetensors"
    torch.manual_seed(1)
    first_init = ns.load_model(SPEC, **digits.model_options()).state_dict()
    st_save_file(first_init, str(weights))
    spec = f"file:{weights}?arch={SPEC}"
    first = _weights(ns.reference_model(spec, digits, epochs=1))

    torch.manual_seed(2)
    st_save_file(ns.load_model(SPEC, **digits.model_options()).state_dict(), str(weights))
    second = _weights(ns.reference_model(spec, digits, epochs=1))
    assert trainings.calls == 2 and not _same(first, second)
    assert len(list(cache.glob("*.safetensors"))) == 2

    st_save_file(first_init, str(weights))  # the old content again: its entry is still valid
    assert _same(first, _weights(ns.reference_model(spec, digits, epochs=1)))
    assert trainings.calls == 2


# -- determinism, progress, resume -----------------------------------------------------------


def test_reference_ignores_earlier_use_of_the_global_rng(cache, digits, tmp_path, monkeypatch):
    plain = _weights(ns.reference_model(SPEC, digits, epochs=1))
    monkeypatch.setenv("NETSHRINK_CACHE", str(tmp_path / "other"))
    torch.rand(1000)
    assert _same(plain, _weights(ns.reference_model(SPEC, digits, epochs=1)))


def test_progress_lines_without_a_terminal(cache, digits, capsys, monkeypatch):
    monkeypatch.setenv("NETSHRINK_PROGRESS", "1")
    ns.reference_model(SPEC, digits, epochs=2)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "epoch" in ln]
    assert len(lines) == 2
    for i, line in enumerate(lines, 1):
        assert f"training reference {SPEC} on digits: epoch {i}/2, train loss " in line
        assert "val acc " in line and line.endswith(" s")

    monkeypatch.setenv("NETSHRINK_PROGRESS", "0")  # silenced on request
    ns.reference_model(SPEC, digits, epochs=2, seed=1)
    assert "epoch" not in capsys.readouterr().err


def test_interrupted_training_resumes_to_the_same_weights(cache, digits, trainings, tmp_path,
                                                         monkeypatch, capsys):
    whole = _weights(ns.reference_model(SPEC, digits, epochs=3))
    assert trainings.epochs_run == 3

    monkeypatch.setenv("NETSHRINK_CACHE", str(tmp_path / "interrupted"))
    folder = tmp_path / "interrupted" / "reference"
    trainings.stop_after, trainings.epochs_run = 1, 0
    with pytest.raises(KeyboardInterrupt):
        ns.reference_model(SPEC, digits, epochs=3)
    (checkpoint,) = folder.glob("*.resume.safetensors")
    assert [p.name for p in folder.glob("*.safetensors")] == [checkpoint.name]

    trainings.stop_after, trainings.epochs_run = None, 0
    torch.rand(100)  # whatever ran in between must not matter
    monkeypatch.setenv("NETSHRINK_PROGRESS", "1")
    capsys.readouterr()
    resumed = _weights(ns.reference_model(SPEC, digits, epochs=3))
    assert trainings.epochs_run == 2  # epochs 2 and 3 only
    err = capsys.readouterr().err
    assert f"resuming from {checkpoint} after epoch 1/3" in err
    assert "epoch 1/3," not in err and "epoch 2/3," in err and "epoch 3/3," in err
    assert _same(whole, resumed)
    assert not checkpoint.exists()


@pytest.mark.parametrize("damage", [lambda b: b[:100], lambda b: b[:-1] + b"x"],
                         ids=["truncated", "one-byte"])
def test_corrupt_checkpoint_is_ignored(cache, digits, trainings, caplog, tmp_path, monkeypatch,
                                       damage):
    whole = _weights(ns.reference_model(SPEC, digits, epochs=2))
    monkeypatch.setenv("NETSHRINK_CACHE", str(tmp_path / "interrupted"))
    trainings.stop_after = 1
    with pytest.raises(KeyboardInterrupt):
        ns.reference_model(SPEC, digits, epochs=2)
    (checkpoint,) = (tmp_path / "interrupted" / "reference").glob("*.resume.safetensors")
    checkpoint.write_bytes(damage(checkpoint.read_bytes()))

    trainings.stop_after, trainings.epochs_run = None, 0
    assert _same(whole, _weights(ns.reference_model(SPEC, digits, epochs=2)))
    assert trainings.epochs_run == 2  # from the start
    assert str(checkpoint) in _warnings(caplog) and "ignoring training checkpoint" in \
        _warnings(caplog)


# -- the resumable checkpoint of netshrink.train itself ---------------------------------------


@pytest.fixture
def tiny():
    """Four classes of 8-d points; a small MLP (so Adam has state worth restoring)."""
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g) * 3

    def split(n: int) -> TensorDataset:
        return TensorDataset(centres[torch.arange(n) % 4] + torch.randn(n, 8, generator=g),
                             torch.arange(n) % 4)

    data = ns.DataSplits("tiny", split(48), split(24), split(24), num_classes=4)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    return data, model


@pytest.mark.parametrize("keep", ["best", "last"])
def test_train_resumes_with_any_policy(tiny, tmp_path, keep):
    """Tuple ranks survive the JSON round trip; ``best`` and ``last`` both resume exactly."""
    import copy

    data, model = tiny
    config = ns.FinetuneConfig(epochs=4, batch_size=8, lr=0.05)

    def policy(path=None):
        return ns.CheckpointPolicy(keep=keep, key=lambda acc, s: (round(acc, 1), -s.epoch),
                                   path=path, run_key="tiny")

    whole, initial = copy.deepcopy(model), copy.deepcopy(model)
    expected = ns.train(whole, data, config, checkpoint=policy())

    def stop(state):
        if state.epoch == 2:
            raise KeyboardInterrupt

    path = tmp_path / "run.safetensors"
    with pytest.raises(KeyboardInterrupt):
        ns.train(model, data, config, checkpoint=policy(path), before_epoch=stop)
    assert path.is_file()
    fresh = initial  # a new process would start from the untrained weights again
    history = ns.train(fresh, data, config, checkpoint=policy(path))
    assert history == expected
    assert _same(_weights(whole), _weights(fresh))
    assert not path.exists()


def test_train_checkpoint_needs_json_results(tiny, tmp_path):
    data, model = tiny
    with pytest.raises(ns.ConfigError, match="JSON"):
        ns.train(model, data, ns.FinetuneConfig(epochs=2, batch_size=8),
                 validate=lambda s: object(),
                 checkpoint=ns.CheckpointPolicy(key=lambda r, s: s.epoch,
                                                path=tmp_path / "c.safetensors"))


def test_train_checkpoint_of_other_settings_is_ignored(tiny, tmp_path, caplog):
    data, model = tiny
    path = tmp_path / "run.safetensors"

    def stop(state):
        if state.epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ns.train(model, data, ns.FinetuneConfig(epochs=3, batch_size=8), before_epoch=stop,
                 checkpoint=ns.CheckpointPolicy(path=path, run_key="a"))
    epochs = []
    ns.train(model, data, ns.FinetuneConfig(epochs=3, batch_size=8, lr=0.01),
             before_epoch=lambda s: epochs.append(s.epoch),
             checkpoint=ns.CheckpointPolicy(path=path, run_key="a"))
    assert epochs == [0, 1, 2]  # another learning rate: started afresh
    assert "other settings" in _warnings(caplog)
