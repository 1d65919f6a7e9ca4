"""PaxchatClient and a node that says it is stopping: leave it at once, resume elsewhere, resend."""

from twisted.internet.testing import MemoryReactorClock

from paxchat.client.api import PaxchatClient
from paxchat.client.targets import targets_from_addresses

from .client_fakes import FakeNodes
from .test_client_failover import POLICY, logged_in, make_client, results

STOPPING = {"event": "node_stopping", "reason": "shutdown"}


def test_it_moves_to_another_node_resumes_and_resends_what_was_unanswered():
    reactor, client, nodes, conn, statuses, events = logged_in()
    answered = results(client.send_message("bob", "answered"))
    unanswered = results(client.send_message("bob", "unanswered"))
    first, second = conn.requests()
    conn.answer(first, {"message_id": 1, "ts": 1.0})
    conn.push(STOPPING)
    assert events[-1] == STOPPING
    assert conn.transport.disconnecting  # the client closes at once
    later = results(client.history())  # waits for the next node
    assert conn.requests() == []
    conn.drop()
    reactor.advance(0)
    assert statuses[-1].state == "reconnecting"
    assert statuses[-1].detail == "node 1 is stopping"
    assert nodes.pending_ports() == [7102]  # the next node, not the stopping one
    conn2 = nodes.accept()
    conn2.handshake(node=2, leader=2, resume_user="alice")
    resent, history = conn2.requests()
    assert resent["op"] == "send_message" and resent["body"] == "unanswered"
    assert resent["client_msg_id"] == second["client_msg_id"]
    assert history["op"] == "history"
    conn2.answer(resent, {"message_id": 2, "ts": 2.0})
    conn2.answer(history, {"messages": []})
    assert answered == [{"message_id": 1, "ts": 1.0}]
    assert unanswered == [{"message_id": 2, "ts": 2.0}]
    assert later == [{"messages": []}]
    assert client.node == 2 and statuses[-1].state == "connected"
    assert client.session == "tok-1"


def test_the_stopping_node_is_tried_last():
    reactor, client, nodes, conn, statuses, events = logged_in()
    conn.push(STOPPING)
    conn.drop()
    reactor.advance(0)
    assert nodes.refuse() == 7102
    reactor.advance(0)
    assert nodes.refuse() == 7103
    reactor.advance(0)
    assert nodes.pending_ports() == [7101]  # the others failed: maybe it is back already


def test_a_node_stopping_during_the_handshake_is_skipped():
    reactor, client, nodes, statuses, events = make_client()
    got = results(client.connect())
    reactor.advance(0)
    conn = nodes.accept()
    conn.push(STOPPING)
    assert conn.transport.disconnecting
    conn.drop()
    reactor.advance(0)
    conn2 = nodes.accept()
    assert conn2.port == 7102
    conn2.handshake(node=2, leader=2)
    assert got and got[0]["node"] == 2
    assert events == [STOPPING]


def test_with_a_single_node_it_reconnects_to_that_node():
    reactor = MemoryReactorClock()
    events = []
    client = PaxchatClient(reactor, targets_from_addresses(reactor, {1: ("127.0.0.1", 7101)}),
                           on_event=events.append, policy=POLICY)
    nodes = FakeNodes(reactor)
    got = results(client.login("alice", "secret-pw"))
    reactor.advance(0)
    conn = nodes.accept()
    conn.handshake()
    [login] = conn.requests()
    conn.answer(login, {"session": "tok-1", "unread": 0})
    assert got
    conn.push(STOPPING)
    conn.drop()
    reactor.advance(0)
    again = nodes.accept()
    assert again.port == 7101
    again.handshake(resume_user="alice")
    assert client.connected and events == [STOPPING]


def test_a_full_node_is_left_like_a_stopping_one_and_the_status_says_it_is_full():
    full = {"event": "node_stopping", "reason": "full"}
    reactor, client, nodes, conn, statuses, events = logged_in()
    conn.push(full)
    assert conn.transport.disconnecting
    conn.drop()
    reactor.advance(0)
    assert statuses[-1].state == "reconnecting"
    assert statuses[-1].detail == "node 1 is full"
    assert nodes.pending_ports() == [7102]  # another node; the full one is tried last
