"""Step the leader's wall clock under a steady writer and say what the cluster did.

    .venv/bin/python tools/clock_step.py --step -60 --observe 70 --dir /tmp/clock-back

A 3-node cluster of this checkout (tests/cluster_support.py: twistd on
127.0.0.1, free ports, TLS on; heartbeat 0.1 s, election timeout 2-4 s unless
told otherwise), each node under libfaketime with its own offset file
(tests/faketime_support.py), so that only the leader's ``time.time()`` steps,
by --step seconds, and no node's ``time.monotonic()``. A client logged in on
a follower sends one message at a time, a new one every --interval s at most.
Printed, and written to --dir/figures.json: the leader's time of day after
the step (the ``ts`` of a message sent through it), how often the leader's
0.1 s metrics timer ran in the first 5 s after the step and how late in all,
the ballot rounds before and after and any change of leader seen (an
election), the writes acknowledged, the longest gap between acknowledgements
before and after the step, and what the nodes logged of silent peers and
leader changes. Then every acknowledged send is checked once on every node.
Needs libfaketime (apt-get install libfaketime). Exit status 0 when the run
and the check completed, whatever the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The nodes (child processes) run this checkout too, not whatever the venv installed.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

from twisted.internet import defer, task  # noqa: E402

from tests.faketime_support import (  # noqa: E402
    SteppedClockCluster, check_libfaketime, check_stored, step_the_leaders_clock)


def say(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


@defer.inlineCallbacks
def main(reactor, args):
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.iterdir()):
        raise SystemExit(f"{directory} is not empty")
    why_not = check_libfaketime(directory)
    if why_not:
        raise SystemExit(why_not)
    cluster = SteppedClockCluster(reactor, directory / "cluster", 3,
                                  heartbeat_interval=args.heartbeat,
                                  election_timeout_min=args.election_min,
                                  election_timeout_max=args.election_max)
    try:
        yield cluster.start_and_wait()
        figures = yield step_the_leaders_clock(cluster, args.step, args.observe,
                                               baseline=args.baseline, interval=args.interval, say=say)
        acked = figures.pop("acked")
        yield check_stored(cluster, acked)
        say(f"every one of the {len(acked)} acknowledged sends is stored once on every node")
        rounds_moved = figures["ballot_rounds_before"] != figures["ballot_rounds_after"]
        figures["election"] = rounds_moved or figures["leader_after"] != figures["leader"]
        (directory / "figures.json").write_text(json.dumps(figures, indent=1))
        say(json.dumps({k: v for k, v in figures.items()
                        if k not in ("changes_seen", "logged_after_step")}))
        for line in figures["logged_after_step"]:
            say("  logged after the step:", line[:200])
        say(f"leader or ballot changes seen in {figures['watch_samples']} samples of the"
            f" nodes' metrics (seconds after the step, node, what): {figures['changes_seen']}")
    finally:
        yield cluster.close_clients().addTimeout(10, reactor)
        cluster.kill_all()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--step", type=int, required=True, help="seconds, negative for back")
    p.add_argument("--observe", type=float, default=20.0, help="seconds watched after the step")
    p.add_argument("--baseline", type=float, default=2.0, help="seconds of writes before the step")
    p.add_argument("--interval", type=float, default=0.05, help="at most one send every this many s")
    p.add_argument("--heartbeat", type=float, default=0.1, help="cluster.ini heartbeat_interval")
    p.add_argument("--election-min", type=float, default=2.0, help="cluster.ini election_timeout_min")
    p.add_argument("--election-max", type=float, default=4.0, help="cluster.ini election_timeout_max")
    p.add_argument("--dir", required=True, help="a new or empty directory for the nodes and figures")
    task.react(main, [p.parse_args()])
