"""The two kinds of time a node reads, and a reactor whose timers count the right one.

Twisted's reactor schedules its timers on ``time.time()``, the wall clock,
which NTP or an operator may step. Stepped back by N seconds, every timer of
the node (heartbeats, elections, keepalives, request timeouts) would fire N
seconds late: the node would stand still for that long. Stepped forward, every
timer would fire at once. A node therefore moves its reactor's timers to
monotonic time (``run_timers_on_monotonic_time``) before it schedules any, and
reads the time of day (message times, session expiry, which other nodes read
too) from the wall clock (``wall_clock``).
"""

import time


class _Clock:
    """An ``IReactorTime.seconds`` provider for code that only reads the time."""

    def __init__(self, seconds):
        self.seconds = seconds


MONOTONIC = _Clock(time.monotonic)
"""Real time that no one steps: what leases and timeouts are counted in."""

WALL = _Clock(time.time)
"""The time of day: what is stored in the state and compared across nodes."""


def run_timers_on_monotonic_time(reactor):
    """Have ``reactor`` schedule and fire its timers on ``time.monotonic()``.

    Timers already scheduled keep the delay they have left. Reactors that are
    not Twisted's real ones (a ``task.Clock`` in a test) are left as they are.
    """
    if reactor.seconds is time.monotonic or not hasattr(reactor, "_pendingTimedCalls"):
        return
    shift = time.monotonic() - reactor.seconds()
    # Every pending call moves by the same amount, so the reactor's heap of
    # them stays in order; cancelled ones still in it move too.
    for call in reactor._pendingTimedCalls + reactor._newTimedCalls:
        call.time += shift
        call.seconds = time.monotonic
    reactor.seconds = time.monotonic


def wall_clock(reactor):
    """What to read the time of day from: ``reactor`` itself, unless its timers
    run on monotonic time, whose seconds say nothing of the date."""
    return WALL if reactor.seconds is time.monotonic else reactor
