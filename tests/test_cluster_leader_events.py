"""``leader`` events between processes: a client on a follower hears its node's
view of the leader change when the leader is killed -9, without asking."""

import pytest_twisted
from twisted.internet import defer

from paxchat.client import Status
from paxchat.client.connection import ChatClientFactory
from tests.cluster_support import (  # noqa: F401 (cluster_factory is a fixture)
    cluster_factory, requires_replicated_log, started, wait_until, within)

pytestmark = requires_replicated_log

# The nodes' election timeout is 0.5-1 s (cluster_support.DEFAULT_KEYS): the
# follower's view changes within about that after the kill, an election takes
# a few round trips more, and the event comes 0.1 s later. Bounded generously
# for a busy 2-core machine.
TOLD_WITHIN = 6.0


def reactor_():
    from twisted.internet import reactor
    return reactor


@within(90)
@pytest_twisted.inlineCallbacks
def test_a_client_on_a_follower_is_told_the_leader_died_and_who_leads_next(cluster_factory):
    reactor = reactor_()
    cluster, leader = yield started(cluster_factory)
    follower = next(n for n in cluster.node_ids if n != leader)
    statuses, events = [], []
    client = cluster.client(only=follower, on_status=statuses.append, on_event=events.append)
    hello = yield client.connect()
    assert hello["leader"] == leader and hello["leader_events"] is True and client.leader_pushed
    # A connection that did not ask, on the same node: hears nothing of it.
    plain = yield cluster.target(follower).endpoint.connect(ChatClientFactory())
    try:
        plain_events = []
        plain.on_event = plain_events.append
        answer = yield plain.request("hello")
        assert answer["leader"] == leader and "leader_events" not in answer
        yield _kill_and_follow(reactor, cluster, leader, follower, client, statuses, events)
        assert not [e for e in plain_events if e.get("event") == "leader"]
    finally:
        plain.abort()


@defer.inlineCallbacks
def _kill_and_follow(reactor, cluster, leader, follower, client, statuses, events):
    cluster.kill(leader)                                 # kill -9, reaped
    killed_at = reactor.seconds()
    told = lambda: [e["leader"] for e in events if e.get("event") == "leader"]  # noqa: E731
    yield wait_until(reactor, lambda: told() and told()[-1] not in (None, leader), TOLD_WITHIN,
                     "the follower's client to be told of a new leader")
    took = reactor.seconds() - killed_at
    new_leader = told()[-1]
    print(f"\nleader {leader} killed; node {follower}'s client was told {told()} within {took:.2f} s")
    # None while the follower ran for election (unless another node won first), then the winner,
    # each value once: never the dead leader.
    assert set(told()[:-1]) <= {None} and len(told()) <= 2
    assert statuses[-1] == Status("connected", follower, new_leader) and client.leader == new_leader
    agreed = yield cluster.wait_leader()
    assert agreed == new_leader
    # Told on the connection it opened first: no reconnect, no hello but the first.
    assert client.node == follower and [s.state for s in statuses].count("connecting") == 1
    assert "reconnecting" not in [s.state for s in statuses]
