"""Benchmark 3: a follower down for N writes rejoins; how long until it is current.

One follower is killed (SIGKILL), N writes are committed by the other two,
then a marker write. The follower is restarted; "current" is the moment it
can answer a read that includes the marker:

- paxchat: ``history(limit=1)`` on a connection to the follower returns
  the marker message (reads are linearizable, so the follower answers only
  once it has applied up to the leader's commit index).
- etcd: a serializable (local) range read of the marker key on the member
  finds it.

Both are timed from the restart, so process start-up is included; paxchat
also reports the part after its node started serving clients.
"""

from __future__ import annotations

from paxchat.client.errors import ServerError

from . import load, population, procs, stats
from .etcd_cluster import EtcdCluster
from .paxchat_cluster import PaxchatCluster

NAME = "catchup"
WRITERS = 64


def sizes(tiny):
    return [100, 400] if tiny else [20_000, 200_000]


async def run(reactor, ctx):
    counts = sizes(ctx.tiny)
    ours = await run_paxchat(reactor, ctx, counts) if ctx.with_paxchat else {}
    if not ctx.with_etcd:
        ctx.skip_etcd(NAME)
        return
    theirs = await run_etcd(reactor, ctx, counts)
    for count in counts:
        if ours.get(count) and theirs.get(count):
            (our_time, our_peak), (their_time, their_peak) = ours[count], theirs[count]
            ctx.compare(NAME, f"{count} writes behind",
                        time=stats.ratio(our_time, their_time, higher_is_better=False),
                        peak_rss=stats.ratio(our_peak, their_peak, higher_is_better=False))


async def write_n(reactor, writers, count, timeout):
    """Committed writes until ``count`` succeeded (a few more may land as the loops stop)."""
    recorder = stats.Recorder()
    started = load.now()
    await load.start_clients(
        writers, recorder, lambda: recorder.total_ok >= count or load.now() - started > timeout)
    if recorder.total_ok < count:
        raise TimeoutError(f"only {recorder.total_ok} of {count} writes in {timeout:g}s "
                           f"(errors {recorder.errors})")
    return recorder.total_ok, load.now() - started


def _mib(size):
    """Bytes as MiB with one decimal, or None when unknown."""
    return round(size / 2**20, 1) if size else None


class _CatchupMemory:
    """Peak RSS over a catch-up: the rejoining node's, and the others' (their
    peaks start again at the restart, and what they grew by above it)."""

    def __init__(self, pid, follower, others):
        self._pid, self.follower, self._others = pid, follower, others
        self._before = {n: procs.rss_bytes(pid(n)) for n in others}
        for n in others:
            procs.reset_peak_rss(pid(n))

    def figures(self):
        """``(the follower's peak in bytes, figures to record)``, read now."""
        peaks = {n: procs.rss_bytes(self._pid(n), "VmHWM") for n in [self.follower, *self._others]}
        grown = [peaks[n] - self._before[n] for n in self._others if peaks[n] and self._before[n]]
        return peaks[self.follower], {
            "peak_rss_mib": _mib(peaks[self.follower]),
            "others_peak_rss_mib": _mib(max((peaks[n] or 0 for n in self._others), default=0)),
            "others_growth_mib": _mib(max(grown)) if grown else None}


def pick_follower(node_ids, leader):
    return next(n for n in reversed(node_ids) if n != leader)


async def run_paxchat(reactor, ctx, counts):
    cluster = PaxchatCluster(reactor, ctx.workdir("catchup-paxchat"), bcrypt_cost=4)
    users = []
    results = {}
    try:
        targets, node_ids, leader, replicated = await load.start_cluster(reactor, cluster)
        if not replicated:
            ctx.say(f"[{NAME}] paxchat skipped: the nodes are independent single-node servers "
                    "(no replicated log), a follower has nothing to catch up on")
            return results
        sinks = await population.make_sinks(reactor, targets, node_ids)
        users = await population.logged_in_users(reactor, targets, [leader] * WRITERS, "c")
        probe = (await population.logged_in_users(reactor, targets, [leader], "cprobe"))[0]
        users.append(probe)
        writers = population.writers(users[:WRITERS], sinks, [leader])
        for count in counts:
            follower = pick_follower(node_ids, leader)
            cluster.kill(follower)
            written, took = await write_n(reactor, writers, count, timeout=max(120, count / 50))
            marker = await load.request(reactor, probe.proto, "send_message", to=sinks[0],
                                        body="marker")
            memory = _CatchupMemory(cluster.pid, follower,
                                    [n for n in node_ids if n != follower and cluster.alive(n)])
            restarted = load.now()
            cluster.restart(follower)
            await cluster.wait_ready([follower], timeout=300)
            serving = load.now()
            current = await wait_current_paxchat(reactor, targets, follower, probe.session,
                                                 marker["message_id"], timeout=max(120, count / 100))
            peak, figures = memory.figures()
            results[count] = (current - restarted, peak)
            ctx.record(NAME, "paxchat", f"{count} writes behind",
                       current_s=round(current - restarted, 3),
                       after_serving_s=round(current - serving, 3),
                       written=written, write_s=round(took, 1), node=follower, **figures)
            leader, _ = await load.wait_for_leader(reactor, targets, node_ids)
            writers = population.writers(users[:WRITERS], sinks, [leader])
            for writer in writers:
                if writer.user.node != leader:
                    await writer.user.connect(leader)
                    await writer.user.resume()
            if probe.node != leader:
                await probe.connect(leader)
                await probe.resume()
        return results
    finally:
        population.close_all(users)
        cluster.stop()


async def wait_current_paxchat(reactor, targets, node_id, session, marker_id, timeout):
    """When ``node_id`` first answers a read that includes message ``marker_id``."""
    deadline = load.now() + timeout
    proto = None
    resumed = False
    try:
        while load.now() < deadline:
            try:
                if proto is None or proto.lost:
                    proto, resumed = await targets.connect(node_id), False
                if not resumed:
                    await load.request(reactor, proto, "resume", session=session)
                    resumed = True
                page = await load.request(reactor, proto, "history", limit=1)
                if page["messages"] and page["messages"][0]["id"] >= marker_id:
                    return load.now()
            except ServerError as e:
                if e.code == "not_logged_in":
                    resumed = False
                elif e.code in ("unavailable", "rate_limited"):
                    await load.sleep(reactor, 0.1)
                else:
                    raise
            except Exception:
                if proto is not None:
                    proto.abort()
                proto = None
            await load.sleep(reactor, 0.005)
        raise TimeoutError(f"node {node_id} did not catch up in {timeout:g}s")
    finally:
        if proto is not None:
            proto.abort()


async def run_etcd(reactor, ctx, counts):
    cluster = EtcdCluster(reactor, ctx.workdir("catchup-etcd"), ctx.etcd_binary)
    writers = []
    results = {}
    try:
        await cluster.start()
        members = cluster.member_ids
        for count in counts:
            leader = await cluster.leader()
            population.close_etcd(writers)
            writers = await population.etcd_writers(reactor, cluster, [leader] * WRITERS, f"c{count}-")
            follower = pick_follower(members, leader)
            cluster.kill(follower)
            written, took = await write_n(reactor, writers, count, timeout=max(120, count / 50))
            marker_key = load.b64(f"marker/{count}".encode())
            proto = await load.http_connect(reactor, *cluster.address(leader))
            try:
                await load.etcd_call(reactor, proto, "/v3/kv/put",
                                     {"key": marker_key, "value": load.VALUE})
            finally:
                proto.transport.abortConnection()
            memory = _CatchupMemory(cluster.pid, follower, [n for n in members if n != follower])
            restarted = load.now()
            cluster.restart(follower)
            current = await wait_current_etcd(reactor, cluster, follower, marker_key,
                                              timeout=max(120, count / 100))
            peak, figures = memory.figures()
            results[count] = (current - restarted, peak)
            ctx.record(NAME, "etcd", f"{count} writes behind",
                       current_s=round(current - restarted, 3), written=written,
                       write_s=round(took, 1), member=follower, **figures)
            await cluster.wait_ready(members)
        return results
    finally:
        population.close_etcd(writers)
        cluster.stop()


async def wait_current_etcd(reactor, cluster, member, key, timeout):
    deadline = load.now() + timeout
    proto = None
    try:
        while load.now() < deadline:
            try:
                if proto is None or proto.lost:
                    proto = await load.http_connect(reactor, *cluster.address(member))
                answer = await load.etcd_call(reactor, proto, "/v3/kv/range",
                                              {"key": key, "serializable": True}, timeout=5)
                if int(answer.get("count", 0)) >= 1:
                    return load.now()
            except Exception:
                if proto is not None and not proto.lost:
                    proto.transport.abortConnection()
                proto = None
            await load.sleep(reactor, 0.005)
        raise TimeoutError(f"etcd member {member} did not catch up in {timeout:g}s")
    finally:
        if proto is not None and not proto.lost:
            proto.transport.abortConnection()
