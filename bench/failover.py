"""Benchmark 2: kill -9 the leader under load; how long until writes succeed again.

Writers spread over every node keep writing in closed loops (a writer whose
node died moves to the next one). Writes unanswered after 0.5 s are asked
again. The failover time of a round is from the
SIGKILL to the first successful write that was *sent after* it: such a write
can only have been committed under a new leader. The killed node is
restarted and the cluster settles before the next round; the p50 over the
rounds is the figure.
"""

from __future__ import annotations

import statistics

from . import load, population, stats
from .etcd_cluster import EtcdCluster
from .paxchat_cluster import PaxchatCluster

NAME = "failover"
WRITERS = 8
# A write unanswered this long is abandoned and asked again (paxchat: same
# connection; etcd: a new connection to the same member), as a client with a
# short deadline would: requests proposed while there is no leader may
# otherwise wait for the server's own timeout (7 s on etcd, 5 s on paxchat).
RETRY_AFTER = 0.5


def sizes(tiny):
    return {"rounds": 1, "before": 0.5} if tiny else {"rounds": 5, "before": 2.0}


def summarize(times):
    return {"p50_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
            "max_s": round(max(times), 3), "rounds": len(times),
            "all_s": "/".join(f"{t:.2f}" for t in times)}


async def run(reactor, ctx):
    size = sizes(ctx.tiny)
    ours = await run_paxchat(reactor, ctx, size) if ctx.with_paxchat else None
    if not ctx.with_etcd:
        ctx.skip_etcd(NAME)
        return
    theirs = await run_etcd(reactor, ctx, size)
    if ours and theirs:
        ctx.compare(NAME, "leader killed", p50=stats.ratio(ours["p50_s"], theirs["p50_s"],
                                                           higher_is_better=False))


async def one_round(reactor, writers, kill, timeout=60.0):
    """Start the writers, kill, time the first success after the kill; stop the writers."""
    recorder = stats.Recorder()
    recorder.keep_samples = True
    stopping = []
    running = load.start_clients(writers, recorder, lambda: bool(stopping))
    try:
        await load.wait_until(reactor, lambda: recorder.total_ok >= len(writers), 30,
                              "writes before the kill")
        killed_at = load.now()
        kill()
        await load.wait_until(reactor, lambda: recorder.first_success_after(killed_at) is not None,
                              timeout, "a write to succeed after the kill", step=0.002)
        return recorder.first_success_after(killed_at) - killed_at
    finally:
        stopping.append(True)
        await running


async def rounds(reactor, ctx, size, writers, leader, kill, back, system, what):
    """Kill the leader ``size["rounds"]`` times; the seconds until writes succeed, per round.

    ``back(victim)`` restarts the killed one and returns the leader after it.
    """
    times = []
    for round_ in range(size["rounds"]):
        await load.sleep(reactor, size["before"])
        victim = leader
        took = await one_round(reactor, writers, lambda: kill(victim))
        times.append(took)
        ctx.say(f"[{NAME}] {system} round {round_ + 1}: {what} {victim} killed, "
                f"writes again after {took:.3f}s")
        leader = await back(victim)
    return times


async def run_paxchat(reactor, ctx, size):
    cluster = PaxchatCluster(reactor, ctx.workdir("failover-paxchat"), bcrypt_cost=4)
    users = []
    try:
        targets, node_ids, leader, replicated = await load.start_cluster(reactor, cluster)
        if not replicated:
            ctx.say(f"[{NAME}] paxchat skipped: the nodes are independent single-node servers "
                    "(no replicated log), there is no leader to kill")
            return None
        sinks = await population.make_sinks(reactor, targets, node_ids)
        homes = [node_ids[i % len(node_ids)] for i in range(WRITERS)]
        users = await population.logged_in_users(reactor, targets, homes, "f")
        writers = population.writers(users, sinks, node_ids)
        for writer in writers:
            writer.timeout = RETRY_AFTER

        async def back(victim):
            cluster.restart(victim)
            await cluster.wait_ready([victim])
            return (await load.wait_for_leader(reactor, targets, node_ids))[0]
        times = await rounds(reactor, ctx, size, writers, leader, cluster.kill, back, "paxchat", "node")
        figures = summarize(times)
        ctx.record(NAME, "paxchat", "leader killed", **figures)
        return figures
    finally:
        population.close_all(users)
        cluster.stop()


async def run_etcd(reactor, ctx, size):
    cluster = EtcdCluster(reactor, ctx.workdir("failover-etcd"), ctx.etcd_binary)
    writers = []
    try:
        await cluster.start()
        members = cluster.member_ids
        leader = await cluster.leader()
        homes = [members[i % len(members)] for i in range(WRITERS)]
        writers = await population.etcd_writers(reactor, cluster, homes, "f")
        for writer in writers:
            writer.timeout = RETRY_AFTER

        async def back(victim):
            cluster.restart(victim)
            await cluster.wait_ready(members)
            return await cluster.leader()
        times = await rounds(reactor, ctx, size, writers, leader, cluster.kill, back, "etcd", "member")
        figures = summarize(times)
        ctx.record(NAME, "etcd", "leader killed", **figures)
        return figures
    finally:
        population.close_etcd(writers)
        cluster.stop()
