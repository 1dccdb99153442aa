"""``ray``: an executor that runs work that fans out (sensitivity scans, search trials, rlprune
episodes, bioclust populations) as Ray tasks, on this machine or on a Ray cluster
(https://docs.ray.io).

Ray is optional (``pip install 'netshrink[ray]'``): this plugin imports it only when the
executor is built, so netshrink works without it and asking for ``ray`` says how to install it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from netshrink import ConfigError, hookimpl

T = TypeVar("T")
R = TypeVar("R")

INSTALL = "pip install 'netshrink[ray]'"

_remote_call: Any = None  # the Ray remote function, made once per process


def _call(fn: Callable[[T], R], item: T) -> R:
    """A Ray task: one torch thread (tasks share the node's cores, like the process pool)."""
    import torch

    torch.set_num_threads(1)
    return fn(item)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(
            f"executor 'ray' needs Ray, which is not installed: {INSTALL} (or pip install "
            "'ray>=2.9'); on one machine the 'process' executor needs nothing extra"
        ) from None
    return ray


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast, with a :class:`ConfigError`, when nothing answers at a cluster ``address``
    (``HOST:PORT`` or ``ray://HOST:PORT``): Ray itself retries an unreachable head for
    minutes. ``auto`` and ``local`` are left to Ray (it finds the local cluster or says so)."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"executor 'ray': address must be HOST:PORT (the head node, e.g. 10.0.0.5:6379), "
            f"ray://HOST:PORT (Ray Client) or 'auto', got {address!r}"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(
            f"executor 'ray': nothing answers at {address!r} ({exc}); start the head node with "
            "`ray start --head --port=6379` and pass its address (--address, or RAY_ADDRESS)"
        ) from None


class RayExecutor:
    """Ray tasks, one per item, on the Ray instance this process is connected to: the one
    already started with ``ray.init(...)``, else the cluster at ``address`` (or
    ``$RAY_ADDRESS``), else a new local instance. ``workers`` bounds the tasks in flight
    (default: as many as the cluster's CPUs allow)."""

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None) -> None:
        if workers is not None and workers < 1:
            raise ConfigError(f"executor 'ray': workers must be at least 1, got {workers}")
        if address is not None and not (isinstance(address, str) and address.strip()):
            raise ConfigError(
                f"executor 'ray': address must be a Ray cluster address such as "
                f"'auto', '10.0.0.5:6379' or 'ray://head:10001', got {address!r}"
            )
        self.ray = _import_ray()
        self.workers = workers
        self.address = address

    def connect(self) -> None:
        """Connect to Ray unless this process already is (see the class docstring)."""
        ray = self.ray
        if ray.is_initialized():
            return
        options: dict[str, Any] = {"logging_level": logging.WARNING}
        target = self.address or os.environ.get("RAY_ADDRESS") or None
        if target is None:
            options["include_dashboard"] = False  # a local instance: no web server
        else:
            check_reachable(target)
        try:
            ray.init(address=self.address, **options)
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError, ...
            where = f"the Ray cluster at {target!r}" if target else "a local Ray instance"
            raise ConfigError(
                f"executor 'ray': cannot connect to {where} ({type(exc).__name__}: {exc}); "
                "start one with `ray start --head` and pass its address (--address, or "
                "RAY_ADDRESS), or use the 'process' executor"
            ) from None

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``fn`` over ``items`` as Ray tasks, results in order; a task's exception is
        re-raised here (as Ray's ``RayTaskError``, an instance of the original class too).
        ``fn`` is put in the object store once and shared by every task."""
        batch = list(items)
        if not batch:
            return []
        self.connect()
        ray = self.ray
        global _remote_call
        if _remote_call is None:
            _remote_call = ray.remote(num_cpus=1)(_call)
        try:
            shared = ray.put(fn)
        except Exception as exc:  # cloudpickle raises TypeError, PicklingError, ...
            raise ConfigError(
                f"executor 'ray': the work {getattr(fn, '__qualname__', type(fn).__qualname__)!r}"
                f" cannot be sent to Ray workers ({type(exc).__name__}: {exc}); use the 'local' "
                "executor, or make it a module-level function or class"
            ) from None
        limit = self.workers or len(batch)
        refs: list[Any] = []
        pending: list[Any] = []
        for item in batch:
            if len(pending) >= limit:  # keep at most `workers` tasks in flight
                _, pending = ray.wait(pending, num_returns=1)
            refs.append(_remote_call.remote(shared, item))
            pending.append(refs[-1])
        return list(ray.get(refs))


def make_ray_executor(workers: int | None = None, address: str | None = None) -> RayExecutor:
    """The ``ray`` executor (the factory this plugin registers)."""
    return RayExecutor(workers, address)


__all__ = ["INSTALL", "RayExecutor", "check_reachable", "make_ray_executor"]


@hookimpl
def register_executors(register):
    register(
        "ray",
        make_ray_executor,
        description=f"Ray tasks on this machine or a Ray cluster (--address); {INSTALL}",
    )
