"""Guards around Torch-Pruning surgery: a time limit, and finding the module a forward fails in.

Torch-Pruning can hang on some graphs (it walked rexnet_100's for minutes) or leave a model that
no longer runs (cspresnet50, mobilevit_xxs). statprune therefore works on a copy, under a
deadline, and refuses the step, naming the module or op, when either happens: the caller's
model is never left half-pruned.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from netshrink import failing_module

__all__ = ["Deadline", "deadline", "describe_module", "failing_module"]


class Deadline:
    """A time limit for a stretch of work, with what is being done (for the message).

    In the main thread a SIGALRM timer interrupts even a long call inside Torch-Pruning; in any
    other thread (signals cannot reach it) :meth:`check` is called between layers instead.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.monotonic()
        self.doing = "starting"

    def check(self) -> None:
        """Raise :class:`TimeoutError` if the time is up."""
        if time.monotonic() - self.started > self.seconds:
            raise TimeoutError(self.message())

    def message(self) -> str:
        """Where the time ran out."""
        return f"the time limit of {self.seconds:g} s ran out while {self.doing}"


@contextmanager
def deadline(seconds: float) -> Iterator[Deadline]:
    """A :class:`Deadline` of ``seconds``; raises :class:`TimeoutError` when it passes."""
    limit = Deadline(seconds)
    main = threading.current_thread() is threading.main_thread()
    if not main or not hasattr(signal, "setitimer"):
        yield limit
        return

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(limit.message())

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield limit
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def describe_module(model: nn.Module, name: str) -> str:
    """``name (Type)`` for a module of ``model``."""
    try:
        return f"{name} ({type(model.get_submodule(name)).__name__})"
    except AttributeError:
        return name
