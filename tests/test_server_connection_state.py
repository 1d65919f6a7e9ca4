"""What a connection keeps: the registry of logged-in connections, and the parts made on first use."""

import gc
import sys
import weakref

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from paxchat.metrics import node_status
from paxchat.server import RateLimit
from paxchat.server.sessions import ConnectionRegistry, Session
from paxchat.state.chat import ChatState
from paxchat.state.worker import StateWorker

from .server_support import HeldBcrypt, HeldWorker, Server, logged_in, test_settings
from .test_state_worker import hold_the_thread

PW = "password-1"


class Conn:
    session = None


def session(user, n):
    return Session(user, f"hash-{user}-{n}", 100.0)


def test_registry_one_connection_per_key_and_several():
    registry = ConnectionRegistry()
    a, b, c = Conn(), Conn(), Conn()
    registry.attach(a, session("alice", 1))
    assert registry.of_user("alice") == [a]
    assert registry.of_session("hash-alice-1") == [a]
    registry.attach(b, session("alice", 1))          # a second connection on the same session
    registry.attach(c, session("alice", 2))
    assert set(registry.of_user("alice")) == {a, b, c}
    assert set(registry.of_session("hash-alice-1")) == {a, b}
    assert registry.of_session("hash-alice-2") == [c]
    assert len(registry) == 3

    registry.detach(a)
    assert set(registry.of_user("alice")) == {b, c}
    assert registry.of_session("hash-alice-1") == [b]
    assert a.session is None
    registry.detach(b)
    registry.detach(b)                                # detaching twice changes nothing
    assert registry.of_user("alice") == [c]
    assert registry.of_session("hash-alice-1") == []
    registry.detach(c)
    assert registry.of_user("alice") == [] and len(registry) == 0
    assert registry._by_user == {} and registry._by_session == {}


def test_registry_attach_again_moves_the_connection():
    registry = ConnectionRegistry()
    a = Conn()
    registry.attach(a, session("alice", 1))
    registry.attach(a, session("alice", 1))          # same session again: still one entry
    assert registry.of_user("alice") == [a] and len(registry) == 1
    registry.attach(a, session("bob", 1))
    assert registry.of_user("alice") == [] and registry.of_session("hash-alice-1") == []
    assert registry.of_user("bob") == [a] and a.session.username == "bob"


def test_when_closed_fires_when_the_connection_goes_and_at_once_after():
    server = Server()
    client = server.connect()
    waiting = [client.proto.when_closed(), client.proto.when_closed()]
    assert not any(d.called for d in waiting)
    client.proto.connectionLost(Failure(ConnectionDone()))
    assert all(d.called for d in waiting)
    assert client.proto.when_closed().called


def test_an_idle_connection_holds_no_queue_buckets_or_waiters():
    server = Server()
    client = server.connect()
    client.ok("create_account", username="alice", password=PW)
    client.ok("login", username="alice", password=PW)
    proto = client.proto
    assert proto._waiting is None and proto._write_bucket is None and proto._closed_waiters is None
    assert not proto.reading_paused
    client.ok("send_message", to="alice", body="hi")
    assert proto._write_bucket is not None


def test_a_connection_s_attributes_share_their_names_with_the_other_connections():
    """CPython keeps one table of attribute names for all instances of a class
    while they have at most 30 attributes; past that each connection carries
    its own (~1.3 KiB more, 7 % of an idle connection's memory)."""
    server = Server(worker_class=HeldWorker)
    clients = [logged_in(server, f"user{i}") for i in range(2)]
    clients[0].send(op="send_message", to="user1", body="hello")
    server.worker.release_all()
    sizes = [sys.getsizeof(c.proto.__dict__) for c in clients]
    assert max(sizes) < 600, sizes


def test_a_bucket_made_on_first_use_allows_its_whole_burst():
    # Made late or early, an unused bucket is full: the limit is the same.
    settings = test_settings(writes_per_connection=RateLimit(rate=0.001, burst=3),
                             writes_per_account=RateLimit(rate=1000.0, burst=10000))
    server = Server(settings=settings)
    client = server.connect()
    client.ok("create_account", username="alice", password=PW)
    client.ok("login", username="alice", password=PW)
    server.clock.advance(600)
    for n in range(3):
        client.ok("send_message", to="alice", body=f"m{n}")
    assert client.error("send_message", to="alice", body="one too many") == "rate_limited"


def test_requests_behind_a_login_wait_in_order_then_run():
    server = Server(worker_class=HeldWorker)
    client = server.connect()
    client.send(op="create_account", username="alice", password=PW)
    server.worker.release_all()
    login = client.send(op="login", username="alice", password=PW)
    # Ops of small answers: three history requests would not all be read,
    # as each may answer ~1 MiB (max_answer_bytes_in_flight).
    after = [client.send(op="list_accounts", limit=1) for _ in range(3)]
    assert client.proto._waiting is not None and len(client.proto._waiting) == 3
    server.worker.release_all()
    answered = [m["id"] for m in client.received() if "event" not in m]
    assert answered[-4:] == [login, *after]
    assert all(m["ok"] for m in client.inbox), client.inbox


def test_a_closed_connection_s_waiting_reads_are_dropped_quietly():
    from twisted.logger import globalLogPublisher

    server = Server(worker_class=HeldWorker)
    alice, bob = logged_in(server, "alice"), logged_in(server, "bob")
    for client in (alice, bob):
        client.send(op="history", limit=5)
        client.send(op="list_accounts", pattern="*")
    assert [h[3] for h in server.worker.held] == [alice.proto] * 2 + [bob.proto] * 2
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        alice.proto.connectionLost(Failure(ConnectionDone()))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [h[3] for h in server.worker.held] == [bob.proto] * 2
    assert not [e for e in events if "log_failure" in e], events
    server.worker.release_all()
    assert [m["ok"] for m in bob.received()[-2:]] == [True, True]


def test_a_client_that_leaves_while_its_password_waits_for_bcrypt_is_not_hashed_for():
    """Its hash or check is cancelled (the backend then never runs a queued
    one); nothing is answered or logged; other clients' go on."""
    from twisted.logger import capturedLogs

    bcrypt = HeldBcrypt()
    server = Server(bcrypt=bcrypt)
    creator = server.connect()
    creator.send(op="create_account", username="alice", password=PW)
    bcrypt.release_all()
    assert creator.received()[-1]["ok"]
    leaving, staying, new = server.connect(), server.connect(), server.connect()
    leaving.send(op="login", username="alice", password=PW)
    staying.send(op="login", username="alice", password=PW)
    new.send(op="create_account", username="bob", password=PW)
    assert len(bcrypt.held) == 3
    with capturedLogs() as events:
        leaving.proto.connectionLost(Failure(ConnectionDone()))
        new.proto.connectionLost(Failure(ConnectionDone()))
    assert bcrypt.cancelled == 2 and len(bcrypt.held) == 1
    assert not [e for e in events if "log_failure" in e], events
    assert server.factory.handlers._hashing == {staying.proto: {bcrypt.held[0][0]}}
    bcrypt.release_all()
    assert server.factory.handlers._hashing == {}       # nothing kept once it is done
    assert staying.received()[-1]["ok"] and leaving.received() == [] == new.received()
    assert server.state.account("bob") is None


def test_a_read_asked_for_after_its_connection_closed_is_not_run():
    """A login waits for the read barrier; its client leaves meanwhile: the
    account is not read (its connection's reads were dropped at close)."""
    from twisted.logger import capturedLogs

    server = Server(worker_class=HeldWorker)
    logged_in(server, "alice")
    barrier = defer.Deferred()
    server.log.read_barrier = lambda: barrier
    client = server.connect()
    client.send(op="login", username="alice", password=PW)
    client.proto.connectionLost(Failure(ConnectionDone()))
    with capturedLogs() as events:
        barrier.callback(None)
    assert server.worker.held == []
    assert not [e for e in events if "log_failure" in e], events
    assert client.received() == []


def test_reads_take_turns_by_account_and_a_closed_connection_drops_only_its_own():
    server = Server(worker_class=HeldWorker)
    first = logged_in(server, "alice")
    second = server.connect()  # alice again, on another connection
    second.send(op="login", username="alice", password=PW)
    server.worker.release_all()
    stranger = server.connect()
    for client in (first, second):
        client.send(op="history", limit=5)
        client.send(op="list_accounts", pattern="*")
    stranger.send(op="create_account", username="bob", password=PW)  # not logged in: its own turn
    held = server.worker.held
    assert [h[4] for h in held] == ["alice"] * 4 + [stranger.proto]
    assert [h[3] for h in held] == [first.proto] * 2 + [second.proto] * 2 + [stranger.proto]
    first.proto.connectionLost(Failure(ConnectionDone()))
    assert [h[3] for h in server.worker.held] == [second.proto] * 2 + [stranger.proto]
    server.worker.release_all()
    assert [m["ok"] for m in second.received()[-2:]] == [True, True]
    assert stranger.received()[-1]["ok"]


def _gone_once_closed(client):
    """Close ``client``'s connection with the cycle collector off: is it freed at once?

    The transport keeps its producer after the close, as a TLS transport does.
    """
    gc.collect()
    gc.disable()
    try:
        conn = weakref.ref(client.proto)
        client.proto.connectionLost(Failure(ConnectionDone()))
        del client.proto, client.transport
        return conn() is None
    finally:
        gc.enable()


def _fail_reads(worker, conn, error):
    """Fail the reads ``worker`` (a HeldWorker) holds for ``conn``."""
    failing = [held for held in worker.held if held[3] is conn]
    worker.held = [held for held in worker.held if held[3] is not conn]
    for d, *_ in failing:
        d.errback(error)


def test_a_closed_connection_is_freed_at_once_whether_its_reads_were_answered_dropped_or_failed():
    # Memory, not garbage for the cycle collector: a node churning through
    # connections that close with reads waiting must not pile them up.
    server = Server(worker_class=HeldWorker)
    answered, dropped, failed = (logged_in(server, name) for name in ("alice", "bob", "carol"))
    answered.send(op="list_accounts", pattern="*")
    server.worker.release_all()
    assert answered.received()[-1]["ok"]
    for client in (dropped, failed):
        client.send(op="history", limit=5)
        client.send(op="list_accounts", pattern="*")
    _fail_reads(server.worker, failed.proto, KeyError("the state failed"))
    assert [m["error"]["code"] for m in failed.received()[-2:]] == ["internal", "internal"]
    assert _gone_once_closed(answered)
    assert _gone_once_closed(failed)
    assert _gone_once_closed(dropped)
    assert server.worker.held == []


@pytest_twisted.inlineCallbacks
def test_a_closed_connection_whose_reads_a_state_worker_dropped_is_freed_at_once(tmp_path):
    state = ChatState.open(tmp_path / "state.db")
    server = Server(state=state, worker_class=lambda state: StateWorker(reactor, state))
    release = hold_the_thread(server.worker)
    try:
        client = server.connect()
        for n in range(3):  # each reads whether the name is taken: queued behind the held thread
            client.send(op="create_account", username=f"user{n}", password=PW)
        assert len(server.worker._reads) == 1
        assert _gone_once_closed(client)
        assert not server.worker._reads
    finally:
        release.set()
        yield server.worker.stop()


def test_connections_from_one_address_past_its_rate_are_closed_unread_and_counted():
    server = Server(test_settings(connections_per_address=RateLimit(rate=1.0, burst=3)))
    factory = server.factory
    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:
        busy = IPv4Address("TCP", "192.0.2.7", 40000)
        built = [factory.buildProtocol(busy) for _ in range(5)]
        assert [p is not None for p in built] == [True, True, True, False, False]
        # Another address has its own allowance, an IPv6 one too.
        assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.8", 40000)) is not None
        assert factory.buildProtocol(IPv6Address("TCP", "2001:db8::1", 40000, 0, 0)) is not None
        assert factory.refused_total == 2
        warnings = [e for e in logged if "connections_per_address" in e.get("log_format", "")]
        assert len(warnings) == 1 and warnings[0]["host"] == "192.0.2.7"   # once a minute at most
        # Time refills the allowance.
        server.clock.advance(1.0)
        assert factory.buildProtocol(busy) is not None
        assert factory.buildProtocol(busy) is None
        assert factory.refused_total == 3
        assert len([e for e in logged if "connections_per_address" in e.get("log_format", "")]) == 1
        server.clock.advance(61)
        assert factory.buildProtocol(busy) is not None

        class Node(list):                         # what node_status reads: no child services
            node_id, log, running, factory = 1, None, True, server.factory
        assert node_status(Node())["clients_refused"] == 3
    finally:
        globalLogPublisher.removeObserver(logged.append)

