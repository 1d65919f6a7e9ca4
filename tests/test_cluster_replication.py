"""The replicated cluster as processes: real twistd nodes on 127.0.0.1 with TLS, killed -9.

Each test starts its own cluster (tests/cluster_support.py), brings it to
the fault it is about, and checks the promises of the protocol: pushes cross
nodes, an acknowledged write survives any minority crash and is stored once,
writes resume quickly after the leader dies, a minority answers
``unavailable`` rather than stale data, peers must show the cluster CA.
Timings worth knowing (failover, push latency) are printed (``pytest -s``).
"""

import itertools
import random
import time

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, ssl
from twisted.internet.endpoints import SSL4ClientEndpoint

from paxchat import tls
from paxchat.client import ServerError
from paxchat.client.failover import FailoverPolicy
from tests.cluster_support import (  # noqa: F401 (cluster_factory is a fixture)
    SINK, Cluster, Load, Probes, check_every_node, cluster_factory, create_accounts, fast_policy,
    logged_in, requires_replicated_log, started, stored_on, unread_bytes_at, wait_until, within)

pytestmark = requires_replicated_log


def reactor_():
    from twisted.internet import reactor
    return reactor


# -- (a) ------------------------------------------------------------------------

@within(90)
@pytest_twisted.inlineCallbacks
def test_a_message_sent_through_node_1_is_pushed_on_node_3(cluster_factory):
    reactor = reactor_()
    cluster, _ = yield started(cluster_factory)
    yield create_accounts(cluster, "alice", "bob")
    alice_events, bob_events, elsewhere_events = [], [], []
    alice = yield logged_in(cluster, "alice", only=1, on_event=alice_events.append)
    bob = yield logged_in(cluster, "bob", only=3, on_event=bob_events.append)
    alice_elsewhere = yield logged_in(cluster, "alice", only=2, on_event=elsewhere_events.append)
    assert (alice.node, bob.node, alice_elsewhere.node) == (1, 3, 2)

    sent_at = reactor.seconds()
    sent = yield alice.send_message("bob", "hi bob, from node 1")
    pushed = yield wait_until(reactor, lambda: [e for e in bob_events if e.get("event") == "message"],
                              5, "the push on node 3")
    latency = reactor.seconds() - sent_at
    message = pushed[0]["message"]
    assert (message["id"], message["from"], message["to"], message["body"]) == (
        sent["message_id"], "alice", "bob", "hi bob, from node 1")
    # Stamped with the time of day, though the node's timers run on monotonic time.
    assert abs(message["ts"] - time.time()) < 60
    # Alice's other session, on node 2, is told what she sent.
    told = yield wait_until(reactor, lambda: [e for e in elsewhere_events if e.get("event") == "sent"],
                            5, "the sent event on node 2")
    assert told[0]["message"] == message

    reply = yield bob.send_message("alice", "hello alice, from node 3")
    pushed = yield wait_until(reactor, lambda: [e for e in alice_events if e.get("event") == "message"],
                              5, "the push on node 1")
    assert pushed[0]["message"]["id"] == reply["message_id"]
    history = yield bob.history(peer="alice")
    assert [m["body"] for m in history["messages"]] == ["hello alice, from node 3", "hi bob, from node 1"]
    # Her first session heard only Bob's message; the second, that message too.
    yield wait_until(reactor, lambda: len(elsewhere_events) == 2, 5, "bob's message on node 2")
    assert [e["event"] for e in alice_events] == ["message"]
    assert [e["event"] for e in elsewhere_events] == ["sent", "message"]
    # Alice deletes Bob's reply: it goes from his session on node 3 and her other one on node 2.
    assert (yield alice.delete_messages([reply["message_id"]])) == {"deleted": 1}
    # Each hears it with its own unread count: bob has not read hers yet.
    gone = {"event": "deleted", "ids": [reply["message_id"]]}
    yield wait_until(reactor, lambda: {**gone, "unread": 1} in bob_events
                     and {**gone, "unread": 0} in elsewhere_events, 5,
                     "the deleted event on nodes 2 and 3")
    assert not [e for e in alice_events if e["event"] == "deleted"]
    # Bob reads her first message on node 3: both her sessions hear it was read.
    assert (yield bob.mark_read([sent["message_id"]])) == {"marked": 1}
    seen = {"event": "seen", "ids": [sent["message_id"]]}
    yield wait_until(reactor, lambda: seen in alice_events and seen in elsewhere_events, 5,
                     "the seen event on nodes 1 and 2")
    print(f"\npush latency node 1 -> node 3: {latency * 1000:.0f} ms (send to push)")


# -- (b) ------------------------------------------------------------------------

@within(150)
@pytest_twisted.inlineCallbacks
def test_killing_the_leader_under_load_loses_nothing_and_writes_resume_within_2s(cluster_factory):
    reactor = reactor_()
    cluster, leader = yield started(cluster_factory)
    followers = [n for n in cluster.node_ids if n != leader]
    senders = ["s1", "s2", "s3", "s4"]
    yield create_accounts(cluster, SINK, "probe", *senders)
    homes = [leader, followers[0], followers[1], leader]
    clients = []
    for name, home in zip(senders, homes):
        clients.append((yield logged_in(cluster, name, prefer=home)))
    probes = []
    for node_id in followers:
        probes.append((yield logged_in(cluster, "probe", only=node_id)))

    load = Load(reactor, clients, SINK, pipeline=4)
    running = load.run(1200)
    yield wait_until(reactor, lambda: len(load.acked) >= 300 or running.called, 60, "300 acknowledged sends")
    assert not running.called, "the load ended before the kill"
    killed_at = reactor.seconds()
    cluster.kill(leader)

    probe = Probes(reactor, probes)
    first = yield probe.until_acked(timeout=15)
    resumed = first - killed_at
    yield running.addTimeout(90, reactor)
    yield probe.settled()
    new_leader = yield cluster.wait_leader()
    before_kill = len(load.acked) - len(load.acked_after(killed_at))

    print(f"\nleader {leader} killed after {before_kill} acks; new leader "
          f"{new_leader}; first write issued after the kill acknowledged {resumed * 1000:.0f} ms after it; "
          f"the load's first send issued after it acknowledged at "
          f"{(load.first_ack_of_a_send_issued_after(killed_at) - killed_at) * 1000:.0f} ms; "
          f"{len(load.acked)} sends acknowledged, {len(load.errors)} errors")
    assert not load.errors, load.errors[:5]
    assert len(load.acked) == 1200
    acked = {**load.acked, **probe.acked}
    yield check_every_node(cluster, followers, acked)
    assert new_leader in followers
    assert resumed < 2.0, f"writes resumed {resumed:.2f} s after the leader was killed"

    # The old leader comes back, drops whatever it alone had accepted, and agrees.
    yield cluster.start_and_wait(leader)
    yield check_every_node(cluster, cluster.node_ids, acked)
    yield cluster.check_equal_states()


# -- (d) ------------------------------------------------------------------------

@within(120)
@pytest.mark.parametrize("nodes,survivor_role", [(3, "leader"), (5, "follower")])
@pytest_twisted.inlineCallbacks
def test_a_minority_answers_unavailable_and_loses_nothing(cluster_factory, nodes, survivor_role):
    """Kill a majority (2 of 3, 3 of 5); the survivors answer `unavailable`, not old data."""
    reactor = reactor_()
    cluster, leader = yield started(cluster_factory, nodes, request_timeout=2.0)
    timeout = cluster.config.request_timeout
    yield create_accounts(cluster, SINK, "writer")
    followers = [n for n in cluster.node_ids if n != leader]
    survivors = ([leader] if survivor_role == "leader" else []) + followers
    survivors = survivors[:nodes - cluster.config.quorum]
    survivor = survivors[0]
    # Pinned to the survivor, no automatic retry of `unavailable`: we want to see it.
    writer = yield logged_in(cluster, "writer", only=survivor,
                             policy=fast_policy(unavailable_window=0, answer_timeout=timeout + 8))
    sink = yield logged_in(cluster, SINK, only=survivor,
                           policy=fast_policy(unavailable_window=0, answer_timeout=timeout + 8))
    load = Load(reactor, [writer], SINK, pipeline=4)
    yield load.run(100).addTimeout(30, reactor)
    assert not load.errors and len(load.acked) == 100

    cluster.kill(*[n for n in cluster.node_ids if n not in survivors])
    bound = timeout + 2.0
    began = reactor.seconds()
    with pytest.raises(ServerError) as e:
        yield writer.send_message(SINK, "lost", client_msg_id="lost").addTimeout(bound, reactor)
    assert e.value.code == "unavailable"
    write_took = reactor.seconds() - began
    # By now a surviving leader's lease has run out (it may serve reads during its lease,
    # when no other leader can exist): the read must not be served from what it has.
    assert write_took > cluster.config.lease_duration
    began = reactor.seconds()
    with pytest.raises(ServerError) as e:
        yield sink.history(limit=5).addTimeout(bound, reactor)
    assert e.value.code == "unavailable", "a minority served a read"
    read_took = reactor.seconds() - began
    print(f"\n{nodes} nodes, survivors {survivors}, asked {survivor} ({survivor_role}): write unavailable after {write_took:.2f} s, "
          f"read unavailable after {read_took:.2f} s")
    hello = yield cluster.hello(survivor)
    assert hello["node"] == survivor

    cluster.start(*[n for n in cluster.node_ids if n not in survivors])
    yield cluster.wait_ready()
    yield cluster.wait_leader()
    # Retried with the same client_msg_id it is stored once, whether or not the first try got in.
    retried = yield writer.send_message(SINK, "lost", client_msg_id="lost").addTimeout(30, reactor)
    load.acked["lost"] = retried
    yield check_every_node(cluster, cluster.node_ids, load.acked)


# -- (e) ------------------------------------------------------------------------

class _Recorder(protocol.Protocol):
    def __init__(self):
        self.received = b""
        self.lost = defer.Deferred()
        self.local_port = None

    def connectionMade(self):
        self.local_port = self.transport.getHost().port

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.why = reason.getErrorMessage()
        self.lost.callback(None)


@within(90)
@pytest_twisted.inlineCallbacks
def test_a_peer_without_a_cluster_certificate_is_refused_and_logged(cluster_factory, tmp_path):
    reactor = reactor_()
    cluster, leader = yield started(cluster_factory)
    target = 1
    peer = cluster.config.node(target).peer
    ca = tls.load_ca(cluster.config)
    foreign = Cluster(reactor, tmp_path / "foreign", nodes=3)  # its own CA, never started
    attempts = {
        "a certificate from another CA": tls.load_node_certificate(foreign.config, 2),
        "no certificate": None,
        "the node's own certificate": tls.load_node_certificate(cluster.config, target),
    }
    for what, certificate in attempts.items():
        extra = {"clientCertificate": certificate} if certificate is not None else {}
        options = ssl.optionsForClientTLS(tls.node_name(target), trustRoot=ca, **extra)
        recorder = _Recorder()
        endpoint = SSL4ClientEndpoint(reactor, peer.host, peer.port, options, timeout=5)
        yield endpoint.connect(protocol.Factory.forProtocol(lambda: recorder))
        recorder.transport.write(b"\x00\x00\x00\x00")  # a keepalive frame, if it ever got that far
        yield recorder.lost.addTimeout(10, reactor)
        assert recorder.received == b"", f"{what}: the node sent peer traffic"
        port = recorder.local_port
        lines = yield wait_until(
            reactor, lambda: [line for line in cluster.output(target).splitlines()
                              if "peer connection inbound" in line
                              and (f"port={port}" in line or f":{port}" in line)],
            5, f"node {target} to log the refused connection with {what}")
        print(f"\n{what}: closed ({recorder.why}); node {target} logged: {lines[0]}")

    # The cluster still serves, with the same leader.
    yield create_accounts(cluster, SINK, "after")
    client = yield logged_in(cluster, "after")
    yield client.send_message(SINK, "still here")
    still = yield cluster.wait_leader()
    assert still == leader


# -- (f) ------------------------------------------------------------------------

@within(120)
@pytest_twisted.inlineCallbacks
def test_restarting_every_node_at_once_keeps_everything_acknowledged(cluster_factory):
    """Twice, mid-load: kill -9 every node, start them all. Compaction runs often meanwhile."""
    reactor = reactor_()
    cluster, leader = yield started(cluster_factory, snapshot_interval=100)
    senders = ["s1", "s2", "s3"]
    yield create_accounts(cluster, SINK, *senders)
    acked = {}
    for round_ in range(2):
        clients = []
        for name, home in zip(senders, cluster.node_ids):
            clients.append((yield logged_in(cluster, name, prefer=home)))
        load = Load(reactor, clients, SINK, pipeline=4, prefix=f"round{round_}")
        running = load.run(100_000)
        yield wait_until(reactor, lambda: len(load.acked) >= 400 + 77 * round_, 60,
                         "400 acknowledged sends")
        cluster.kill_all()
        load.stop()
        yield cluster.close_clients()
        yield running.addTimeout(30, reactor)
        acked.update(load.acked)

        began = reactor.seconds()
        yield cluster.start_and_wait()
        new_leader = yield cluster.wait_leader()
        back = reactor.seconds() - began
        print(f"\n{len(acked)} sends acknowledged before kill -9 of all; cluster back with leader "
              f"{new_leader} {back:.1f} s after the restart")
        yield check_every_node(cluster, cluster.node_ids, acked)
    client = yield logged_in(cluster, "s1")
    yield client.send_message(SINK, "after the restarts")
    yield cluster.check_equal_states()


# -- (g) ------------------------------------------------------------------------

def newest_segment(cluster, node_id):
    segments = sorted(cluster.data_dir(node_id).rglob("wal-*.log"))
    assert segments, f"no paxos log segment under {cluster.data_dir(node_id)}"
    return segments[-1]


@within(120)
@pytest_twisted.inlineCallbacks
def test_a_node_with_a_torn_last_record_restarts_and_catches_up(cluster_factory):
    reactor = reactor_()
    cluster, leader = yield started(cluster_factory)
    victim = next(n for n in cluster.node_ids if n != leader)
    yield create_accounts(cluster, SINK, "writer")
    writer = yield logged_in(cluster, "writer", prefer=leader)
    load = Load(reactor, [writer], SINK, pipeline=8)
    yield load.run(300).addTimeout(60, reactor)
    # Make sure the victim has written records of its own before it dies.
    yield stored_on(cluster, victim)

    cluster.kill(victim)
    segment = newest_segment(cluster, victim)
    size = segment.stat().st_size
    with open(segment, "r+b") as f:
        f.truncate(size - 5)
    yield load.run(300).addTimeout(60, reactor)    # the victim misses these

    began = reactor.seconds()
    yield cluster.start_and_wait(victim)
    yield wait_until(reactor, lambda: "cut a torn tail" in cluster.output(victim), 10,
                     "the victim to log the torn tail it cut")
    yield cluster.wait_leader()
    assert not load.errors, load.errors[:5]
    assert len(load.acked) == 600
    yield check_every_node(cluster, [victim] + [n for n in cluster.node_ids if n != victim], load.acked)
    print(f"\n{segment.name} cut from {size} to {size - 5} bytes; node {victim} rejoined and served "
          f"all {len(load.acked)} messages {reactor.seconds() - began:.1f} s after its restart")
    yield cluster.check_equal_states()


# -- a leader that stalls ----------------------------------------------------------

@within(90)
@pytest_twisted.inlineCallbacks
def test_a_leader_frozen_while_the_others_move_on_serves_no_stale_read(cluster_factory):
    """SIGSTOP the leader, write through a new one, SIGCONT: its first read must see that write."""
    reactor = reactor_()
    cluster, leader = yield started(cluster_factory)
    others = [n for n in cluster.node_ids if n != leader]
    yield create_accounts(cluster, SINK, "writer")
    reader = yield logged_in(cluster, SINK, only=leader, policy=fast_policy(unavailable_window=0))
    writer = yield logged_in(cluster, "writer", only=others[0])
    before = yield writer.send_message(SINK, "before the stall", client_msg_id="before the stall")
    seen = yield reader.history()
    assert [m["body"] for m in seen["messages"]] == ["before the stall"]

    cluster.pause(leader)
    try:
        new_leader = yield cluster.wait_leader(among=others)
        written = yield writer.send_message(SINK, "during the stall", client_msg_id="during the stall")
        # The read waits in the frozen node's socket when it wakes: it may answer from
        # its old lease only while that lease is valid, and it no longer is.
        port = cluster.config.node(leader).client.port
        reading = reader.history()
        yield wait_until(reactor, lambda: unread_bytes_at(port) > 0, 5,
                         "the read to reach the frozen node's socket")
    finally:
        cluster.unpause(leader)
    try:
        seen = yield reading.addTimeout(15, reactor)
    except ServerError as e:
        print(f"\nthe woken leader answered the read with {e.code}")
        assert e.code in ("unavailable", "not_logged_in"), e
    else:
        bodies = [m["body"] for m in seen["messages"]]
        print(f"\nthe woken leader {leader} (replaced by {new_leader}) answered the read with {bodies}")
        assert written["message_id"] in [m["id"] for m in seen["messages"]], (
            f"stale read from the woken leader: {bodies}")
    yield cluster.wait_leader()
    yield check_every_node(cluster, cluster.node_ids, {
        "before the stall": before, "during the stall": written})


@within(90)
@pytest_twisted.inlineCallbacks
def test_leaders_frozen_under_load_step_aside_and_lose_nothing(cluster_factory):
    """Twice: SIGSTOP the leader (clients attached), write on through a new one, SIGCONT."""
    reactor = reactor_()
    cluster, leader = yield started(cluster_factory)
    others = [n for n in cluster.node_ids if n != leader]
    senders = ["s1", "s2", "s3", "s4"]
    yield create_accounts(cluster, SINK, *senders)
    clients = []
    for name, home in zip(senders, [leader, leader] + others):
        clients.append((yield logged_in(cluster, name, prefer=home)))
    load = Load(reactor, clients, SINK, pipeline=6)
    running = load.run(100_000)
    rounds = []
    try:
        for round_ in range(2):
            leader = yield cluster.wait_leader()
            target = len(load.acked) + 300
            yield wait_until(reactor, lambda: len(load.acked) >= target or running.called, 30,
                             f"300 more acknowledged sends before round {round_}")
            cluster.pause(leader)
            try:
                frozen_at = reactor.seconds()
                new_leader = yield cluster.wait_leader(among=[n for n in cluster.node_ids if n != leader])
                elected = reactor.seconds() - frozen_at
                target = len(load.acked) + 300
                yield wait_until(reactor, lambda: len(load.acked) >= target or running.called, 30,
                                 f"300 acknowledged sends while node {leader} is frozen")
            finally:
                cluster.unpause(leader)
            rounds.append((leader, new_leader, elected))
    finally:
        load.stop()
    yield running.addTimeout(60, reactor)
    print("\nrounds (frozen leader, new leader, seconds to agree on it): "
          + ", ".join(f"({a}, {b}, {s:.1f})" for a, b, s in rounds)
          + f"; {len(load.acked)} acknowledged")
    assert not load.errors, load.errors[:5]
    yield cluster.wait_leader()
    yield check_every_node(cluster, cluster.node_ids, load.acked)
    yield cluster.check_equal_states()


# -- client failover --------------------------------------------------------------

@within(120)
@pytest_twisted.inlineCallbacks
def test_clients_on_the_killed_leader_fail_over_without_an_error(cluster_factory):
    """Ten PaxchatClients with the library's default failover policy, all on the leader."""
    reactor = reactor_()
    cluster, leader = yield started(cluster_factory)
    names = [f"u{i}" for i in range(10)]
    yield create_accounts(cluster, SINK, *names)
    statuses = []
    clients = []
    for name in names:
        clients.append((yield logged_in(cluster, name, prefer=leader, policy=FailoverPolicy(),
                                        on_status=statuses.append if not clients else None)))
    assert {c.node for c in clients} == {leader}
    sessions = [c.session for c in clients]

    load = Load(reactor, clients, SINK, pipeline=2)
    running = load.run(800)
    yield wait_until(reactor, lambda: len(load.acked) >= 200 or running.called, 30, "200 acknowledged sends")
    assert not running.called
    killed_at = reactor.seconds()
    cluster.kill(leader)
    yield running.addTimeout(60, reactor)

    states = [(s.state, s.node) for s in statuses]
    assert not load.errors, f"errors reached the callers: {load.errors[:5]}"
    assert len(load.acked) == 800
    assert ("reconnecting", None) in states and states[-1][0] == "connected"
    assert all(c.connected and c.node != leader for c in clients)
    assert [c.session for c in clients] == sessions, "a session was not resumed"
    gap = load.first_ack_of_a_send_issued_after(killed_at) - killed_at
    print(f"\n10 clients on leader {leader} moved to nodes {sorted(c.node for c in clients)}; the first "
          f"send issued after the kill was acknowledged {gap * 1000:.0f} ms after it; one client's "
          f"statuses: {states}")
    survivors = [n for n in cluster.node_ids if n != leader]
    yield check_every_node(cluster, survivors, load.acked)


# -- rolling crashes ----------------------------------------------------------------

@within(150)
@pytest_twisted.inlineCallbacks
def test_rolling_kill_9_of_leaders_and_followers_under_load(cluster_factory):
    """Four rounds: kill -9 a node (the leader every other round), write on, restart it."""
    reactor = reactor_()
    cluster, leader = yield started(cluster_factory, snapshot_interval=500)
    senders = ["s1", "s2", "s3", "s4"]
    yield create_accounts(cluster, SINK, *senders)
    clients = []
    for name, home in zip(senders, itertools.cycle(cluster.node_ids)):
        clients.append((yield logged_in(cluster, name, prefer=home)))
    load = Load(reactor, clients, SINK, pipeline=4)
    running = load.run(100_000)
    rng = random.Random(7)
    timeline = []
    try:
        for round_ in range(4):
            leader = yield cluster.wait_leader()
            victim = leader if round_ % 2 == 0 else rng.choice([n for n in cluster.node_ids if n != leader])
            target = len(load.acked) + 200
            yield wait_until(reactor, lambda: len(load.acked) >= target or running.called, 30,
                             f"200 more acknowledged sends before round {round_}")
            killed_at = reactor.seconds()
            cluster.kill(victim)
            target = len(load.acked) + 200
            yield wait_until(reactor, lambda: len(load.acked) >= target or running.called, 30,
                             f"200 acknowledged sends with node {victim} down")
            timeline.append((victim, victim == leader, reactor.seconds() - killed_at))
            yield cluster.start_and_wait(victim)
    finally:
        load.stop()
    yield running.addTimeout(60, reactor)
    print("\nrounds (node killed, was leader, seconds until 200 more acks): "
          + ", ".join(f"({v}, {was}, {s:.1f})" for v, was, s in timeline)
          + f"; {len(load.acked)} acknowledged, {len(load.errors)} errors")
    assert not load.errors, load.errors[:5]
    yield cluster.wait_leader()
    yield check_every_node(cluster, cluster.node_ids, load.acked)
    yield cluster.check_equal_states()


# -- linearizable reads through other nodes ---------------------------------------------

@within(90)
@pytest_twisted.inlineCallbacks
def test_a_write_acknowledged_on_one_node_is_read_at_once_on_every_other(cluster_factory):
    """Send through one node, then read through each other node: the write is always there."""
    reactor = reactor_()
    cluster, leader = yield started(cluster_factory)
    yield create_accounts(cluster, SINK, "writer", "noise")
    writers = {}
    for n in cluster.node_ids:
        writers[n] = yield logged_in(cluster, "writer", only=n)
    readers = {}
    for n in cluster.node_ids:
        readers[n] = yield logged_in(cluster, SINK, only=n)
    noise = yield logged_in(cluster, "noise")
    background = Load(reactor, [noise], SINK, pipeline=8)
    running = background.run(100_000)
    try:
        for i in range(30):
            via = cluster.node_ids[i % len(cluster.node_ids)]
            sent = yield writers[via].send_message(SINK, f"rw-{i}", client_msg_id=f"rw-{i}")
            for n, reader in readers.items():
                if n == via:
                    continue
                page = yield reader.history(peer="writer", limit=1)
                newest = page["messages"][0] if page["messages"] else None
                assert newest is not None and newest["id"] == sent["message_id"], (
                    f"read on node {n} after a write acknowledged on node {via} (leader {leader}) "
                    f"missed it: newest is {newest}")
    finally:
        background.stop()
    yield running.addTimeout(30, reactor)
    assert not background.errors, background.errors[:5]
    print(f"\n30 writes, each read back at once through the two other nodes, "
          f"{len(background.acked)} background sends meanwhile")
