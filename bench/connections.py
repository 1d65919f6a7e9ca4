"""Benchmark 4: many idle logged-in clients on one node; memory each, and push latency.

N clients connect to one node (the leader) over TLS, ask for leader
events and log in (as the desktop app does), then stay idle. Memory per connection is the node process's RSS growth over that
step divided by N (accounts are created beforehand, through another node
when the cluster replicates, so the figure is the connections' and
sessions' cost). Then one of the idle clients is sent a message every
20 ms by another user; the push latency is from that ``send_message``
leaving the sender to the ``message`` event reaching the idle client:
first on a quiet node, then while 16 clients chat among themselves on it.
Accounts use bcrypt cost 4: the hash cost is not what this measures, and
5,000 accounts at cost 12 would take an hour of CPU here.
"""

from __future__ import annotations

import uuid

from . import load, population, procs, stats
from .paxchat_cluster import PaxchatCluster

NAME = "connections"
TARGET_KIB = 20
CHATTERS = 16
PING_EVERY = 0.02


def sizes(tiny):
    if tiny:
        return {"clients": 100, "quiet": 0.5, "chat": 1.0}
    return {"clients": 5000, "quiet": 5.0, "chat": 15.0}


async def run(reactor, ctx):
    if not ctx.with_paxchat:
        return
    size = sizes(ctx.tiny)
    ctx.say(f"[{NAME}] etcd    not compared: etcd has no logged-in clients to push to")
    cluster = PaxchatCluster(reactor, ctx.workdir("connections-paxchat"), bcrypt_cost=4)
    users = []
    try:
        targets, node_ids, leader, replicated = await load.start_cluster(reactor, cluster)
        node = leader if replicated else node_ids[0]
        creator = next(n for n in node_ids if n != node) if replicated else node
        count = size["clients"]
        names = [f"idle{i}" for i in range(count)]
        await population.create_accounts(reactor, targets, creator, names + ["pinger"])
        chatters = await population.logged_in_users(reactor, targets, [node] * CHATTERS, "chat")
        users += chatters
        pinger = (await population.login_only(reactor, targets, [node], ["pinger"]))[0]
        users.append(pinger)
        await load.sleep(reactor, 1.0)
        before = procs.rss_bytes(cluster.pid(node))

        pushed = {}

        def on_event_of(i):
            if i != 0:
                return None
            return lambda event: pushed.setdefault(
                event.get("message", {}).get("body"), load.now())

        idle = await population.login_only(reactor, targets, [node] * count, names,
                                           on_event=on_event_of, limit=64, leader_events=True)
        users += idle
        await load.sleep(reactor, 1.0)
        after = procs.rss_bytes(cluster.pid(node))
        per_conn = (after - before) / count / 1024
        ctx.record(NAME, "paxchat", f"{count} idle clients on node {node}",
                   kib_per_connection=round(per_conn, 2), rss_before_mib=round(before / 2**20, 1),
                   rss_after_mib=round(after / 2**20, 1), target_kib=TARGET_KIB,
                   within_target=per_conn < TARGET_KIB)

        target = idle[0].username
        quiet = await ping(reactor, pinger, target, pushed, size["quiet"])
        ctx.record(NAME, "paxchat", "push to an idle client, quiet", **quiet)
        writers = [load.PaxchatWriter(u, chatters[(i + 1) % CHATTERS].username, [node])
                   for i, u in enumerate(chatters)]
        recorder = stats.Recorder()
        stopping = []
        chat = load.start_clients(writers, recorder, lambda: bool(stopping))
        try:
            await load.sleep(reactor, 0.5)
            busy = await ping(reactor, pinger, target, pushed, size["chat"])
        finally:
            stopping.append(True)
            await chat
        ctx.record(NAME, "paxchat", f"push to an idle client, {CHATTERS} clients chatting",
                   chat_msgs=recorder.total_ok, **busy)
    finally:
        population.close_all(users)
        cluster.stop()


async def ping(reactor, pinger, target, pushed, duration):
    """Send to ``target`` every PING_EVERY s for ``duration``; push latencies."""
    sent = {}
    end = load.now() + duration
    while load.now() < end:
        body = f"ping {uuid.uuid4().hex}"
        sent[body] = load.now()
        try:
            await load.request(reactor, pinger.proto, "send_message", to=target, body=body)
        except Exception:
            pass
        await load.sleep(reactor, PING_EVERY)
    await load.sleep(reactor, 1.0)  # late pushes
    latencies = sorted(pushed[b] - t for b, t in sent.items() if b in pushed)
    return {"pings": len(sent), "pushed": len(latencies),
            "p50_ms": _ms(stats.percentile(latencies, 0.5)),
            "p99_ms": _ms(stats.percentile(latencies, 0.99))}


def _ms(value):
    return None if value is None else round(value * 1000, 2)
