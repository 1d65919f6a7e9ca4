"""Benchmark 5: a storm of concurrent logins (bcrypt cost 12) while chat goes on.

16 clients chat on the leader (closed loops to recipients that are not
connected). Their p99 is taken on a quiet node, then while 200 new
connections log in at once to the same node; the figure is chat p99 during
the storm against the quiet value. bcrypt runs in each node's worker
process at a lower priority, so chat should feel the hashes only through
the CPU the nodes leave idle (2 cores here, shared by three nodes and the
load generator).
"""

from __future__ import annotations

from . import load, population, stats
from .paxchat_cluster import PaxchatCluster

NAME = "loginstorm"
CHATTERS = 16


def sizes(tiny):
    if tiny:
        return {"logins": 4, "quiet": 1.0, "chatters": 2}
    return {"logins": 200, "quiet": 10.0, "chatters": CHATTERS}


async def run(reactor, ctx):
    if not ctx.with_paxchat:
        return
    size = sizes(ctx.tiny)
    ctx.say(f"[{NAME}] etcd    not compared: the figure is paxchat's chat p99 against its own quiet value")
    cluster = PaxchatCluster(reactor, ctx.workdir("loginstorm-paxchat"), bcrypt_cost=12)
    users = []
    try:
        targets, node_ids, leader, replicated = await load.start_cluster(reactor, cluster)
        node = leader if replicated else node_ids[0]
        chatters_n = size["chatters"]
        sinks = await population.make_sinks(reactor, targets, node_ids, count=2)
        names = [f"storm{i}" for i in range(size["logins"])]
        await population.create_accounts(reactor, targets, node, names)
        chatters = await population.logged_in_users(reactor, targets, [node] * chatters_n, "talk")
        users += chatters
        writers = population.writers(chatters, sinks, [node])

        quiet = stats.Recorder()
        await load.run_clients(writers, quiet, 1.0, size["quiet"])
        quiet_summary = quiet.summary()
        ctx.record(NAME, "paxchat", f"chat of {chatters_n} clients, quiet", **quiet_summary)

        busy = stats.Recorder()
        busy.set_window(float("inf"), float("inf"))
        stopping = []
        chat = load.start_clients(writers, busy, lambda: bool(stopping))
        login_times = []
        try:
            await load.sleep(reactor, 1.0)
            started = load.now()
            busy.set_window(started, float("inf"))
            storm = await load.bounded_gather(
                [timed_login(reactor, targets, node, name, login_times, users) for name in names],
                limit=len(names))
            ended = load.now()
            busy.set_window(started, ended)
        finally:
            stopping.append(True)
            await chat
        failed = sum(1 for ok in storm if not ok)
        busy_summary = busy.summary()
        ctx.record(NAME, "paxchat", f"chat of {chatters_n} clients during {len(names)} logins",
                   **busy_summary)
        logins = sorted(login_times)
        ctx.record(NAME, "paxchat", f"{len(names)} concurrent logins at bcrypt cost 12",
                   storm_s=round(ended - started, 2), failed=failed,
                   login_p50_ms=_ms(stats.percentile(logins, 0.5)),
                   login_p99_ms=_ms(stats.percentile(logins, 0.99)),
                   chat_p99_vs_quiet=stats.times(busy_summary["p99_ms"], quiet_summary["p99_ms"]))
    finally:
        population.close_all(users)
        cluster.stop()


async def timed_login(reactor, targets, node, name, times, users):
    user = load.PaxchatUser(reactor, targets, name, population.PASSWORD)
    users.append(user)
    sent = load.now()
    try:
        await user.connect(node)
        await load.request(reactor, user.proto, "login", timeout=120, username=name,
                           password=population.PASSWORD)
    except Exception:
        return False
    times.append(load.now() - sent)
    return True


def _ms(value):
    return None if value is None else round(value * 1000, 2)
