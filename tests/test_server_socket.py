"""The server over real sockets (TCP and TLS) with the real ChatState, StateWorker and LocalLog."""

import json
import socket

import pytest
import pytest_twisted
from twisted.internet import defer, protocol
from twisted.protocols.basic import LineReceiver

from paxchat.locallog import LocalLog
from paxchat.server import ChatServerFactory, RateLimit, ServerSettings
from paxchat.state.chat import ChatState
from paxchat.state.worker import StateWorker

TIMEOUT = 20.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RawClient(LineReceiver):
    """Speaks the protocol by hand: request() returns the answer, events() waits for pushes."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def connectionMade(self):
        self.answers = {}
        self.events = []
        self._event_waiters = []
        self._next = 0
        self.lost = defer.Deferred()

    def lineReceived(self, line):
        message = json.loads(line)
        if "event" in message:
            self.events.append(message)
            waiters, self._event_waiters = self._event_waiters, []
            for d in waiters:
                d.callback(None)
        else:
            self.answers.pop(message["id"]).callback(message)

    def connectionLost(self, reason):
        self.lost.callback(None)

    def request(self, op, **args):
        from twisted.internet import reactor
        self._next += 1
        d = self.answers[self._next] = defer.Deferred()
        self.sendLine(json.dumps({"id": self._next, "op": op, **args}).encode())
        return d.addTimeout(TIMEOUT, reactor)

    @defer.inlineCallbacks
    def ok(self, op, **args):
        answer = yield self.request(op, **args)
        assert answer["ok"] is True, (op, answer)
        return answer["result"]

    @defer.inlineCallbacks
    def error(self, op, **args):
        answer = yield self.request(op, **args)
        assert answer["ok"] is False, (op, answer)
        return answer["error"]["code"]

    @defer.inlineCallbacks
    def next_event(self):
        from twisted.internet import reactor
        while not self.events:
            d = defer.Deferred()
            self._event_waiters.append(d)
            yield d.addTimeout(TIMEOUT, reactor)
        return self.events.pop(0)


@pytest.fixture
def server_overrides():
    """ServerSettings fields a test changes (parametrize this name to set them)."""
    return {}


@pytest.fixture(params=["tcp", "tls"])
def server(request, tmp_path, server_overrides):
    """A one-node server on a free port; yields a coroutine-free connect() helper."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint, \
        TCP4ServerEndpoint
    state = ChatState.open(str(tmp_path / "state.db"))
    worker = StateWorker(reactor, state)
    log = LocalLog(reactor, worker, node_id=1)
    port_number = free_port()
    settings = ServerSettings(node_id=1, nodes=({"id": 1, "client": f"127.0.0.1:{port_number}"},),
                              bcrypt_cost=4, **server_overrides)
    factory = ChatServerFactory(reactor, log, worker, settings)
    if request.param == "tls":
        from paxchat import tls
        from paxchat.clienttls import TLSServerEndpoint
        from paxchat.config import load
        ini = tmp_path / "cluster.ini"
        ini.write_text(f"[cluster]\nbcrypt_cost = 4\n[node.1]\nclient = 127.0.0.1:{port_number}\n"
                       f"peer = 127.0.0.1:{free_port()}\n")
        config = load(ini)
        tls.make_cluster_certs(config)
        listen = TLSServerEndpoint(reactor, port_number, tls.client_server_context(config, 1),
                                   interface="127.0.0.1")
        dial = SSL4ClientEndpoint(reactor, "127.0.0.1", port_number,
                                  tls.client_connection_options(config, "127.0.0.1"))
    else:
        listen = TCP4ServerEndpoint(reactor, port_number, interface="127.0.0.1")
        dial = TCP4ClientEndpoint(reactor, "127.0.0.1", port_number)
    port = pytest_twisted.blockon(listen.listen(factory))
    clients = []

    def connect():
        d = dial.connect(protocol.Factory.forProtocol(RawClient))
        d.addCallback(lambda p: clients.append(p) or p)
        return d.addTimeout(TIMEOUT, reactor)

    connect.factory = factory
    try:
        yield connect
    finally:
        for client in clients:
            if not client.lost.called:
                client.transport.abortConnection()
        pytest_twisted.blockon(defer.gatherResults(
            [c.lost for c in clients] + [defer.maybeDeferred(port.stopListening)]))
        pytest_twisted.blockon(factory.hasher.close())    # its bcrypt worker process
        pytest_twisted.blockon(worker.stop())


@pytest_twisted.inlineCallbacks
def test_two_users_through_every_op(server):
    alice = yield server()
    bob = yield server()
    hello = yield alice.ok("hello")
    assert hello["node"] == 1 and hello["leader"] == 1 and hello["protocol"] == 1
    assert (yield alice.ok("create_account", username="alice", password="alice-password")) == {"username": "alice"}
    yield bob.ok("create_account", username="bob", password="bob-password")
    assert (yield bob.error("create_account", username="bob", password="bob-password")) == "username_taken"
    assert (yield alice.error("login", username="alice", password="not-alice-pw")) == "bad_credentials"
    assert (yield alice.error("history")) == "not_logged_in"
    session = (yield alice.ok("login", username="alice", password="alice-password"))["session"]
    assert (yield bob.ok("login", username="bob", password="bob-password"))["unread"] == 0

    sent = yield bob.ok("send_message", to="alice", body="hi alice", client_msg_id="b1")
    event = yield alice.next_event()
    assert event == {"event": "message", "message": {"id": sent["message_id"], "from": "bob", "to": "alice",
                                                      "body": "hi alice", "ts": sent["ts"], "read": False}}
    assert (yield bob.ok("send_message", to="alice", body="hi alice", client_msg_id="b1")) == sent
    second = yield bob.ok("send_message", to="alice", body="second")
    yield alice.next_event()
    assert (yield bob.error("send_message", to="nobody", body="x")) == "no_such_user"
    assert (yield bob.error("send_message", to="alice", body="x" * 16385)) == "body_too_large"

    listed = yield alice.ok("list_accounts", pattern="*", limit=1)
    assert listed == {"accounts": ["alice"], "more": True}
    assert (yield alice.ok("list_accounts", after="alice")) == {"accounts": ["bob"], "more": False}

    # A second connection resumes alice's session without the password.
    alice2 = yield server()
    assert (yield alice2.ok("resume", session=session)) == {"username": "alice", "unread": 2}
    read = yield alice2.ok("read_messages", limit=1)
    assert [m["body"] for m in read["messages"]] == ["hi alice"] and read["unread"] == 1
    assert (yield alice.ok("mark_read", ids=[second["message_id"]])) == {"marked": 1}
    yield alice.ok("send_message", to="bob", body="hello bob")
    yield bob.next_event()
    history = yield alice.ok("history", peer="bob")
    assert [m["body"] for m in history["messages"]] == ["hello bob", "second", "hi alice"]
    assert all(m["read"] for m in history["messages"] if m["to"] == "alice")
    assert [m["body"] for m in (yield alice.ok("history", before=second["message_id"]))["messages"]] == ["hi alice"]
    assert (yield alice.ok("delete_messages", ids=[sent["message_id"]])) == {"deleted": 1}
    assert len((yield alice.ok("history"))["messages"]) == 2

    # Logging out on one connection ends the session on the other.
    assert (yield alice.ok("logout")) == {}
    assert (yield alice2.next_event()) == {"event": "session_ended", "reason": "logged_out"}
    assert (yield alice2.error("history")) == "not_logged_in"
    assert (yield alice2.error("resume", session=session)) == "bad_session"

    # Deleting bob's account needs his password and ends his other sessions.
    bob2 = yield server()
    yield bob2.ok("login", username="bob", password="bob-password")
    assert (yield bob.error("delete_account", password="wrong-password")) == "bad_credentials"
    assert (yield bob.ok("delete_account", password="bob-password")) == {}
    assert (yield bob2.next_event()) == {"event": "session_ended", "reason": "account_deleted"}
    assert (yield bob.error("login", username="bob", password="bob-password")) == "bad_credentials"
    yield alice.ok("login", username="alice", password="alice-password")
    # Messages bob sent keep their sender; the name can be taken again.
    assert [m["from"] for m in (yield alice.ok("history"))["messages"]] == ["bob"]
    yield bob.ok("create_account", username="bob", password="new-bob-password")


@pytest_twisted.inlineCallbacks
def test_ten_thousand_pipelined_requests_over_a_socket(server):
    client = yield server()
    yield client.ok("create_account", username="carol", password="carol-password")
    yield client.ok("login", username="carol", password="carol-password")
    answers = [client.request("history" if n % 3 == 0 else "hello", limit=1) for n in range(10_000)]
    results = yield defer.gatherResults(answers)
    assert all(r["ok"] for r in results)


@pytest_twisted.inlineCallbacks
def test_pipelined_answers_of_about_1_mib_each_reach_a_client_that_reads(server):
    """Their writes fill the transport's buffer at once; the client is not dropped for it."""
    client = yield server()
    yield client.ok("create_account", username="dora", password="dora-password")
    yield client.ok("login", username="dora", password="dora-password")
    body = "é" * 10_000    # 60,002 bytes escaped to ASCII (as RawClient sends it too)
    yield defer.gatherResults([client.ok("send_message", to="dora", body=body) for _ in range(20)])
    # Seventeen make a page of ~1 MiB, the most a page holds.
    pages = yield defer.gatherResults([client.ok("history", limit=1000) for _ in range(4)])
    assert [len(page["messages"]) for page in pages] == [17] * 4
    assert all(page["more"] for page in pages)
    assert not client.lost.called


@pytest.mark.parametrize("server_overrides", [dict(
    max_output_backlog=256 * 1024,
    writes_per_connection=RateLimit(rate=1000.0, burst=10**6),
    writes_per_account=RateLimit(rate=1000.0, burst=10**6))])
@pytest_twisted.inlineCallbacks
def test_a_client_that_never_reads_is_dropped_and_others_go_on(server):
    lazy = yield server()
    sender = yield server()
    yield lazy.ok("create_account", username="lazy", password="lazy-password")
    yield lazy.ok("login", username="lazy", password="lazy-password")
    yield sender.ok("create_account", username="sender", password="sender-password")
    yield sender.ok("login", username="sender", password="sender-password")
    lazy.transport.pauseProducing()  # never read again
    body = "x" * 16000
    sent = 0
    # The lazy client cannot notice that the server dropped it (it reads
    # nothing), so watch the server's side.
    while server.factory.registry.of_user("lazy") and sent < 4000:
        yield defer.gatherResults([sender.ok("send_message", to="lazy", body=body) for _ in range(100)])
        sent += 100
    assert server.factory.registry.of_user("lazy") == [], "the server kept buffering for a client that never reads"
    lazy.transport.resumeProducing()
    yield lazy.lost
    assert (yield sender.ok("hello"))["protocol"] == 1
    other = yield server()
    yield other.ok("login", username="lazy", password="lazy-password")


@pytest.mark.parametrize("server_overrides", [dict(max_clients=1)])
@pytest_twisted.inlineCallbacks
def test_a_full_node_tells_a_new_client_to_go_elsewhere_over_a_real_socket(server):
    held = yield server()
    yield held.ok("hello")
    extra = yield server()
    event = yield extra.next_event()
    assert event == {"event": "node_stopping", "reason": "full"}
    from twisted.internet import reactor
    yield extra.lost.addTimeout(TIMEOUT, reactor)
    assert server.factory.turned_away_total == 1
    assert (yield held.ok("hello"))["protocol"] == 1   # the one it holds goes on


@pytest.mark.parametrize("server_overrides", [{"connections_per_address": RateLimit(rate=0.001, burst=1)}])
@pytest_twisted.inlineCallbacks
def test_a_connection_over_the_rate_of_its_address_is_closed_before_tls(server):
    from twisted.internet import reactor
    held = yield server()
    assert (yield held.ok("hello"))["protocol"] == 1
    extra = yield server()
    # Closed at accept: nothing read, nothing answered, not even a TLS handshake.
    asked = extra.request("hello")
    yield extra.lost.addTimeout(TIMEOUT, reactor)
    assert not asked.called and extra.events == []
    asked.addErrback(lambda failure: failure.trap(defer.CancelledError))
    asked.cancel()
    assert server.factory.refused_total == 1 and server.factory.turned_away_total == 0
    assert (yield held.ok("hello"))["protocol"] == 1   # the one it holds goes on


@pytest.mark.parametrize("server_overrides", [dict(
    writes_per_connection=RateLimit(rate=1000.0, burst=10**6),
    writes_per_account=RateLimit(rate=1000.0, burst=10**6))])
@pytest_twisted.inlineCallbacks
def test_a_stopping_node_gets_its_last_answers_to_a_client_it_left_requests_unread(server):
    """Closing a socket with unread requests in it makes the kernel reset the
    connection and throw away what it still had to send: the last answers and
    node_stopping. The node must read (and drop) them until the client closes."""
    from twisted.internet import reactor

    from tests.cluster_support import wait_until
    client = yield server()
    yield client.ok("create_account", username="erin", password="erin-password")
    yield client.ok("login", username="erin", password="erin-password")
    body = "é" * 10_000    # 60,002 bytes escaped: a page of 17 weighs about 1 MiB
    yield defer.gatherResults([client.ok("send_message", to="erin", body=body) for _ in range(17)])
    client.transport.pauseProducing()    # reads nothing for now
    lines = []
    pages = []
    for n in range(24):                  # some 24 MiB of answers: more than the sockets hold
        pages.append(client.answers.setdefault(f"page{n}", defer.Deferred()))
        lines.append(json.dumps({"id": f"page{n}", "op": "history", "limit": 1000}).encode())
    for n in range(50_000):              # and more requests than the node will read
        client.answers[f"hello{n}"] = defer.Deferred()
        lines.append(json.dumps({"id": f"hello{n}", "op": "hello"}).encode())
    client.transport.write(b"\n".join(lines) + b"\n")
    conn = next(iter(server.factory.connections))
    yield wait_until(reactor, lambda: conn.reading_paused and conn.in_flight == 0, TIMEOUT,
                     "the node to stop reading for want of room to write")
    closed = server.factory.close_all("shutdown", grace=TIMEOUT)
    client.transport.resumeProducing()
    yield client.lost.addTimeout(TIMEOUT, reactor)
    yield closed
    # The event comes last: every answer the node wrote came before it.
    stopping = [e for e in client.events if e["event"] != "message"]
    assert stopping == [{"event": "node_stopping", "reason": "shutdown"}]
    assert pages[0].called
