"""Executors: where work that fans out (sensitivity scans, search trials) runs.

An executor has a ``name`` and ``map(fn, items) -> list`` returning ``fn(item)`` for every
item, in order. :class:`LocalExecutor` runs them here, one after the other (the default);
:class:`ProcessExecutor` spreads them over a ``concurrent.futures.ProcessPoolExecutor``. ``fn``
and the items must be picklable for the process pool (a module-level function, or a
``functools.partial`` of one).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from typing import Protocol, TypeVar, runtime_checkable

from netshrink.errors import ConfigError

T = TypeVar("T")
R = TypeVar("R")

#: Executor names :func:`get_executor` knows.
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
        re-raised here."""
        batch = list(items)
        if not batch:
            return []
        context = multiprocessing.get_context("spawn")
        chunk = max(1, -(-len(batch) // self.workers))
        with ProcessPoolExecutor(self.workers, mp_context=context, initializer=_one_thread) as pool:
            return list(pool.map(fn, batch, chunksize=chunk))


def get_executor(spec: str | Executor | None = None, workers: int | None = None) -> Executor:
    """An executor by name (``local``, ``process``), or ``spec`` itself when it is one
    (anything with ``name`` and ``map``). None: local."""
    if spec is None or spec == "local":
        return LocalExecutor()
    if spec == "process":
        return ProcessExecutor(workers)
    if isinstance(spec, str):
        hint = (
            "; Ray is not built in yet (issue 17, part 4): use 'process' on one machine"
            if spec == "ray"
            else ""
        )
        raise ConfigError(f"unknown executor {spec!r}; known: {', '.join(EXECUTORS)}{hint}")
    if isinstance(spec, Executor):
        return spec
    raise ConfigError(
        f"executor must be a name ({', '.join(EXECUTORS)}) or an object with name and map(fn, "
        f"items), got {type(spec).__name__}"
    )


__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "ProcessExecutor", "get_executor"]
