"""A time limit for a stretch of work that may hang inside a library call (Torch-Pruning walked
some timm graphs for minutes): the structural methods run their surgery under one and refuse the
step, saying what was being done, instead of hanging."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Deadline", "deadline"]


class Deadline:
    """A time limit, with what is being done (for the message): set :attr:`doing` as the work
    moves on.

    In the main thread a SIGALRM timer interrupts even a long call inside a library; in any other
    thread (signals cannot reach it) :meth:`check`, called between pieces of work, is the limit.
    """

    def __init__(self, seconds: float, doing: str = "starting") -> None:
        self.seconds = seconds
        self.started = time.monotonic()
        self.doing = doing
        self._holding = 0
        self._expired = False

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the alarm while the body runs, e.g. a change to the model that must finish whole
        or not start; if the time ran out meanwhile, :class:`TimeoutError` is raised on leaving,
        after the body."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
        if self._holding == 0 and self._expired:
            raise TimeoutError(self.message())

    def _alarm(self) -> None:
        """The timer went off: raise now, or on leaving :meth:`paused`."""
        self._expired = True
        if self._holding == 0:
            raise TimeoutError(self.message())

    def check(self) -> None:
        """Raise :class:`TimeoutError` if the time is up."""
        if time.monotonic() - self.started > self.seconds:
            raise TimeoutError(self.message())

    def message(self) -> str:
        """Where the time ran out: ``"the time limit of <s> s ran out while <doing>"``."""
        return f"the time limit of {self.seconds:g} s ran out while {self.doing}"


@contextmanager
def deadline(seconds: float, doing: str = "starting") -> Iterator[Deadline]:
    """A :class:`Deadline` of ``seconds``; raises :class:`TimeoutError` with its message when it
    passes (at once in the main thread, else at the next :meth:`Deadline.check`)."""
    limit = Deadline(seconds, doing)
    main = threading.current_thread() is threading.main_thread()
    if not main or not hasattr(signal, "setitimer"):
        yield limit
        return

    def expire(signum: int, frame: object) -> None:
        limit._alarm()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield limit
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
