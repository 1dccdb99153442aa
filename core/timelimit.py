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
    passes (at once in the main thread, else at the next :meth:`Deadline.check`).

    An enclosing real-time timer (a caller's ``signal.setitimer`` or ``signal.alarm``, or an
    outer :func:`deadline`) keeps its time: if it is due first its own handler runs when it is
    due, and on leaving its remaining time is armed again (at once if it passed meanwhile)."""
    limit = Deadline(seconds, doing)
    main = threading.current_thread() is threading.main_thread()
    if not main or not hasattr(signal, "setitimer"):
        yield limit
        return

    outer_left, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    outer_due = limit.started + outer_left if outer_left > 0 else None
    outer_fired = False

    def expire(signum: int, frame: object) -> None:
        nonlocal outer_fired
        if outer_due is not None and not outer_fired and time.monotonic() >= outer_due:
            outer_fired = True  # the enclosing timer's turn: its handler, then ours again
            if callable(previous):
                previous(signum, frame)
            left = limit.started + seconds - time.monotonic()
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3))
            return
        limit._alarm()

    previous = signal.signal(signal.SIGALRM, expire)
    first = seconds if outer_due is None else min(seconds, outer_left)
    signal.setitimer(signal.ITIMER_REAL, first)
    try:
        yield limit
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_due is not None and not outer_fired:
            signal.setitimer(signal.ITIMER_REAL, max(outer_due - time.monotonic(), 1e-6),
                             outer_interval)
