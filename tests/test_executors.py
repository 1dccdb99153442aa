"""Executors (issue 17, part 4): the ``register_executors`` hook and the registry, the built-in
``local`` and ``process`` executors, the ``ray`` plugin (its missing-Ray error, and a local Ray
that gives the same plan as in-process), and rlprune's episodes and bioclust's populations
fanned out through an executor with the same result as in-process."""

from __future__ import annotations

import copy
import pickle
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import ClassVar

import pytest

import netshrink as ns
from netshrink import CompressionContext, LayerSelector, model_info, registry
from netshrink.errors import ConfigError, DuplicateNameError, NetshrinkError
from netshrink.executors import (
    EXECUTORS,
    Executor,
    LocalExecutor,
    ProcessExecutor,
    available,
    get_executor,
)
from netshrink.plugins.bioclust import Bioclust
from netshrink.plugins.rlprune import RLPrune

pytestmark = pytest.mark.usefixtures("single_thread")


def _registered(plugin: object, name: str) -> Iterator[object]:
    """Register ``plugin`` for one test and always unregister it."""
    registry.register_plugin(plugin, name=name)
    try:
        yield plugin
    finally:
        registry.unregister_plugin(plugin)


class Recording(LocalExecutor):
    """In-process, like ``local``, but records each ``map`` call's batch size."""

    name = "hooktest-recording"
    calls: ClassVar[list[int]] = []  # shared: the plugin builds a new instance per get_executor

    def __init__(self, workers: int | None = None, address: str | None = None) -> None:
        self.workers, self.address = workers, address

    def map(self, fn: Callable, items) -> list:
        items = list(items)
        Recording.calls.append(len(items))
        return super().map(fn, items)


class Pickling(LocalExecutor):
    """In-process, but each item runs on its own unpickled copy of ``fn``, as a worker process
    or a Ray worker would (a fast check that the work survives pickling, e.g. that a copy of
    the model and the tensors referring to its parameters stay linked)."""

    name = "hooktest-pickling"

    def __init__(self, workers: int | None = None, address: str | None = None) -> None:
        pass

    def map(self, fn: Callable, items) -> list:
        sent = pickle.dumps(fn)
        return [pickle.loads(sent)(pickle.loads(pickle.dumps(item))) for item in items]


class ExecutorPlugin:
    """Registers the in-process ``hooktest-recording`` and ``hooktest-pickling`` executors."""

    @ns.hookimpl
    def register_executors(self, register) -> None:
        register("hooktest-recording", Recording, description="records its batches")
        register("hooktest-pickling", Pickling, description="pickles the work per item")


@pytest.fixture
def recording() -> Iterator[type[Recording]]:
    Recording.calls = []
    yield from _registered(ExecutorPlugin(), "hooktest-executors")


# -- the hook and the registry -------------------------------------------------------------------


def test_hook_register_executors(recording):
    entry = registry.manager.executors()["hooktest-recording"]
    assert entry.obj is Recording and entry.plugin == "hooktest-executors"
    assert available()["hooktest-recording"] == "records its batches"
    info = next(i for i in registry.list_plugins() if i.name == "hooktest-executors")
    assert info.registered == {"executors": ["hooktest-pickling", "hooktest-recording"]}
    assert info.hooks == ["register_executors"]
    made = get_executor("hooktest-recording", 3, address="somewhere")
    assert isinstance(made, Recording) and (made.workers, made.address) == (3, "somewhere")
    assert made.map(abs, [-1, 2, -3]) == [1, 2, 3] and Recording.calls == [3]


def test_ray_is_registered_by_a_builtin_plugin():
    assert "netshrink.plugins.ray_executor" in registry.DEFAULT_PLUGINS
    entry = registry.manager.executors()["ray"]
    assert entry.plugin == "ray_executor" and entry.distribution is None
    assert "pip install 'netshrink[ray]'" in entry.description
    assert list(available())[:3] == ["local", "process", "ray"]


class _Bad:
    def __init__(self, name: str, factory: object) -> None:
        self.name, self.factory = name, factory

    @ns.hookimpl
    def register_executors(self, register) -> None:
        register(self.name, self.factory)


@pytest.mark.parametrize(
    ("name", "factory", "error", "match"),
    [
        ("local", Recording, DuplicateNameError, r"'local' is a built-in executor"),
        ("process", Recording, DuplicateNameError, r"'process' is a built-in executor"),
        ("hooktest-x", 42, NetshrinkError, r"factory for 'hooktest-x' is not callable"),
        ("Bad Name", Recording, NetshrinkError, r"invalid name 'Bad Name'"),
    ],
)
def test_bad_registrations_are_refused(name, factory, error, match):
    plugin = _Bad(name, factory)
    registry.register_plugin(plugin, name="hooktest-bad")
    try:
        with pytest.raises(error, match=match):
            registry.manager.executors()
    finally:
        registry.unregister_plugin(plugin)


def test_two_plugins_with_one_name_are_refused(recording):
    other = _Bad("hooktest-recording", Recording)
    registry.register_plugin(other, name="hooktest-other")
    try:
        with pytest.raises(DuplicateNameError, match=r"registered by two plugins"):
            get_executor("hooktest-recording")
    finally:
        registry.unregister_plugin(other)


def test_a_factory_that_builds_no_executor_is_refused():
    plugin = _Bad("hooktest-nothing", lambda workers=None, address=None: object())
    registry.register_plugin(plugin, name="hooktest-bad")
    try:
        with pytest.raises(ConfigError, match=r"'hooktest-nothing' \(plugin 'hooktest-bad'\)"):
            get_executor("hooktest-nothing")
    finally:
        registry.unregister_plugin(plugin)


# -- get_executor and the built-ins ---------------------------------------------------------------


def test_get_executor_names_and_errors():
    assert EXECUTORS == ("local", "process")
    assert isinstance(get_executor(None), LocalExecutor)
    assert isinstance(get_executor("process", 2), ProcessExecutor)
    mine = Recording()
    assert get_executor(mine) is mine and isinstance(mine, Executor)
    with pytest.raises(ConfigError, match=r"unknown executor 'thread'; known: local, process, ray"):
        get_executor("thread")
    for name in ("local", "process"):
        with pytest.raises(ConfigError, match=rf"executor '{name}' runs on this machine and "
                                              r"takes no address \(got 'head:6379'\)"):
            get_executor(name, address="head:6379")
    with pytest.raises(ConfigError, match=r"workers must be at least 1, got 0"):
        get_executor("process", 0)
    with pytest.raises(ConfigError, match=r"executor must be a name"):
        get_executor(42)  # type: ignore[arg-type]


def test_process_pool_refuses_work_it_cannot_send_before_starting():
    offset = 3
    with pytest.raises(ConfigError, match=r"executor 'process': the work .*cannot be sent to a "
                                          r"worker.*use the 'local' executor"):
        ProcessExecutor(2).map(lambda x: x + offset, [1, 2])


def test_missing_ray_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r"executor 'ray' needs Ray.*pip install "
                                          r"'netshrink\[ray\]'"):
        get_executor("ray")


def test_ray_executor_checks_its_settings(monkeypatch):
    pytest.importorskip("ray")
    with pytest.raises(ConfigError, match=r"executor 'ray': workers must be at least 1, got 0"):
        get_executor("ray", 0)
    with pytest.raises(ConfigError, match=r"executor 'ray': address must be a Ray cluster "
                                          r"address.*got ' '"):
        get_executor("ray", address=" ")
    made = get_executor("ray", 2, address="auto")
    assert (made.name, made.workers, made.address) == ("ray", 2, "auto")
    assert made.map(abs, []) == []  # nothing to run: no connection is made


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ray_cluster_address_that_does_not_answer_fails_fast(monkeypatch):
    pytest.importorskip("ray")
    from netshrink.plugins.ray_executor import check_reachable

    port = _free_port()  # closed again: nothing listens there
    made = get_executor("ray", address=f"127.0.0.1:{port}")
    if made.ray.is_initialized():
        pytest.skip("a Ray instance is already connected in this process")
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"nothing answers at '127.0.0.1:{port}'.*ray start "
                                          r"--head"):
        made.map(abs, [1])
    assert time.perf_counter() - started < 10  # not Ray's minutes of retries
    with pytest.raises(ConfigError, match=r"address must be HOST:PORT.*got 'headnode'"):
        check_reachable("headnode")
    monkeypatch.setenv("RAY_ADDRESS", f"ray://127.0.0.1:{port}")
    with pytest.raises(ConfigError, match=r"nothing answers at 'ray://127.0.0.1:"):
        get_executor("ray").map(abs, [1])
    with socket.socket() as server:  # something listening: the check passes
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_reachable(f"127.0.0.1:{server.getsockname()[1]}")


# -- rlprune episodes ---------------------------------------------------------------------------

RL = {"episodes": 6, "warmup": 4, "hidden": 16, "batch_size": 8, "reward_samples": 64}


def _rlprune(model, data, config, on_episode=None):
    model = copy.deepcopy(model)
    info = model_info(model)
    ctx = CompressionContext(data=data, info=info, seed=0, step_name="rlprune")
    layers = LayerSelector(types=["Conv2d", "Linear"]).resolve(model, head=info.head)
    out = RLPrune(config, on_episode=on_episode).compress(model, layers, ctx)
    return out, {k: v.detach().clone() for k, v in out.model.state_dict().items()}


def _same_rlprune(a, b) -> None:
    keys = ("episode_rewards", "ratios", "best_episode", "best_reward", "achieved_sparsity")
    assert {k: a[0].summary[k] for k in keys} == {k: b[0].summary[k] for k in keys}
    assert a[1].keys() == b[1].keys()
    assert all(bool((a[1][k] == b[1][k]).all()) for k in a[1])


def test_rlprune_warmup_episodes_fan_out_with_the_same_result(lenet, digits, tmp_path,
                                                              recording):
    local = _rlprune(lenet, digits, {**RL, "checkpoint": str(tmp_path / "a.st")})
    fanned = _rlprune(lenet, digits, {**RL, "checkpoint": str(tmp_path / "b.st"),
                                      "executor": "hooktest-recording"})
    assert Recording.calls == [RL["warmup"]]  # the 4 warm-up episodes went out as one batch
    _same_rlprune(local, fanned)


def test_rlprune_interrupted_during_a_batched_warmup_resumes_to_the_same_result(
        lenet, digits, tmp_path, recording):
    path = str(tmp_path / "c.st")

    def stop_after_2(episode, reward, best):
        if episode == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _rlprune(lenet, digits, {**RL, "checkpoint": path, "executor": "hooktest-recording"},
                 on_episode=stop_after_2)
    resumed = _rlprune(lenet, digits, {**RL, "checkpoint": path})  # the checkpoint's RNG state
    assert resumed[0].summary["resumed_from"] == 2
    fresh = _rlprune(lenet, digits, {**RL, "checkpoint": str(tmp_path / "d.st")})
    _same_rlprune(resumed, fresh)


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_rlprune_pickled_episodes_give_the_same_result(lenet, digits, tmp_path, recording,
                                                       granularity):
    config = {**RL, "granularity": granularity}
    local = _rlprune(lenet, digits, {**config, "checkpoint": str(tmp_path / "a.st")})
    sent = _rlprune(lenet, digits, {**config, "checkpoint": str(tmp_path / "b.st"),
                                    "executor": "hooktest-pickling"})
    _same_rlprune(local, sent)


@pytest.mark.slow
def test_rlprune_process_pool_gives_the_same_result(lenet, digits, tmp_path):
    local = _rlprune(lenet, digits, {**RL, "checkpoint": str(tmp_path / "a.st")})
    pooled = _rlprune(lenet, digits, {**RL, "checkpoint": str(tmp_path / "b.st"),
                                      "executor": "process", "workers": 2})
    _same_rlprune(local, pooled)


def test_rlprune_executor_knobs_are_checked_and_stay_out_of_the_key(lenet, digits, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown executor 'threads'"):
        _rlprune(lenet, digits, {**RL, "executor": "threads"})
    with pytest.raises(ValueError, match=r"workers"):
        RLPrune({"workers": 0})


# -- bioclust populations ---------------------------------------------------------------------

BIO = {"bits": 2, "population": 4, "generations": 2, "elite": 2, "eval_limit": 120,
       "kmeans_iterations": 20}


def _bioclust(model, data, config):
    model = copy.deepcopy(model)
    info = model_info(model)
    ctx = CompressionContext(data=data, info=info, seed=0, step_name="bioclust")
    layers = LayerSelector().resolve(model, head=info.head, default_types=["Linear"])
    out = Bioclust(config).compress(model, layers, ctx)
    ctx.encodings.reconcile(out.model)
    return out, {k: v.detach().clone() for k, v in out.model.state_dict().items()}


def _same_bioclust(a, b) -> None:
    assert a[0].summary["candidates"] == b[0].summary["candidates"]
    assert a[0].summary["chosen_candidate"] == b[0].summary["chosen_candidate"]
    assert all(bool((a[1][k] == b[1][k]).all()) for k in a[1])


@pytest.fixture(scope="module")
def lenet300_8x8(digits):
    return ns.reference_model("zoo:lenet300", digits)


def test_bioclust_population_fans_out_with_the_same_result(lenet300_8x8, digits, recording):
    local = _bioclust(lenet300_8x8, digits, BIO)
    fanned = _bioclust(lenet300_8x8, digits, {**BIO, "executor": "hooktest-recording"})
    assert Recording.calls == [BIO["population"]] * BIO["generations"]
    _same_bioclust(local, fanned)
    accs = {c["val_acc"] for c in local[0].summary["candidates"]}
    assert len(accs) > 1  # the candidates differ: an evaluation of the wrong weights would not


def test_bioclust_pickled_candidates_give_the_same_result(lenet300_8x8, digits, recording):
    local = _bioclust(lenet300_8x8, digits, BIO)
    sent = _bioclust(lenet300_8x8, digits, {**BIO, "executor": "hooktest-pickling"})
    _same_bioclust(local, sent)


@pytest.mark.slow
def test_bioclust_process_pool_gives_the_same_result(lenet300_8x8, digits):
    local = _bioclust(lenet300_8x8, digits, BIO)
    pooled = _bioclust(lenet300_8x8, digits, {**BIO, "executor": "process", "workers": 2})
    _same_bioclust(local, pooled)


def test_bioclust_with_ray_missing_says_how_to_install_it(lenet300_8x8, digits, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'netshrink\[ray\]'"):
        _bioclust(lenet300_8x8, digits, {**BIO, "executor": "ray"})


# -- a local Ray ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray() -> Iterator[object]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_local_ray_scan_gives_the_same_plan_as_in_process(local_ray, digits):
    from netshrink import layer_search as S

    kwargs = {"methods": ("magnitude", "svd"), "checkpoint": False, "val_limit": 128}
    local = S.scan("zoo:lenet300", "digits", **kwargs)
    remote = S.scan("zoo:lenet300", "digits", executor=get_executor("ray"), **kwargs)
    assert remote.measured.keys() == local.measured.keys()
    for key, row in local.measured.items():
        assert remote.measured[key]["bytes"] == row["bytes"]
        assert remote.measured[key]["loss"] == pytest.approx(row["loss"], abs=2e-6)
    here = S.search("zoo:lenet300", "digits", "6x", sensitivity=local)
    there = S.search("zoo:lenet300", "digits", "6x", sensitivity=remote)
    assert {n: c.label for n, c in here.plan.items()} == {
        n: c.label for n, c in there.plan.items()
    }
    assert here.result.artifact == there.result.artifact


@pytest.mark.slow
def test_local_ray_runs_rlprune_and_bioclust_episodes(local_ray, lenet, lenet300_8x8, digits,
                                                      tmp_path):
    local = _rlprune(lenet, digits, {**RL, "checkpoint": str(tmp_path / "a.st")})
    remote = _rlprune(lenet, digits, {**RL, "checkpoint": str(tmp_path / "b.st"),
                                      "executor": "ray"})
    _same_rlprune(local, remote)
    _same_bioclust(_bioclust(lenet300_8x8, digits, BIO),
                   _bioclust(lenet300_8x8, digits, {**BIO, "executor": "ray", "workers": 2}))
