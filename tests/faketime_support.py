"""Nodes whose wall clock a test steps, and what a steady writer saw meanwhile.

A node's wall clock is stepped without touching the machine's: every node
runs under libfaketime (LD_PRELOAD) with its own offset file, which
libfaketime reads again at each call (``FAKETIME_NO_CACHE``); rewriting the
file steps that node's ``time.time()`` at once. ``FAKETIME_DONT_FAKE_MONOTONIC``
leaves ``time.monotonic()`` as it is, as NTP or ``date -s`` would. Used by
tests/test_clock_step.py and tools/clock_step.py.

The thread-safe build (libfaketimeMT) is preloaded: a node reads the time
from several threads, and under the plain build one node of the tree before
paxchat/clocks.py once kept running its timers through a step back, which the
thread-safe build never let happen. libfaketime 0.9.10 (Debian 12) with
``FAKETIME_DONT_FAKE_MONOTONIC`` breaks ``time.sleep`` in Python 3.11 (EINVAL
from ``clock_nanosleep``, libfaketime issue 426); a node never calls it.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

from twisted.internet import defer

from paxchat.client import ServerError
from tests.cluster_support import (
    SINK, Cluster, check_every_node, create_accounts, logged_in, sleep, wait_until)

# The thread-safe build first: a node reads the time from several threads.
LIBFAKETIME_PATTERNS = tuple(
    f"{directory}/{name}"
    for name in ("libfaketimeMT.so.1", "libfaketime.so.1")
    for directory in ("/usr/lib/*/faketime", "/usr/lib/faketime", "/usr/local/lib/faketime"))
INSTALL_HINT = "apt-get install libfaketime"


def find_libfaketime() -> str | None:
    """The path of libfaketime's preload library, or None."""
    for pattern in LIBFAKETIME_PATTERNS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def faketime_env(library, offset_file) -> dict[str, str]:
    """What a process needs to read its wall clock ``offset_file``'s seconds off real time."""
    return {
        "LD_PRELOAD": str(library),
        "FAKETIME_TIMESTAMP_FILE": str(offset_file),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


def write_offset(path, seconds):
    """Set the offset in one go: a process reading it half-written would jump anywhere."""
    path = Path(path)
    scratch = path.with_name(path.name + ".new")
    scratch.write_text(f"{int(seconds):+d}\n")
    os.replace(scratch, path)


_CHECK_CHILD = """\
import sys, time
wall, mono = time.time(), time.monotonic()
print("ready", flush=True)
sys.stdin.readline()
print(time.time() - wall, time.monotonic() - mono, flush=True)
"""


def check_libfaketime(directory, library=None, step=-60, timeout=20.0) -> str | None:
    """None if a Python child under libfaketime sees its ``time.time()`` step by
    ``step`` seconds when its offset file changes and its ``time.monotonic()``
    not; otherwise why not (a reason to skip on). Blocks up to ``timeout`` s:
    call it before the reactor runs anything."""
    library = library or find_libfaketime()
    if library is None:
        return f"libfaketime is not installed ({INSTALL_HINT})"
    offset_file = Path(directory) / "check.faketime"
    write_offset(offset_file, 0)
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", _CHECK_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env={**os.environ, **faketime_env(library, offset_file)})
        try:
            ready = process.stdout.readline()
            if ready.strip() != "ready":
                process.kill()
                _, err = process.communicate(timeout=timeout)
                return f"a Python child under {library} failed: {err.strip()[-300:]}"
            write_offset(offset_file, step)
            out, err = process.communicate("go\n", timeout=timeout)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"a Python child under {library} could not be run: {e!r}"
    try:
        wall, mono = (float(x) for x in out.split())
    except ValueError:
        return f"a Python child under {library} answered {out!r} {err.strip()[-300:]!r}"
    if abs(wall - step) > 5 or abs(mono) > 5:
        return (f"under {library} a step of {step:+d} s moved time.time() by {wall:+.1f} s and "
                f"time.monotonic() by {mono:+.1f} s")
    return None


class SteppedClockCluster(Cluster):
    """A `Cluster` whose nodes each run under libfaketime with an offset file,
    ``node-N.faketime`` beside the logs, at +0 until `step_clock`."""

    def __init__(self, reactor, directory, nodes=3, library=None, **keys):
        super().__init__(reactor, directory, nodes, **keys)
        self.library = library or find_libfaketime()
        if self.library is None:
            raise RuntimeError(f"libfaketime is not installed ({INSTALL_HINT})")
        self.offsets = {n: 0 for n in self.node_ids}
        for n in self.node_ids:
            write_offset(self.offset_file(n), 0)

    def offset_file(self, node_id) -> Path:
        return self.directory / f"node-{node_id}.faketime"

    def command(self, node_id) -> list[str]:
        # env(1) execs the node in its place: the same pid, the same parent.
        variables = faketime_env(self.library, self.offset_file(node_id))
        return ["env", *(f"{k}={v}" for k, v in variables.items()), *super().command(node_id)]

    def step_clock(self, node_id, seconds):
        """Step node ``node_id``'s wall clock by ``seconds`` (back if negative), now."""
        self.offsets[node_id] += seconds
        write_offset(self.offset_file(node_id), self.offsets[node_id])


class PacedWriter:
    """One logged-in client sending to ``to``, one message at a time, a new one
    at most every ``interval`` s; remembers when each was acknowledged.

    ``acked`` has `Load`'s form, for `check_every_node`.
    """

    def __init__(self, reactor, client, to=SINK, interval=0.05, prefix=None):
        self.reactor = reactor
        self.client = client
        self.to = to
        self.interval = interval
        self.prefix = prefix or uuid.uuid4().hex[:8]
        self.acked: dict[str, dict] = {}
        self.errors: list[tuple[float, str, str]] = []
        self._stop = False

    def stop(self):
        self._stop = True

    def ack_times(self):
        return sorted(a["acked_at"] for a in self.acked.values())

    def latency(self, quantile):
        """That quantile of the acknowledged sends' times from issue to acknowledgement."""
        took = sorted(a["acked_at"] - a["issued_at"] for a in self.acked.values())
        return took[min(len(took) - 1, int(quantile * len(took)))] if took else None

    def longest_gap(self, since, until):
        """(seconds, when it began): the longest time between acknowledgements
        from ``since`` to ``until``, counting from the last one before ``since``
        and up to ``until``."""
        times = self.ack_times()
        before = [t for t in times if t <= since]
        points = before[-1:] + [t for t in times if since < t <= until] + [until]
        return max(((b - a, a) for a, b in zip(points, points[1:])), default=(until - since, since))

    @defer.inlineCallbacks
    def run(self):
        number = 0
        while not self._stop:
            number += 1
            msg_id = f"{self.prefix}-{number}"
            issued = self.reactor.seconds()
            try:
                result = yield self.client.send_message(self.to, msg_id, client_msg_id=msg_id)
            except ServerError as e:
                self.errors.append((self.reactor.seconds(), msg_id, f"{e.code}: {e}"))
            except Exception as e:
                self.errors.append((self.reactor.seconds(), msg_id, repr(e)))
            else:
                self.acked[msg_id] = {"message_id": result["message_id"], "issued_at": issued,
                                      "acked_at": self.reactor.seconds()}
            left = issued + self.interval - self.reactor.seconds()
            if left > 0:
                yield sleep(self.reactor, left)   # pacing


class LeaderWatch:
    """Reads every node's metrics every ``interval`` s (plain HTTP: lighter on a
    busy node than a TLS ``hello``); remembers each sample in which a node names
    another leader than ``leader``, or none, or promised a higher ballot round."""

    def __init__(self, cluster, leader, rounds, interval=0.5):
        self.cluster = cluster
        self.leader = leader
        self.rounds = dict(rounds)
        self.interval = interval
        self.changes: list[tuple[float, int, str]] = []   # (time, node, what changed)
        self.samples = 0
        self._stop = False

    def stop(self):
        self._stop = True

    @defer.inlineCallbacks
    def run(self):
        reactor = self.cluster.reactor
        while not self._stop:
            asked = reactor.seconds()
            for n in self.cluster.node_ids:
                try:
                    gauges = yield self.cluster.gauges(n)
                except Exception:
                    continue
                named = gauges.get("paxchat_leader")
                round_ = gauges.get("paxchat_ballot_round")
                if named != self.leader:
                    self.changes.append((asked, n, f"names leader {named}"))
                if round_ is not None and round_ != self.rounds.get(n):
                    self.changes.append((asked, n, f"ballot round {round_}"))
                    self.rounds[n] = round_
            self.samples += 1
            left = asked + self.interval - reactor.seconds()
            if left > 0:
                yield sleep(reactor, left)   # pacing


# What a node logs when its peers or its leader change.
NOTEWORTHY = ("silent for", "leader is now", "Traceback", "CRITICAL", "#critical", "#error")


SILENT = re.compile(r"silent for ([0-9.]+) s")


def _size(path):
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def logged_since(cluster, marks, needles):
    """``["node N: line", ...]``: each node's lines past ``marks[N]`` bytes that hold one of ``needles``."""
    found = []
    for n in cluster.node_ids:
        with open(cluster.log_path(n), "rb") as f:
            f.seek(marks.get(n, 0))
            text = f.read().decode("utf-8", "replace")
        found.extend(f"node {n}: {line.strip()}" for line in text.splitlines()
                     if any(needle in line for needle in needles))
    return found


def gauges_of(cluster, node_id, timeout=20.0):
    """Node ``node_id``'s metrics (asked again while a busy node does not answer in time)."""
    return wait_until(cluster.reactor, lambda: cluster.gauges(node_id), timeout,
                      f"node {node_id}'s metrics", interval=0.2)


def timer_figures(gauges):
    """(timer runs, seconds late in all) of the node's event-loop probe, a timer
    it sets every ``LAG_PROBE_SECONDS`` (paxchat/metrics.py)."""
    return (gauges.get("paxchat_event_loop_lag_seconds_count", 0.0),
            gauges.get("paxchat_event_loop_lag_seconds_sum", 0.0))


def ballot_rounds(cluster, timeout=20.0):
    """``{node: round of the highest ballot it promised}`` from each node's metrics
    (asked again while a busy node does not answer in time)."""
    @defer.inlineCallbacks
    def read():
        rounds = {}
        for n in cluster.node_ids:
            gauges = yield cluster.gauges(n)
            rounds[n] = gauges.get("paxchat_ballot_round")
        return rounds
    return wait_until(cluster.reactor, read, timeout, "every node's metrics", interval=0.2)


TIMERS_WINDOW = 5.0   # seconds after the step in which the stepped node's timers are counted
STAMP_TIMEOUT = 30.0  # for the message sent through the stepped node to be answered


@defer.inlineCallbacks
def step_the_leaders_clock(cluster, step, observe, baseline=1.0, interval=0.05, say=None):
    """With a writer sending through a follower, step the leader's wall clock by
    ``step`` s and watch for ``observe`` s (the leader's timers for the first
    `TIMERS_WINDOW` of them). Returns the figures (a dict).

    The leader's own time of day is read back from a message sent through it
    (its ``ts``), to show the step took.
    """
    reactor = cluster.reactor
    say = say or (lambda *args: None)
    leader = yield cluster.wait_leader()
    follower = min(n for n in cluster.node_ids if n != leader)
    yield create_accounts(cluster, "writer", "stamp", SINK)
    writer_client = yield logged_in(cluster, "writer", only=follower)
    stamp_client = yield logged_in(cluster, "stamp", only=leader)
    rounds_before = yield ballot_rounds(cluster)
    say(f"leader {leader}, writer on node {follower}, ballot rounds {rounds_before}")

    writer = PacedWriter(reactor, writer_client, interval=interval)
    writing = writer.run()
    watch = LeaderWatch(cluster, leader, rounds_before)
    watching = watch.run()
    yield wait_until(reactor, lambda: len(writer.acked) >= 5, 30, "the writer's first sends")
    yield sleep(reactor, baseline)   # a steady pace before the step, to compare with
    acked_before = len(writer.acked)

    probes_before = timer_figures((yield gauges_of(cluster, leader)))
    marks = {n: _size(cluster.log_path(n)) for n in cluster.node_ids}
    stepped_at = reactor.seconds()
    cluster.step_clock(leader, step)
    say(f"stepped node {leader}'s wall clock by {step:+d} s")
    # Sent now, awaited after the watch: a leader that steps down meanwhile
    # answers it once another leads.
    stamped = stamp_client.send_message(SINK, "stamp", client_msg_id=uuid.uuid4().hex)
    stamped.addCallback(lambda result: (result["ts"] - time.time(), reactor.seconds() - stepped_at))
    timers_window = min(TIMERS_WINDOW, observe)
    left = stepped_at + timers_window - reactor.seconds()
    if left > 0:
        yield sleep(reactor, left)   # the length of the observation
    probes_after = timer_figures((yield gauges_of(cluster, leader)))
    left = stepped_at + observe - reactor.seconds()
    if left > 0:
        yield sleep(reactor, left)   # the length of the observation
    # A write issued after the step acknowledged, at the latest now (bounded).
    yield wait_until(reactor, lambda: any(a["issued_at"] > stepped_at for a in writer.acked.values()),
                     60, "a write issued after the step to be acknowledged")
    stamp = stamp_took = None
    try:
        stamp, stamp_took = yield stamped.addTimeout(STAMP_TIMEOUT, reactor)
    except Exception as e:
        say(f"the leader stamped nothing: {e!r}")
    ended_at = reactor.seconds()
    writer.stop()
    watch.stop()
    yield defer.DeferredList([writing, watching]).addTimeout(30, reactor)
    rounds_after = yield ballot_rounds(cluster)
    leader_after = yield cluster.wait_leader()
    gap_before, _ = writer.longest_gap(stepped_at - baseline, stepped_at)
    gap_after, gap_began = writer.longest_gap(stepped_at, ended_at)
    figures = {
        "step": step,
        "leader": leader,
        "writer_node": follower,
        "leader_time_of_day_offset": stamp,
        "stamp_answered_after": stamp_took,
        "ballot_rounds_before": rounds_before,
        "ballot_rounds_after": rounds_after,
        "leader_after": leader_after,
        "changes_seen": [(round(t - stepped_at, 2), n, what) for t, n, what in watch.changes],
        "watch_samples": watch.samples,
        "acked_before_step": acked_before,
        "acked_after_step": len([t for t in writer.ack_times() if stepped_at < t <= ended_at]),
        "errors": writer.errors,
        "longest_gap_before_step": gap_before,
        "longest_gap_after_step": gap_after,
        "longest_gap_began_after_step": gap_began - stepped_at,
        "logged_after_step": logged_since(cluster, marks, NOTEWORTHY),
        "longest_silence_logged": max(
            [float(m.group(1)) for line in logged_since(cluster, marks, ("silent for",))
             for m in [SILENT.search(line)] if m], default=0.0),
        # The stepped node's own timers in the first TIMERS_WINDOW s: how often
        # its 0.1 s probe ran, and how late in all.
        "timers_window": timers_window,
        "timer_runs_after_step": probes_after[0] - probes_before[0],
        "timers_late_seconds_after_step": probes_after[1] - probes_before[1],
        "observed_seconds": ended_at - stepped_at,
        "first_write_after_step_acked_in": min(a["acked_at"] for a in writer.acked.values()
                                               if a["issued_at"] > stepped_at) - stepped_at,
        "send_seconds_median": writer.latency(0.5),
        "send_seconds_p99": writer.latency(0.99),
        "acked": writer.acked,
    }
    return figures


@defer.inlineCallbacks
def check_stored(cluster, acked):
    """Every acknowledged send once, the same on every node."""
    yield cluster.wait_applied_everywhere()
    yield check_every_node(cluster, cluster.node_ids, acked)
