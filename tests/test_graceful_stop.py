"""A planned stop (SIGTERM): turn clients away, pass leadership on, let writes finish; rolling restarts."""

import json

import pytest_twisted
from twisted.internet import defer, endpoints

from paxchat.locallog import LocalLog
from paxchat.node import NodeService
from tests.cluster_support import (HAS_REPLICATED_LOG, Load, all_history, cluster_factory,  # noqa: F401
                                   fast_policy, requires_replicated_log, wait_until, within)
from tests.ops_support import JSONLines, reactor_, write_ops_config


class SteppingLog(LocalLog):
    """A LocalLog that leads, steps down on request and has writes in flight for a while."""

    def __init__(self, node, events, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.node = node
        self.events = events
        self.leading = True
        self.in_flight = 2

    def leader_id(self):
        return self.node_id if self.leading else self.node_id + 1

    def step_down_gracefully(self):
        self.events.append(("step down", self.node.port is None))
        self.leading = False
        reactor_().callLater(0.05, self._finish_one)
        return defer.succeed(True)

    def _finish_one(self):
        self.in_flight -= 1
        self.events.append(("write answered", self.in_flight))
        if self.in_flight:
            reactor_().callLater(0.05, self._finish_one)

    def status(self):
        return {"pending_proposals": self.in_flight, "held_commands": 0}

    def stop(self):
        self.events.append(("log stopped", self.in_flight))
        return defer.succeed(None)


@pytest_twisted.inlineCallbacks
def test_a_leader_hands_over_and_drains_before_it_stops(tmp_path):
    cfg = write_ops_config(tmp_path, nodes=1, keys=(), client_tls="off", bcrypt_cost=4)
    events = []

    class Node(NodeService):
        def make_command_log(self, worker):
            return SteppingLog(self, events, self.reactor, worker, node_id=self.node_id)

    node = Node(cfg, 1, reactor_())
    node.startService()
    yield node.stopService()
    assert events == [("step down", True), ("write answered", 1), ("write answered", 0),
                      ("log stopped", 0)]


@pytest_twisted.inlineCallbacks
def test_draining_is_bounded_by_the_request_timeout(tmp_path):
    cfg = write_ops_config(tmp_path, nodes=1, keys=(), client_tls="off", bcrypt_cost=4,
                           request_timeout=0.3)
    events = []

    class Stuck(SteppingLog):
        def step_down_gracefully(self):
            self.leading = False
            return defer.succeed(False)  # nobody took over

    class Node(NodeService):
        def make_command_log(self, worker):
            return Stuck(self, events, self.reactor, worker, node_id=self.node_id)

    node = Node(cfg, 1, reactor_())
    node.startService()
    began = reactor_().seconds()
    yield node.stopService()
    assert events == [("log stopped", 2)]
    assert 0.25 <= reactor_().seconds() - began < 5


@pytest_twisted.inlineCallbacks
def test_a_plain_local_log_stops_at_once(tmp_path):
    cfg = write_ops_config(tmp_path, nodes=1, keys=(), client_tls="off", bcrypt_cost=4)
    node = NodeService(cfg, 1, reactor_())
    node.startService()
    yield node.hand_over()
    yield node.stopService()


class Listening(JSONLines):
    """A bare client that also keeps the events it is pushed, and notices the close."""

    def __init__(self, events):
        super().__init__()
        self.events = events
        self.gone = defer.Deferred()

    def lineReceived(self, line):
        message = json.loads(line)
        if "event" in message:
            self.events.append(("client got", message))
        super().lineReceived(line)

    def connectionLost(self, reason):
        self.events.append(("client closed", None))
        self.gone.callback(None)


@pytest_twisted.inlineCallbacks
def test_clients_are_told_and_closed_after_the_drain_and_before_the_log_stops(tmp_path):
    cfg = write_ops_config(tmp_path, nodes=1, keys=(), client_tls="off", bcrypt_cost=4)
    events = []

    class Watching(SteppingLog):
        def stop(self):
            events.append(("open connections", len(self.node.factory.connections)))
            return super().stop()

    class Node(NodeService):
        def make_command_log(self, worker):
            return Watching(self, events, self.reactor, worker, node_id=self.node_id)

    node = Node(cfg, 1, reactor_())
    node.startService()
    address = cfg.node(1).client
    client = yield endpoints.connectProtocol(
        endpoints.TCP4ClientEndpoint(reactor_(), address.host, address.port, timeout=5),
        Listening(events))
    answer = yield client.request("hello")
    assert answer["ok"] is True
    yield node.stopService()
    yield client.gone.addTimeout(5, reactor_())
    # The node closed the connection before its log stopped; the client hears it a moment later.
    on_node = [e for e in events if not e[0].startswith("client")]
    on_client = [e for e in events if e[0].startswith("client")]
    assert on_node == [("step down", True), ("write answered", 1), ("write answered", 0),
                       ("open connections", 0), ("log stopped", 0)]
    assert on_client == [("client got", {"event": "node_stopping", "reason": "shutdown"}),
                         ("client closed", None)]


# -- a rolling restart of real nodes ------------------------------------------------------

@requires_replicated_log
@within(180)
@pytest_twisted.inlineCallbacks
def test_rolling_restart_under_load_loses_nothing(cluster_factory):  # noqa: F811
    reactor = reactor_()
    cluster = cluster_factory(3)
    yield cluster.start_and_wait()
    yield cluster.require_replication()
    leader = yield cluster.wait_leader()

    setup = cluster.client(policy=fast_policy())
    for name in ("sink", "s1", "s2", "s3"):
        yield setup.create_account(name, f"{name}-password")
    clients = []
    for name, home in zip(("s1", "s2", "s3"), cluster.node_ids):
        client = cluster.client(prefer=home, policy=fast_policy())
        yield client.login(name, f"{name}-password")
        clients.append(client)
    load = Load(reactor, clients, "sink", pipeline=2)
    running = load.run(100_000)
    yield wait_until(reactor, lambda: len(load.acked) >= 50, 60, "50 acknowledged sends")

    # Followers first, the leader last, as docs/deploy.md says.
    order = [n for n in cluster.node_ids if n != leader] + [leader]
    for node_id in order:
        acked_before = len(load.acked)
        yield cluster.stop_gracefully(node_id, timeout=30)
        cluster.start(node_id)
        yield cluster.wait_ready(node_id)
        yield wait_until(reactor, lambda: len(load.acked) >= acked_before + 30, 60,
                         f"30 more sends acknowledged after node {node_id} restarted")
    load.stop()
    yield running.addTimeout(60, reactor)

    assert "leadership passed to node" in cluster.output(leader), cluster.describe(80)
    assert not load.errors, load.errors[:5]
    for node_id in cluster.node_ids:
        reader = cluster.client(only=node_id, policy=fast_policy())
        yield reader.login("sink", "sink-password")
        bodies = [m["body"] for m in (yield all_history(reader))]
        missing = set(load.acked) - set(bodies)
        assert not missing, f"node {node_id} lacks {len(missing)} acknowledged sends"
        assert len(bodies) == len(set(bodies)), f"node {node_id} stored a send twice"


@requires_replicated_log
@within(120)
@pytest_twisted.inlineCallbacks
def test_a_client_of_a_stopping_node_is_told_moves_on_and_keeps_writing(cluster_factory):  # noqa: F811
    reactor = reactor_()
    cluster = cluster_factory(3)
    yield cluster.start_and_wait()
    yield cluster.require_replication()
    leader = yield cluster.wait_leader()

    setup = cluster.client(policy=fast_policy())
    for name in ("sink", "writer"):
        yield setup.create_account(name, f"{name}-password")
    events, statuses = [], []
    client = cluster.client(prefer=leader, policy=fast_policy(),
                            on_event=events.append, on_status=statuses.append)
    yield client.login("writer", "writer-password")
    assert client.node == leader
    load = Load(reactor, [client], "sink", pipeline=4)
    running = load.run(100_000)
    yield wait_until(reactor, lambda: len(load.acked) >= 30, 60, "30 acknowledged sends")

    yield cluster.stop_gracefully(leader, timeout=30)
    assert {"event": "node_stopping", "reason": "shutdown"} in events
    assert any(s.state == "reconnecting" and s.detail == f"node {leader} is stopping"
               for s in statuses), statuses
    acked_before = len(load.acked)
    yield wait_until(reactor, lambda: len(load.acked) >= acked_before + 30, 60,
                     "30 more sends acknowledged after the stop")
    assert client.node != leader
    load.stop()
    yield running.addTimeout(60, reactor)

    assert not load.errors, load.errors[:5]
    reader = cluster.client(policy=fast_policy())
    yield reader.login("sink", "sink-password")
    bodies = [m["body"] for m in (yield all_history(reader))]
    assert not set(load.acked) - set(bodies), "an acknowledged send is missing"
    assert len(bodies) == len(set(bodies)), "a send was stored twice"
    assert "Traceback" not in cluster.output(leader), cluster.describe(60)
