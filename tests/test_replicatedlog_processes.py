"""Smoke test: three real twistd nodes replicate through Multi-Paxos over TLS.

An account created through node 1 is visible through node 3, and a message
sent through node 2 is pushed to a client attached to node 3. Also prints a
quick throughput number (one client pipelining sends through a follower).
"""

import time

import pytest_twisted
from twisted.internet import defer, threads

from paxchat import config as configmod
from paxchat import tls
from paxchat.client import PaxchatClient
from paxchat.client.failover import FailoverPolicy
from paxchat.devcluster import DevCluster, write_local_config


class Output:
    def __init__(self):
        self.lines = []

    def write(self, text):
        self.lines.append(text)

    def flush(self):
        pass

    def text(self):
        return "".join(self.lines)


def client_of(reactor, cfg, node_id, **kwargs):
    address = cfg.node(node_id).client
    policy = FailoverPolicy(deadline=20, connect_timeout=5, answer_timeout=20)
    return PaxchatClient.from_addresses(reactor, {node_id: (address.host, address.port)},
                                        ca_path=str(cfg.ca_path), policy=policy, **kwargs)


def wait_for(reactor, condition, timeout, what):
    deadline = reactor.seconds() + timeout
    d = defer.Deferred()

    def check():
        if condition():
            d.callback(None)
        elif reactor.seconds() > deadline:
            d.errback(AssertionError(f"no {what} within {timeout} s"))
        else:
            reactor.callLater(0.02, check)

    check()
    return d


@pytest_twisted.inlineCallbacks
def test_three_processes_replicate_accounts_and_push_messages(tmp_path):
    from twisted.internet import reactor
    cfg = configmod.load(write_local_config(
        tmp_path, nodes=3, bcrypt_cost=4, heartbeat_interval=0.05,
        election_timeout_min=0.4, election_timeout_max=0.8))
    tls.make_cluster_certs(cfg)
    output = Output()
    cluster = DevCluster(cfg, output=output, grace=10)
    clients = []
    try:
        cluster.start()
        ready = yield threads.deferToThread(cluster.wait_ready, 60)
        assert ready, output.text()
        events = []
        on1 = client_of(reactor, cfg, 1)
        on2 = client_of(reactor, cfg, 2)
        on3 = client_of(reactor, cfg, 3, on_event=events.append)
        clients += [on1, on2, on3]

        yield on1.create_account("alice", "alice-password")
        yield on1.create_account("bob", "bob-password")
        yield on3.login("bob", "bob-password")          # created through node 1
        yield on2.login("alice", "alice-password")
        sent = yield on2.send_message("bob", "hello from node 2", client_msg_id="m1")
        yield wait_for(reactor, lambda: events, 10, "pushed message on node 3")
        assert events[0]["event"] == "message"
        assert events[0]["message"]["body"] == "hello from node 2"
        assert events[0]["message"]["id"] == sent["message_id"]

        # Quick number: one client pipelining sends through node 2.
        count = 300
        started = time.monotonic()
        yield defer.gatherResults([on2.send_message("bob", f"m{i}", client_msg_id=f"p{i}")
                                   for i in range(count)], consumeErrors=True)
        took = time.monotonic() - started
        yield wait_for(reactor, lambda: len(events) == count + 1, 20, "every push on node 3")
        print(f"\n{count} messages through a 3-node cluster in {took:.2f} s"
              f" ({count / took:.0f} messages/s, one pipelining client on node 2)")
        assert not cluster.exited(), output.text()
    finally:
        for client in clients:
            yield client.close()
        yield threads.deferToThread(cluster.stop)
    text = output.text()
    for node_id in (1, 2, 3):
        assert f"paxchat node {node_id} stopped" in text, text
    assert "Traceback" not in text, text
    assert "Unhandled" not in text and "#critical" not in text, text
