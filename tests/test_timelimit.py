"""``netshrink.deadline`` inside an enclosing real-time timer: the enclosing one keeps its time."""

from __future__ import annotations

import signal
import time

import pytest

import netshrink as ns


class OuterTimeUp(Exception):
    pass


@pytest.fixture
def outer_timer():
    """Arm a caller's own SIGALRM timer of ``seconds`` whose handler raises OuterTimeUp."""
    def raise_outer(signum, frame):
        raise OuterTimeUp

    previous = signal.signal(signal.SIGALRM, raise_outer)
    yield lambda seconds: signal.setitimer(signal.ITIMER_REAL, seconds)
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def test_an_enclosing_timer_due_first_fires_on_time(outer_timer):
    outer_timer(0.2)
    t0 = time.monotonic()
    with pytest.raises(OuterTimeUp), ns.deadline(30, "waiting"):
        time.sleep(3)
    assert time.monotonic() - t0 < 2


def test_an_enclosing_timer_is_armed_again_on_leaving(outer_timer):
    outer_timer(0.4)
    with ns.deadline(30, "a short piece"):
        time.sleep(0.05)
    left, _ = signal.getitimer(signal.ITIMER_REAL)
    assert 0 < left < 0.4
    with pytest.raises(OuterTimeUp):
        time.sleep(3)


def test_nested_deadlines_the_outer_one_wins_when_it_is_shorter():
    with pytest.raises(TimeoutError, match=r"limit of 0\.2 s ran out while outer work"), \
            ns.deadline(0.2, "outer work"), ns.deadline(30, "inner work"):
        time.sleep(3)
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0


def test_the_inner_deadline_still_fires_first_when_shorter(outer_timer):
    outer_timer(5)
    with pytest.raises(TimeoutError, match=r"limit of 0\.1 s ran out while inner"), \
            ns.deadline(0.1, "inner"):
        time.sleep(3)
    assert 3 < signal.getitimer(signal.ITIMER_REAL)[0] < 5  # the caller's timer is back
