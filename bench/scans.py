"""Benchmark 8: chat on a node while other connections of it scan account names.

A few clients chat (closed loops of ``send_message``) and one reads
``history`` on a follower. Their p99 is taken quietly, then while 64 other
connections of the same node each keep 256 ``list_accounts`` requests with a
leading wildcard (``*b``, every name read) in flight over 3,000 names of 32
characters. The figures are chat and history p99 during the scans against
their quiet values: the node applies what the cluster commits before its
clients' reads, and serves the reads of its connections in turn, so the
scans should slow the scanners, not the others.
"""

from __future__ import annotations

from twisted.internet import defer

from . import load, population, stats
from .paxchat_cluster import PaxchatCluster

NAME = "scans"
PATTERN = "*b"  # no name ends in "b": every name is read, none listed


def sizes(tiny):
    if tiny:
        return {"accounts": 40, "scanners": 4, "depth": 16, "chatters": 2, "quiet": 1.0, "busy": 2.0}
    return {"accounts": 3000, "scanners": 64, "depth": 256, "chatters": 4, "quiet": 5.0, "busy": 10.0}


class HistoryReader:
    """A closed-loop client reading its newest history page."""

    def __init__(self, user):
        self.user = user

    def write(self):
        return load.request(self.user.reactor, self.user.proto, "history", limit=5)

    async def recover(self, exc):
        await load.sleep(self.user.reactor, 0.05)


async def scan(user, depth, stopping, answered):
    """Keep ``depth`` scans in flight on one connection until told to stop."""

    def one():
        d = user.proto.request("list_accounts", pattern=PATTERN, limit=1000)
        d.addCallback(lambda _: answered.append(None))
        return d

    while not stopping:
        await defer.DeferredList([one() for _ in range(depth)], consumeErrors=True)


async def run(reactor, ctx):
    if not ctx.with_paxchat:
        return
    size = sizes(ctx.tiny)
    ctx.say(f"[{NAME}] etcd    not compared: the figures are paxchat's chat and history p99 "
            f"during the scans against their own quiet values")
    cluster = PaxchatCluster(reactor, ctx.workdir("scans-paxchat"), bcrypt_cost=4)
    users = []
    try:
        targets, node_ids, leader, replicated = await load.start_cluster(reactor, cluster)
        node = next((n for n in node_ids if n != leader), node_ids[0]) if replicated else node_ids[0]
        sinks = await population.make_sinks(reactor, targets, node_ids, count=2)
        names = [f"{'n' * 26}{i:06d}" for i in range(size["accounts"])]
        await population.create_accounts(reactor, targets, node, names)
        chatters = await population.logged_in_users(reactor, targets, [node] * size["chatters"], "talk")
        readers = await population.logged_in_users(reactor, targets, [node], "look")
        scanners = await population.logged_in_users(reactor, targets, [node] * size["scanners"], "scan")
        users += chatters + readers + scanners
        clients = {"chat": population.writers(chatters, sinks, [node]),
                   "history": [HistoryReader(u) for u in readers]}

        quiet = await measure(clients, size["quiet"])
        for what, summary in quiet.items():
            ctx.record(NAME, "paxchat", f"{what} on node {node}, quiet", **summary)

        stopping, answered = [], []
        scans = defer.gatherResults([defer.ensureDeferred(scan(u, size["depth"], stopping, answered))
                                     for u in scanners], consumeErrors=True)
        try:
            await load.sleep(reactor, 1.0)  # every scanner has its pipeline full
            before = len(answered)
            busy = await measure(clients, size["busy"])
            scanned = len(answered) - before
        finally:
            stopping.append(True)
            await scans
        label = (f"during {size['scanners']} connections x {size['depth']} pipelined "
                 f"'{PATTERN}' scans of {size['accounts']} names")
        for what, summary in busy.items():
            ctx.record(NAME, "paxchat", f"{what} {label}", **summary,
                       p99_vs_quiet=stats.times(summary["p99_ms"], quiet[what]["p99_ms"]))
        ctx.record(NAME, "paxchat", "scans answered", per_s=round(scanned / size["busy"], 1))
    finally:
        population.close_all(users)
        cluster.stop()


async def measure(clients, duration):
    """{what: summary} of every group of closed-loop clients, run side by side."""
    recorders = {what: stats.Recorder() for what in clients}
    await defer.gatherResults(
        [defer.ensureDeferred(load.run_clients(group, recorders[what], 0.5, duration))
         for what, group in clients.items()], consumeErrors=True)
    return {what: r.summary() for what, r in recorders.items()}
