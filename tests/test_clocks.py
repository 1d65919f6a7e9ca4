"""A node's timers run on monotonic time; what it stores is stamped with the time of day."""

import time

import pytest
from twisted.internet import task
from twisted.internet.selectreactor import SelectReactor

from paxchat import clocks
# Bound here: conftest stands in for it so that tests keep their shared reactor as it is.
from paxchat.clocks import run_timers_on_monotonic_time


@pytest.fixture
def reactor():
    """A real reactor of its own, never run: its timers are fired by hand."""
    reactor = SelectReactor()
    try:
        yield reactor
    finally:
        reactor.removeReader(reactor.waker)
        reactor.waker.connectionLost(None)


def test_timers_move_to_monotonic_time_keeping_the_delay_they_have_left(reactor):
    fired = []
    soon = reactor.callLater(0, fired.append, "soon")
    later = reactor.callLater(100, fired.append, "later")
    reactor.callLater(50, fired.append, "cancelled").cancel()

    run_timers_on_monotonic_time(reactor)

    assert reactor.seconds is time.monotonic
    now = time.monotonic()
    assert later.getTime() == pytest.approx(now + 100, abs=1)
    assert soon.getTime() == pytest.approx(now, abs=1)
    after = reactor.callLater(0, fired.append, "after")
    assert after.getTime() == pytest.approx(now, abs=1)
    reactor.runUntilCurrent()
    assert fired == ["soon", "after"]
    # A call moved counts on the new clock when it is reset.
    later.reset(0)
    reactor.runUntilCurrent()
    assert fired == ["soon", "after", "later"]


def test_moving_twice_moves_once(reactor):
    run_timers_on_monotonic_time(reactor)
    call = reactor.callLater(30, lambda: None)
    run_timers_on_monotonic_time(reactor)
    assert call.getTime() == pytest.approx(time.monotonic() + 30, abs=1)
    call.cancel()


def test_a_test_clock_is_left_as_it_is():
    clock = task.Clock()
    clock.advance(1000)
    call = clock.callLater(5, lambda: None)
    run_timers_on_monotonic_time(clock)
    assert clock.seconds() == 1000 and call.getTime() == 1005
    # Its time stands for the time of day in tests that drive it.
    assert clocks.wall_clock(clock) is clock


def test_the_time_of_day_is_read_from_the_wall_once_timers_are_monotonic(reactor):
    assert clocks.wall_clock(reactor) is reactor
    run_timers_on_monotonic_time(reactor)
    assert clocks.wall_clock(reactor) is clocks.WALL
    assert clocks.WALL.seconds() == pytest.approx(time.time(), abs=1)
    assert abs(reactor.seconds() - time.time()) > 1  # monotonic time is not the date
