"""A follower that missed 20,000 writes catches up, through a snapshot once compaction passed it.

The heaviest process test: 20,000 small messages pipelined through several
connections while one follower is down, with ``snapshot_interval`` small so
the others compact their logs past the point the follower stopped at. After
its restart it must serve exactly what the others serve, and once every node
is stopped their chat states on disk must be equal key for key.
"""

import pytest_twisted
from twisted.internet import defer

from tests.cluster_support import (  # noqa: F401 (cluster_factory is a fixture)
    SINK, Load, check_exactly_once, cluster_factory, create_accounts, logged_in,
    requires_replicated_log, started, stored_on, wait_until, within)

pytestmark = requires_replicated_log

MESSAGES = 20_000
SENDERS = 8


@within(240)
@pytest_twisted.inlineCallbacks
def test_a_follower_back_after_20000_writes_catches_up_through_a_snapshot(cluster_factory):
    from twisted.internet import reactor
    cluster, leader = yield started(cluster_factory, snapshot_interval=1000)
    lagger = next(n for n in cluster.node_ids if n != leader)
    others = [n for n in cluster.node_ids if n != lagger]
    senders = [f"s{i}" for i in range(SENDERS)]
    yield create_accounts(cluster, SINK, *senders)
    yield stored_on(cluster, lagger)   # it has applied the accounts before it goes
    cluster.kill(lagger)

    clients = []
    for i, name in enumerate(senders):
        clients.append((yield logged_in(cluster, name, prefer=others[i % len(others)])))
    load = Load(reactor, clients, SINK, pipeline=6)
    began = reactor.seconds()
    yield load.run(MESSAGES).addTimeout(150, reactor)
    wrote = reactor.seconds() - began
    assert not load.errors, load.errors[:5]
    assert len(load.acked) == MESSAGES
    yield cluster.close_clients()

    restarted = reactor.seconds()
    cluster.start(lagger)
    yield cluster.wait_ready(lagger)
    # A read through the lagger waits for it to apply everything acknowledged: its
    # first full answer is the end of the catch-up.
    messages = yield wait_until(reactor, lambda: stored_on(cluster, lagger), 60,
                                f"node {lagger} to serve reads again")
    caught_up = reactor.seconds() - restarted
    check_exactly_once(messages, load.acked, f"node {lagger}")
    reference = yield stored_on(cluster, leader)
    assert messages == reference
    run = cluster.output(lagger).rsplit("===== start #", 1)[-1]
    restores = [line for line in run.splitlines() if "restoring the state from a snapshot" in line]
    print(f"\n{MESSAGES} sends in {wrote:.1f} s ({MESSAGES / wrote:.0f}/s) with node {lagger} down; "
          f"it served all of them {caught_up:.1f} s after its restart; {restores[:1]}")
    assert restores, f"node {lagger} caught up without a snapshot:\n{run[-3000:]}"

    # Stopped, every node holds the same chat state, key for key.
    yield cluster.check_equal_states()


@defer.inlineCallbacks
def compacted_past(cluster, nodes, index):
    """Whether every one of ``nodes`` has compacted its log beyond ``index``."""
    for n in nodes:
        gauges = yield cluster.gauges(n)
        if gauges.get("paxchat_snapshot_index", 0) <= index:
            return False
    return True


@within(150)
@pytest_twisted.inlineCallbacks
def test_a_follower_killed_while_it_restores_a_snapshot_still_catches_up(cluster_factory):
    """kill -9 the lagger three times just as it restores the snapshot, then the leader too."""
    from twisted.internet import reactor
    cluster, leader = yield started(cluster_factory, snapshot_interval=300)
    lagger = next(n for n in cluster.node_ids if n != leader)
    others = [n for n in cluster.node_ids if n != lagger]
    senders = [f"s{i}" for i in range(4)]
    yield create_accounts(cluster, SINK, *senders)
    yield stored_on(cluster, lagger)
    cluster.kill(lagger)
    clients = []
    for i, name in enumerate(senders):
        clients.append((yield logged_in(cluster, name, prefer=others[i % len(others)])))
    load = Load(reactor, clients, SINK, pipeline=6)
    yield load.run(3000).addTimeout(100, reactor)
    assert not load.errors, load.errors[:5]

    running = load.run(100_000)      # writes go on meanwhile
    mark = "restoring the state from a snapshot"
    try:
        for _ in range(3):
            seen = cluster.output(lagger).count(mark)
            cluster.start(lagger)
            yield wait_until(reactor, lambda: cluster.output(lagger).count(mark) > seen, 30,
                             f"node {lagger} to start restoring a snapshot", interval=0.005)
            cluster.kill(lagger)
            # A small restore can finish before the kill lands: the node is then
            # only a little behind and would catch up from the log. Let the
            # others compact past what it holds, so that it needs a snapshot again.
            applied, _ = cluster.state_dump(lagger)
            yield wait_until(reactor, lambda: compacted_past(cluster, others, applied), 30,
                             f"nodes {others} to compact their logs past index {applied}")
        cluster.start(lagger)
        leader = yield cluster.wait_leader(among=others)
        cluster.kill(leader)
        yield cluster.start_and_wait(leader)
        yield cluster.wait_ready(lagger)
    finally:
        load.stop()
    yield running.addTimeout(60, reactor)
    assert not load.errors, load.errors[:5]
    yield cluster.wait_leader()
    messages = yield wait_until(reactor, lambda: stored_on(cluster, lagger), 60,
                                f"node {lagger} to serve reads again")
    check_exactly_once(messages, load.acked, f"node {lagger}")
    keys = yield cluster.check_equal_states()
    print(f"\n{len(load.acked)} sends acknowledged; node {lagger} killed 3 times while restoring, "
          f"leader {leader} killed once; {keys} equal keys on every node")


@within(150)
@pytest_twisted.inlineCallbacks
def test_a_follower_that_missed_most_of_the_state_gets_a_snapshot_though_the_log_has_it(
        cluster_factory):
    """No compaction: the log still holds every write, but installing the state costs less."""
    from twisted.internet import reactor
    cluster, leader = yield started(cluster_factory, snapshot_interval=10 ** 6)
    lagger = next(n for n in cluster.node_ids if n != leader)
    senders = ["s0", "s1"]
    yield create_accounts(cluster, SINK, *senders)
    yield stored_on(cluster, lagger)
    cluster.kill(lagger)
    clients = []
    for name in senders:
        clients.append((yield logged_in(cluster, name, prefer=leader)))
    load = Load(reactor, clients, SINK, pipeline=1)     # about one write per slot: > 256 slots
    yield load.run(1500).addTimeout(100, reactor)
    assert not load.errors, load.errors[:5]
    yield cluster.close_clients()

    cluster.start(lagger)
    yield cluster.wait_ready(lagger)
    messages = yield wait_until(reactor, lambda: stored_on(cluster, lagger), 60,
                                f"node {lagger} to serve reads again")
    check_exactly_once(messages, load.acked, f"node {lagger}")
    assert messages == (yield stored_on(cluster, leader))
    run = cluster.output(lagger).rsplit("===== start #", 1)[-1]
    assert "restoring the state from a snapshot" in run, run[-3000:]
    assert "compacted its log" not in cluster.output(leader)
    yield cluster.check_equal_states()
