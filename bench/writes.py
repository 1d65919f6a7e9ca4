"""Benchmark 1: committed writes per second and latency, N closed-loop clients.

paxchat: pre-created accounts, logged in, each client ``send_message`` to a
recipient that is not connected (the write path alone; pushes are measured
by the connections benchmark). etcd: ``/v3/kv/put`` of a new key with a
100-byte value. Load all on the leader, then spread over every node
(followers forward to the leader on both systems). Besides throughput and
latency, the CPU each write costs the leader, the other servers and the
load generator (utime + stime over the window).
"""

from __future__ import annotations

from . import load, population, procs, profiling, stats
from .etcd_cluster import EtcdCluster
from .paxchat_cluster import PaxchatCluster

NAME = "writes"


def sizes(tiny):
    if tiny:
        return {"counts": [1, 4], "warmup": 0.3, "duration": 1.0}
    return {"counts": [1, 16, 64, 256], "warmup": 3.0, "duration": 12.0}


def homes_for(placement, leader, node_ids, count):
    if placement == "leader":
        return [leader] * count
    return [node_ids[i % len(node_ids)] for i in range(count)]


async def run(reactor, ctx):
    size = sizes(ctx.tiny)
    if ctx.clients:
        size["counts"] = ctx.clients
    counts = size["counts"]
    if ctx.with_paxchat:
        await run_paxchat(reactor, ctx, size)
    if not ctx.with_etcd:
        ctx.skip_etcd(NAME)
        return
    await run_etcd(reactor, ctx, size)
    for count in counts:
        for placement in ("leader", "spread"):
            label = f"{placement} clients={count}"
            ours, theirs = ctx.find(NAME, "paxchat", label), ctx.find(NAME, "etcd", label)
            if ours and theirs:
                ctx.compare(NAME, label,
                            throughput=stats.ratio(ours["ops_per_s"], theirs["ops_per_s"]),
                            p99=stats.ratio(ours["p99_ms"], theirs["p99_ms"], higher_is_better=False),
                            server_cpu=stats.ratio(ours.get("server_cpu_us"), theirs.get("server_cpu_us"),
                                                   higher_is_better=False))


async def run_paxchat(reactor, ctx, size):
    cluster = PaxchatCluster(reactor, ctx.workdir("writes-paxchat"), bcrypt_cost=4,
                             wrap=profiling.node_wrapper(ctx, "writes"))
    users = []
    try:
        targets, node_ids, leader, replicated = await load.start_cluster(reactor, cluster)
        if not replicated:
            ctx.say(f"[{NAME}] note: the nodes are independent single-node servers "
                    "(no replicated log): 'leader' is node 1, 'spread' writes to three separate logs")
            leader = node_ids[0]
        sinks = await population.make_sinks(reactor, targets, node_ids)
        top = max(size["counts"])
        sets = {}
        for placement in ("leader", "spread"):
            homes = homes_for(placement, leader, node_ids, top)
            sets[placement] = await population.logged_in_users(
                reactor, targets, homes, f"w{placement[0]}")
            users += sets[placement]
        for count in size["counts"]:
            for placement in ("leader", "spread"):
                chosen = sets[placement][:count]
                writers = population.writers(chosen, sinks, node_ids)
                spy = profiling.maybe_attach(ctx, cluster, leader, count, size["duration"] + size["warmup"])
                cpu = procs.CpuMeter(cluster.pid(leader), [cluster.pid(n) for n in node_ids if n != leader])
                summary = await load.run_clients(writers, stats.Recorder(), size["warmup"],
                                                 size["duration"], reactor, cpu)
                await profiling.finish(ctx, spy)
                ctx.record(NAME, "paxchat", f"{placement} clients={count}", **summary)
    finally:
        population.close_all(users)
        cluster.stop()


async def run_etcd(reactor, ctx, size):
    cluster = EtcdCluster(reactor, ctx.workdir("writes-etcd"), ctx.etcd_binary)
    writers = []
    try:
        await cluster.start()
        leader = await cluster.leader()
        for count in size["counts"]:
            for placement in ("leader", "spread"):
                homes = homes_for(placement, leader, cluster.member_ids, count)
                batch = await population.etcd_writers(reactor, cluster, homes, f"{placement}{count}-")
                writers += batch
                cpu = procs.CpuMeter(cluster.pid(leader),
                                     [cluster.pid(m) for m in cluster.member_ids if m != leader])
                summary = await load.run_clients(batch, stats.Recorder(), size["warmup"],
                                                 size["duration"], reactor, cpu)
                population.close_etcd(batch)
                ctx.record(NAME, "etcd", f"{placement} clients={count}", **summary)
    finally:
        population.close_etcd(writers)
        cluster.stop()
