"""Executors: where work that fans out (sensitivity scans, search trials, rlprune episodes,
bioclust populations) runs.

An executor has a ``name`` and ``map(fn, items) -> list`` returning ``fn(item)`` for every
item, in order. :class:`LocalExecutor` runs them here, one after the other (the default);
:class:`ProcessExecutor` spreads them over a ``concurrent.futures.ProcessPoolExecutor``.
Plugins register more by name through the ``register_executors`` hook (the built-in
``ray_executor`` plugin registers ``ray``); :func:`get_executor` resolves a name through the
registry the way :func:`netshrink.datasets.load` resolves a dataset.

``fn`` and the items must be picklable for any executor but ``local`` (a module-level
function, a ``functools.partial`` of one, or an instance of a module-level class holding the
model as a module and tensors, never a closure or a lambda).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from typing import Protocol, TypeVar, runtime_checkable

from netshrink.errors import ConfigError
from netshrink.registry.manager import executors as _registered

T = TypeVar("T")
R = TypeVar("R")

#: Executor names built into the core (a plugin cannot register these names).
EXECUTORS = ("local", "process")


@runtime_checkable
class Executor(Protocol):
    """Runs ``fn`` over ``items`` and returns the results in the items' order."""

    name: str

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``[fn(item) for item in items]``, wherever the executor runs them."""
        ...


class LocalExecutor:
    """In this process, one item after the other (the default)."""

    name = "local"

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``[fn(item) for item in items]``."""
        return [fn(item) for item in items]


def _one_thread() -> None:
    """Process-pool initializer: one torch thread per worker (workers share the cores)."""
    import torch

    torch.set_num_threads(1)


def check_picklable(executor: str, fn: Callable[..., object]) -> None:
    """Raise :class:`ConfigError` naming ``executor`` if ``fn`` cannot be sent to a worker
    (a closure, a lambda, a class defined inside a function, an open file, ...)."""
    try:
        pickle.dumps(fn)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"executor {executor!r}: the work {_describe(fn)} cannot be sent to a worker "
            f"({type(exc).__name__}: {exc}); use the 'local' executor, or make it a "
            "module-level function or class holding the model and tensors"
        ) from None


def _describe(fn: Callable[..., object]) -> str:
    inner = getattr(fn, "func", fn)
    return repr(getattr(inner, "__qualname__", type(inner).__qualname__))


class ProcessExecutor:
    """A pool of ``workers`` fresh processes (``spawn``: no state inherited from a forked
    torch), one torch thread each; ``fn`` and the items are pickled to them."""

    name = "process"

    def __init__(self, workers: int | None = None) -> None:
        if workers is not None and workers < 1:
            raise ConfigError(f"executor 'process': workers must be at least 1, got {workers}")
        self.workers = workers or max(1, min(4, os.cpu_count() or 1))

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``fn`` over ``items`` in the pool, results in order; a worker's exception is
        re-raised here. ``fn`` that cannot be pickled is refused before a worker starts."""
        batch = list(items)
        if not batch:
            return []
        check_picklable(self.name, fn)
        context = multiprocessing.get_context("spawn")
        chunk = max(1, -(-len(batch) // self.workers))
        with ProcessPoolExecutor(self.workers, mp_context=context, initializer=_one_thread) as pool:
            return list(pool.map(fn, batch, chunksize=chunk))


def available() -> dict[str, str]:
    """Every executor name :func:`get_executor` knows, with its description."""
    builtin = {
        "local": "In this process, one item after the other (the default).",
        "process": "A pool of local worker processes (spawn, one torch thread each).",
    }
    return builtin | {name: e.description for name, e in sorted(_registered().items())}


def get_executor(
    spec: str | Executor | None = None,
    workers: int | None = None,
    *,
    address: str | None = None,
) -> Executor:
    """An executor by name (``local``, ``process``, or one a plugin registered, such as
    ``ray``), or ``spec`` itself when it is one (anything with ``name`` and ``map``).
    None: local. ``workers`` bounds the parallelism; ``address`` is where a cluster executor
    connects (``ray``: a Ray cluster address), refused by the built-ins."""
    if spec is None or spec in EXECUTORS:
        name = spec or "local"
        if address is not None:
            raise ConfigError(
                f"executor {name!r} runs on this machine and takes no address (got "
                f"{address!r}); use an executor that connects to a cluster, such as 'ray'"
            )
        return ProcessExecutor(workers) if name == "process" else LocalExecutor()
    if isinstance(spec, str):
        table = _registered()
        if spec not in table:
            raise ConfigError(
                f"unknown executor {spec!r}; known: {', '.join(available())} (a plugin "
                "registers more with register_executors)"
            )
        made = table[spec].obj(workers=workers, address=address)
        if not isinstance(made, Executor):
            raise ConfigError(
                f"executor {spec!r} (plugin {table[spec].plugin!r}) built {made!r}, which has "
                "no name and map(fn, items)"
            )
        return made
    if isinstance(spec, Executor):
        return spec
    raise ConfigError(
        f"executor must be a name ({', '.join(available())}) or an object with name and "
        f"map(fn, items), got {type(spec).__name__}"
    )


__all__ = [
    "EXECUTORS",
    "Executor",
    "LocalExecutor",
    "ProcessExecutor",
    "available",
    "check_picklable",
    "get_executor",
]
