"""A leader whose wall clock is stepped 60 s back or forward, in a real process:
its timers go on running on time (paxchat/clocks.py), and writes through a
follower go on being acknowledged, each stored once.

The node's ``time.time()`` is stepped with libfaketime, its ``time.monotonic()``
left alone (tests/faketime_support.py); skipped without libfaketime.
"""

import pytest
import pytest_twisted

from tests.cluster_support import (  # noqa: F401 (cluster_factory is a fixture)
    cluster_factory, requires_replicated_log, within)
from tests.faketime_support import (
    SteppedClockCluster, check_libfaketime, check_stored, step_the_leaders_clock)

pytestmark = requires_replicated_log

STEP = 60
# Longer election timeouts than cluster_support's: fewer elections caused by
# a busy machine's late event loop (they are printed, not asserted: on a shared
# 2-core machine a 20 s window without any step saw one now and then).
KEYS = dict(heartbeat_interval=0.1, election_timeout_min=2.0, election_timeout_max=4.0)
# Watched this long after the step: the node's 0.1 s metrics probe should run
# ~50 times. On a reactor timed by the wall clock it ran none after a step back
# (every timer waited 60 s) and, after a step forward, fired at once 60 s late,
# as the node's keepalive check did, which dropped every peer link as silent
# for 60 s.
OBSERVE = 5.0
AT_LEAST_RUNS = 5         # of ~50: a node late by a few seconds still makes it
TOO_LATE = STEP / 2       # seconds: what a step would add, no load does


@pytest.fixture(scope="module")
def libfaketime(tmp_path_factory):
    why_not = check_libfaketime(tmp_path_factory.mktemp("faketime"))
    if why_not:
        pytest.skip(why_not)


@pytest.mark.parametrize("step", [-STEP, STEP], ids=["back", "forward"])
@within(150)
@pytest_twisted.inlineCallbacks
def test_a_leader_whose_wall_clock_steps_runs_its_timers_on_time(cluster_factory, libfaketime, step):
    cluster = cluster_factory(3, cluster_class=SteppedClockCluster, **KEYS)
    yield cluster.start_and_wait()
    yield cluster.require_replication()
    f = yield step_the_leaders_clock(cluster, step, OBSERVE)
    leader = f["leader"]
    offset = f["leader_time_of_day_offset"]
    print(f"\nnode {leader}'s wall clock stepped {step:+d} s (its time of day now"
          f" {offset if offset is None else round(offset, 1)} s off): in {OBSERVE:g} s its timer ran"
          f" {f['timer_runs_after_step']:g} times, {f['timers_late_seconds_after_step']:.2f} s late"
          f" in all; longest silence logged {f['longest_silence_logged']:g} s; writes acknowledged"
          f" {f['acked_after_step']}, longest gap {f['longest_gap_after_step']:.2f} s (before the"
          f" step {f['longest_gap_before_step']:.2f} s), first write after the step in"
          f" {f['first_write_after_step_acked_in']:.2f} s; leader {leader} -> {f['leader_after']},"
          f" ballot rounds {f['ballot_rounds_before']} -> {f['ballot_rounds_after']}")
    # The step took: the leader stamps a message with its own time of day
    # (answered up to 30 s later if it stepped down meanwhile).
    assert offset is not None and step - 40 < offset < step + 2, \
        f"node {leader}'s time of day is {offset} s off, not about {step:+d} s: the step did not take"
    # Its timers neither stood still nor fired all at once.
    assert f["timer_runs_after_step"] >= AT_LEAST_RUNS, (
        f"node {leader}'s 0.1 s timer ran {f['timer_runs_after_step']:g} times in"
        f" {OBSERVE:g} s after its wall clock stepped {step:+d} s")
    assert f["timers_late_seconds_after_step"] < TOO_LATE, (
        f"node {leader}'s timers ran {f['timers_late_seconds_after_step']:.1f} s late in all"
        f" after its wall clock stepped {step:+d} s")
    assert f["longest_silence_logged"] < TOO_LATE, "\n".join(
        line for line in f["logged_after_step"] if "silent for" in line)
    assert not f["errors"], f"sends failed: {f['errors'][:5]}"
    yield check_stored(cluster, f["acked"])
