"""A stopping node answers what its clients already sent, then tells them (node_stopping) and closes."""

import json

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from .server_support import HeldWorker, Server, logged_in

PW = "password-1"


def gone(client):
    """What the reactor does once the transport's loseConnection has flushed."""
    client.proto.connectionLost(Failure(ConnectionDone()))


def test_the_event_follows_the_pending_answers_and_the_connection_closes():
    server = Server(worker_class=HeldWorker)
    client = logged_in(server, "alice")
    idle = server.connect()
    first = client.send(op="send_message", to="alice", body="one")
    second = client.send(op="history", limit=5)
    done = server.factory.close_all("shutdown", grace=5)

    # The idle connection has nothing to wait for.
    assert idle.events() == [{"event": "node_stopping", "reason": "shutdown"}]
    assert idle.transport.disconnecting
    # The busy one waits for its answers; anything it sends now is not read.
    assert not client.transport.disconnecting
    client.send(id="late", op="hello")
    server.worker.release_all()
    server.worker.release_all()
    ids = [m.get("id") for m in client.received()[-3:]]
    assert ids[:2] == [first, second] or ids[:2] == [second, first]
    assert client.inbox[-1] == {"event": "node_stopping", "reason": "shutdown"}
    assert client.answer(first)["ok"] and client.answer(second)["ok"]
    assert "late" not in [m.get("id") for m in client.inbox]
    assert client.transport.disconnecting
    assert client.transport.producer is None  # a paused output gate cannot keep it open

    assert not done.called
    gone(client)
    gone(idle)
    assert done.called
    assert server.factory.connections == set()
    assert not server.clock.getDelayedCalls()


def test_answers_that_never_come_are_given_up_on_after_the_grace_period():
    server = Server(worker_class=HeldWorker)
    client = logged_in(server, "bob")
    client.send(op="history", limit=5)  # held by the worker for good
    done = server.factory.close_all("shutdown", grace=2)
    assert client.events() == []
    server.clock.advance(2)
    assert client.events() == [{"event": "node_stopping", "reason": "shutdown"}]
    assert client.transport.disconnecting
    # A client that does not let the connection close is cut off, and the stop goes on.
    server.clock.advance(2)
    assert client.transport.disconnected
    assert not done.called
    server.clock.advance(1)
    assert done.called


def test_nothing_to_close():
    server = Server()
    assert server.factory.close_all("shutdown", grace=1).called


def test_a_closed_connection_leaves_the_set():
    server = Server()
    client = server.connect()
    assert server.factory.connections == {client.proto}
    gone(client)
    assert server.factory.connections == set()
    # Encoded as one JSON line like every event.
    other = server.connect()
    server.factory.close_all("shutdown", grace=1)
    assert other.transport.value().endswith(
        json.dumps({"event": "node_stopping", "reason": "shutdown"}, separators=(",", ":")).encode() + b"\n")


def test_a_full_node_turns_new_connections_away_as_a_stopping_node_would():
    from paxchat.metrics import node_status
    from .server_support import test_settings
    server = Server(settings=test_settings(max_clients=2))
    first, second = server.connect(), server.connect()
    extra = server.connect()
    assert extra.events() == [{"event": "node_stopping", "reason": "full"}]
    assert extra.transport.disconnecting
    extra.send(op="create_account", username="mallory", password=PW)  # not read
    assert [m for m in extra.received() if "event" not in m] == []
    assert server.factory.connections == {first.proto, second.proto}
    assert server.factory.turned_away_total == 1
    # The two it holds are served as usual.
    assert first.ok("create_account", username="alice", password=PW) == {"username": "alice"}
    # Once one leaves there is room again.
    gone(extra)
    gone(second)
    again = server.connect()
    assert again.events() == []
    assert server.factory.connections == {first.proto, again.proto}
    assert not again.transport.disconnecting

    class Node(list):                             # what node_status reads: no child services
        node_id, log, running = 1, None, True
    Node.factory = server.factory
    status = node_status(Node())
    assert status["connections"] == 2 and status["clients_turned_away"] == 1


def test_turned_away_connections_are_logged_once_a_minute_at_most():
    from twisted.logger import globalLogPublisher
    from paxchat.server.factory import TURNED_AWAY_LOG_SECONDS
    from .server_support import test_settings
    seen = []

    def observer(event):
        if "turned away" in event.get("log_format", ""):
            seen.append(event)
    globalLogPublisher.addObserver(observer)
    try:
        server = Server(settings=test_settings(max_clients=1))
        server.connect()
        for _ in range(5):
            server.connect()
        assert [e["count"] for e in seen] == [1]
        server.clock.advance(TURNED_AWAY_LOG_SECONDS)
        server.connect()
        assert [e["count"] for e in seen] == [1, 5]
    finally:
        globalLogPublisher.removeObserver(observer)


def test_a_full_node_makes_room_by_closing_the_oldest_connection_that_never_logged_in():
    from paxchat.server.factory import STRANGER_GRACE_SECONDS
    from .server_support import test_settings
    server = Server(settings=test_settings(max_clients=3), worker_class=HeldWorker)
    member = logged_in(server, "alice")
    stranger = server.connect()
    younger = server.connect()
    # Too soon: the newcomer is the one turned away.
    server.clock.advance(STRANGER_GRACE_SECONDS - 1)
    early = server.connect()
    assert early.events() == [{"event": "node_stopping", "reason": "full"}]
    # Later the oldest stranger makes room: it hears "full" and is closed.
    server.clock.advance(1)
    newcomer = server.connect()
    assert newcomer.events() == [] and not newcomer.transport.disconnecting
    assert stranger.events() == [{"event": "node_stopping", "reason": "full"}]
    assert stranger.transport.disconnecting
    assert not younger.transport.disconnecting and not member.transport.disconnecting
    assert server.factory.turned_away_total == 2
    gone(stranger)
    gone(early)
    assert server.factory.connections == {member.proto, younger.proto, newcomer.proto}


def test_logged_in_clients_and_strangers_waiting_for_an_answer_are_never_displaced():
    from paxchat.server.factory import STRANGER_GRACE_SECONDS
    from .server_support import test_settings
    server = Server(settings=test_settings(max_clients=2), worker_class=HeldWorker)
    member = logged_in(server, "alice")
    busy = server.connect()
    busy.send(op="create_account", username="bob", password=PW)   # held by the worker
    server.clock.advance(STRANGER_GRACE_SECONDS * 10)
    newcomer = server.connect()
    assert newcomer.events() == [{"event": "node_stopping", "reason": "full"}]
    assert busy.events() == [] and member.events() == []
    assert not busy.transport.disconnecting and not member.transport.disconnecting
