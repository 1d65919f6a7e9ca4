"""PaxchatClient against fake nodes: requests, failover, resume and safe retries."""

import pytest
from twisted.internet.testing import MemoryReactorClock

from paxchat.client.api import ASKS_ONLY, RETRY_ON_UNAVAILABLE, WRITE_OPS, PaxchatClient, Status
from paxchat.client.errors import ClosedUnanswered, NoMajority, ServerError, Unreachable
from paxchat.client.explain import explain
from paxchat.client.failover import FailoverPolicy
from paxchat.client.targets import targets_from_addresses

from .client_fakes import FakeNodes

PORTS = {1: 7101, 2: 7102, 3: 7103}
POLICY = FailoverPolicy(jitter=0, initial_delay=0.5, max_delay=2, deadline=10, connect_timeout=1,
                        answer_timeout=5, unavailable_window=3, unavailable_delay=0.5)


def make_client(**kwargs):
    reactor = MemoryReactorClock()
    targets = targets_from_addresses(reactor, {i: ("127.0.0.1", p) for i, p in PORTS.items()})
    statuses, events = [], []
    kwargs.setdefault("policy", POLICY)
    # After losing a node, start at the first other one (it is random otherwise).
    kwargs.setdefault("random", lambda: 0.0)
    client = PaxchatClient(reactor, targets, on_status=statuses.append, on_event=events.append, **kwargs)
    return reactor, client, FakeNodes(reactor), statuses, events


def results(d):
    out = []
    d.addBoth(out.append)
    return out


def logged_in(**kwargs):
    reactor, client, nodes, statuses, events = make_client(**kwargs)
    got = results(client.login("alice", "secret-pw"))
    reactor.advance(0)
    conn = nodes.accept()
    [hello] = conn.requests()
    conn.answer(hello, {"node": conn.port - 7100, "leader": 1, "nodes": [], "protocol": 1})
    [login] = conn.requests()
    assert login["op"] == "login" and login["username"] == "alice"
    conn.answer(login, {"session": "tok-1", "unread": 2})
    assert got == [{"session": "tok-1", "unread": 2}]
    return reactor, client, nodes, conn, statuses, events


def test_a_request_gets_its_answer_and_the_session_is_remembered():
    reactor, client, nodes, conn, statuses, _ = logged_in()
    assert client.session == "tok-1" and client.username == "alice"
    assert client.node == 1 and client.leader == 1
    assert [s.state for s in statuses] == ["connecting", "connected"]


def test_answers_are_matched_by_id_even_out_of_order():
    reactor, client, nodes, conn, _, _ = logged_in()
    first = results(client.history(peer="bob"))
    second = results(client.list_accounts("a*"))
    h, la = conn.requests()
    assert h["op"] == "history" and la["op"] == "list_accounts" and la["pattern"] == "a*"
    conn.answer(la, {"accounts": ["alice"], "more": False})
    conn.answer(h, {"messages": []})
    assert first == [{"messages": []}]
    assert second == [{"accounts": ["alice"], "more": False}]


def test_server_errors_become_ServerError_with_code():
    reactor, client, nodes, conn, _, _ = logged_in()
    got = results(client.send_message("nobody", "hi"))
    [req] = conn.requests()
    conn.fail(req, "no_such_user", "there is no account nobody")
    [failure] = got
    assert failure.check(ServerError)
    assert failure.value.code == "no_such_user"
    assert "nobody" in failure.value.message


def test_send_uses_a_fresh_client_msg_id_unless_given():
    reactor, client, nodes, conn, _, _ = logged_in()
    client.send_message("bob", "one")
    client.send_message("bob", "two")
    client.send_message("bob", "three", client_msg_id="mine")
    a, b, c = conn.requests()
    assert a["client_msg_id"] != b["client_msg_id"]
    assert len(a["client_msg_id"]) >= 16
    assert c["client_msg_id"] == "mine"


def test_events_reach_the_callback():
    reactor, client, nodes, conn, _, events = logged_in()
    msg = {"id": 7, "from": "bob", "to": "alice", "body": "yo", "ts": 1.0, "read": False}
    conn.push({"event": "message", "message": msg})
    assert events == [{"event": "message", "message": msg}]


def test_drop_mid_send_reconnects_to_another_node_resumes_and_resends_same_id():
    reactor, client, nodes, conn, statuses, _ = logged_in()
    sent = results(client.send_message("bob", "hello"))
    [send] = conn.requests()
    msg_id = send["client_msg_id"]
    conn.drop()
    assert sent == []
    assert statuses[-1].state == "reconnecting"
    reactor.advance(0)
    assert nodes.pending_ports() == [7102]
    conn2 = nodes.accept()
    hello, = conn2.requests()
    assert hello["op"] == "hello"
    conn2.answer(hello, {"node": 2, "leader": 1, "nodes": [], "protocol": 1})
    resume, = conn2.requests()
    assert resume == {"id": resume["id"], "op": "resume", "session": "tok-1"}
    conn2.answer(resume, {"username": "alice", "unread": 0})
    resend, = conn2.requests()
    assert resend["op"] == "send_message" and resend["client_msg_id"] == msg_id
    assert resend["body"] == "hello" and resend["to"] == "bob"
    conn2.answer(resend, {"message_id": 41, "ts": 12.5})
    assert sent == [{"message_id": 41, "ts": 12.5}]
    assert statuses[-1].state == "connected" and statuses[-1].node == 2
    assert client.node == 2


def test_rotation_skips_refusing_nodes_and_backs_off_between_rounds():
    reactor, client, nodes, conn, statuses, _ = logged_in()
    got = results(client.history())
    conn.drop()
    reactor.advance(0)
    assert nodes.refuse() == 7102
    reactor.advance(0)
    assert nodes.refuse() == 7103
    reactor.advance(0)
    assert nodes.refuse() == 7101
    # A whole round failed: the next attempt waits initial_delay.
    reactor.advance(0.4)
    assert nodes.pending_ports() == []
    reactor.advance(0.1)
    assert nodes.pending_ports() == [7102]
    conn2 = nodes.accept()
    conn2.handshake(node=2, resume_user="alice")
    [h] = conn2.requests()
    assert h["op"] == "history"
    conn2.answer(h, {"messages": []})
    assert got == [{"messages": []}]


def test_gives_up_after_the_deadline_and_reports_failed():
    reactor, client, nodes, conn, statuses, _ = logged_in()
    got = results(client.history())
    conn.drop()
    until_answered(reactor, nodes, got, nodes.refuse)
    [failure] = got
    assert failure.check(Unreachable) and not failure.check(ClosedUnanswered)
    assert explain(failure.value).endswith("Check that the cluster is running.")
    assert statuses[-1].state == "failed"
    assert "127.0.0.1:7101" in statuses[-1].detail
    # A later call starts connecting again.
    again = results(client.hello())
    reactor.advance(0)
    conn2 = nodes.accept()
    conn2.handshake(node=1, resume_user="alice")
    [h] = conn2.requests()
    conn2.answer(h, {"node": 1, "leader": 3, "nodes": [], "protocol": 1})
    assert again[0]["leader"] == 3
    assert statuses[-1].state == "connected" and statuses[-1].leader == 3


def test_nodes_that_close_without_answering_name_client_tls_not_a_stopped_cluster():
    """A node speaking TLS closes a plain client's connection unanswered (and sends no TLS
    record to recognise it by): the cluster runs, so saying to check that it does misleads."""
    reactor, client, nodes, statuses, _ = make_client()
    got = results(client.hello())
    until_answered(reactor, nodes, got, lambda: nodes.accept().drop())
    [failure] = got
    assert failure.check(ClosedUnanswered)
    said = explain(failure.value)
    assert said.startswith("Cannot reach any paxchat server (tried 127.0.0.1:7101, ")
    assert "client_tls in this client's cluster.ini may not be what the cluster uses" in said
    assert "Check that the cluster is running" not in said
    assert statuses[-1].state == "failed"


def until_answered(reactor, nodes, got, each_dial):
    """Let the client dial on (``each_dial()`` takes each attempt) until ``got`` has its answer."""
    for _ in range(200):                       # 50 s: past every deadline of POLICY
        reactor.advance(0.25)
        while nodes.pending_ports():
            each_dial()
        if got:
            return
    raise AssertionError("the call was never answered")


def without_majority(nodes):
    """Accept the client's next dial as a node cut off from the majority would: hello, then
    ``unavailable`` to its resume."""
    c = nodes.accept()
    [hello] = c.requests()
    c.answer(hello, {"node": c.port - 7100, "leader": None, "nodes": [], "protocol": 1})
    [resume] = c.requests()
    c.fail(resume, "unavailable", "the cluster could not commit this in time; retry")
    assert c.transport.disconnecting
    c.drop()


def test_nodes_up_but_without_a_majority_are_said_so_not_unreachable():
    reactor, client, nodes, conn, statuses, _ = logged_in()
    got = results(client.history())
    conn.drop()
    until_answered(reactor, nodes, got, lambda: without_majority(nodes))
    said = [s for s in statuses if s.no_majority]
    assert said[0].state == "reconnecting" and "could not confirm with a majority" in said[0].detail
    assert [s.state for s in said] == ["reconnecting", "failed"]   # said once, not once per node
    [failure] = got
    assert failure.check(NoMajority)
    assert "too few" in explain(failure.value) and "running" not in explain(failure.value)
    assert statuses[-1].state == "failed" and statuses[-1].no_majority


def move_on(reactor, nodes, conn, node=None):
    """The client closed ``conn`` on purpose: let the close finish, accept its next connection."""
    assert conn.transport.disconnecting, "the client stayed on the node"
    conn.drop()
    reactor.advance(0)
    nxt = nodes.accept()
    assert nxt.port != conn.port, "the node that answered unavailable was tried first"
    if node is not None:
        assert nxt.port == 7100 + node
    nxt.handshake(node=nxt.port - 7100, resume_user="alice")
    return nxt


def test_unavailable_is_retried_on_another_node_with_the_same_client_msg_id():
    # A node cut off from the majority answers unavailable for as long as
    # the cut lasts: the retry goes to another node, which may have one.
    reactor, client, nodes, conn, statuses, _ = logged_in()
    sent = results(client.send_message("bob", "hi"))
    [first] = conn.requests()
    conn.fail(first, "unavailable", "no quorum")
    assert sent == []
    conn2 = move_on(reactor, nodes, conn, 2)
    assert any(st.state == "reconnecting" and st.detail == "node 1 could not reach a majority"
               for st in statuses), statuses
    assert conn2.requests() == []           # the retry waits unavailable_delay
    reactor.advance(POLICY.unavailable_delay)
    [second] = conn2.requests()
    assert second["op"] == "send_message" and second["client_msg_id"] == first["client_msg_id"]
    conn2.answer(second, {"message_id": 3, "ts": 1.0})
    assert sent == [{"message_id": 3, "ts": 1.0}]
    assert client.node == 2 and statuses[-1].state == "connected"


def test_unavailable_everywhere_goes_round_the_nodes_and_fails_after_the_window():
    reactor, client, nodes, conn, _, _ = logged_in()
    started = reactor.seconds()
    again = results(client.send_message("bob", "later"))
    visited, keys = [], set()
    while not again:
        reqs = conn.requests()
        for req in reqs:
            keys.add(req["client_msg_id"])
            conn.fail(req, "unavailable")
        if again:
            break
        if reqs:
            conn = move_on(reactor, nodes, conn)
            visited.append(conn.port - 7100)
        reactor.advance(0.25)
        assert reactor.seconds() - started < 10, "retries did not stop"
    [failure] = again
    assert failure.value.code == "unavailable"
    assert len(keys) == 1                   # one key across every node: applied at most once
    assert len(visited) >= 3                # each unavailable answer moved it on (move_on checks where)
    assert POLICY.unavailable_window <= reactor.seconds() - started < POLICY.unavailable_window + 1


@pytest.mark.parametrize("op, args, answer", [
    ("create_account", ("carol", "password1"), {}), ("delete_account", ("password1",), {}),
    ("get_settings", (), {"read_receipts": False}), ("set_settings", (False,), {"read_receipts": False}),
])
def test_unavailable_is_retried_on_another_node_for_every_kind_of_op(op, args, answer):
    reactor, client, nodes, conn, _, _ = logged_in()
    got = results(getattr(client, op)(*args))
    [req] = conn.requests()
    assert ("client_msg_id" in req) == (op in WRITE_OPS)
    conn.fail(req, "unavailable")
    assert got == []
    conn2 = move_on(reactor, nodes, conn, 2)
    reactor.advance(POLICY.unavailable_delay)
    [again] = conn2.requests()
    assert again["op"] == op and again.get("client_msg_id") == req.get("client_msg_id")
    conn2.answer(again, answer)
    assert got == [answer]


def test_every_op_the_server_knows_is_a_write_or_asks_only():
    # Each op is then retried on `unavailable`, and a write resent keeps its key.
    from paxchat.server.handlers import Handlers
    server_ops = set(Handlers(MemoryReactorClock(), *[None] * 7)._ops)
    assert server_ops == WRITE_OPS | ASKS_ONLY and not WRITE_OPS & ASKS_ONLY
    assert RETRY_ON_UNAVAILABLE == server_ops


@pytest.mark.parametrize("op, args", [
    ("create_account", ("carol", "password1")), ("logout", ()), ("read_messages", ()),
    ("mark_read", ([1],)), ("delete_messages", ([1],)), ("delete_account", ("password1",)),
    ("send_message", ("bob", "hi")), ("set_settings", (True,)),
])
def test_every_write_carries_a_fresh_client_msg_id_unless_given(op, args):
    reactor, client, nodes, conn, _, _ = logged_in()
    getattr(client, op)(*args)
    getattr(client, op)(*args, client_msg_id="mine")
    a, b = conn.requests()
    assert len(a["client_msg_id"]) >= 16 and b["client_msg_id"] == "mine"


def test_reads_carry_no_client_msg_id():
    reactor, client, nodes, conn, _, _ = logged_in()
    client.history()
    client.list_accounts()
    assert all("client_msg_id" not in req for req in conn.requests())


def test_read_messages_resent_after_a_drop_carries_the_same_client_msg_id():
    reactor, client, nodes, conn, _, _ = logged_in()
    got = results(client.read_messages(limit=5))
    [first] = conn.requests()
    conn.drop()  # committed on the server, but the answer is lost
    reactor.advance(0)
    conn2 = nodes.accept()
    conn2.handshake(node=2, resume_user="alice")
    [resent] = conn2.requests()
    assert resent["op"] == "read_messages" and resent["limit"] == 5
    assert resent["client_msg_id"] == first["client_msg_id"]
    answer = {"messages": [{"id": 1, "from": "bob", "to": "alice", "body": "hi", "ts": 1.0, "read": True}],
              "unread": 0}
    conn2.answer(resent, answer)
    assert got == [answer]


def test_a_silent_node_is_abandoned_for_another():
    reactor, client, nodes, conn, statuses, _ = logged_in()
    got = results(client.list_accounts())
    conn.requests()
    reactor.advance(POLICY.answer_timeout)
    assert conn.transport.disconnecting or conn.transport.disconnected
    conn.drop()
    reactor.advance(0)
    conn2 = nodes.accept()
    conn2.handshake(node=2, resume_user="alice")
    [req] = conn2.requests()
    assert req["op"] == "list_accounts"
    conn2.answer(req, {"accounts": [], "more": False})
    assert got == [{"accounts": [], "more": False}]


def test_expired_session_on_resume_clears_it_and_tells_the_caller():
    reactor, client, nodes, conn, _, events = logged_in()
    out = results(client.logout())
    conn.requests()
    conn.drop()
    reactor.advance(0)
    conn2 = nodes.accept()
    [hello] = conn2.requests()
    conn2.answer(hello, {"node": 2, "leader": 1, "nodes": [], "protocol": 1})
    [resume] = conn2.requests()
    conn2.fail(resume, "bad_session", "session ended")
    assert out == [{}]
    assert client.session is None
    assert events[-1]["event"] == "session_ended"


def test_a_session_ended_elsewhere_leaves_the_client_logged_out():
    """The server logs the connection out; the prompt then says ``paxchat>``, not ``alice>``."""
    reactor, client, nodes, conn, _, events = logged_in()
    assert client.username == "alice"
    conn.push({"event": "session_ended", "reason": "logged_out"})
    assert events[-1]["event"] == "session_ended"
    assert (client.session, client.username) == (None, None)


def test_requests_made_before_connecting_wait_for_the_handshake():
    reactor, client, nodes, _, _ = make_client(prefer_node=3)
    a = results(client.hello())
    b = results(client.list_accounts())
    reactor.advance(0)
    conn = nodes.accept()
    assert conn.port == 7103
    [hello] = conn.requests()
    conn.answer(hello, {"node": 3, "leader": 2, "nodes": [], "protocol": 1})
    r1, r2 = conn.requests()
    assert [r1["op"], r2["op"]] == ["hello", "list_accounts"]
    conn.answer(r2, {"accounts": ["x"], "more": True})
    conn.answer(r1, {"node": 3, "leader": 2, "nodes": [], "protocol": 1})
    assert a[0]["node"] == 3 and b[0]["more"] is True


def test_close_fails_outstanding_and_stops_reconnecting():
    reactor, client, nodes, conn, statuses, _ = logged_in()
    got = results(client.history())
    closed = results(client.close())
    assert got[0].check(Exception)
    conn.drop()
    assert closed == [None]
    reactor.advance(5)
    assert nodes.pending_ports() == []
    assert statuses[-1].state == "closed"


def test_cancelling_a_call_stops_its_retries():
    reactor, client, nodes, conn, _, _ = logged_in()
    d = client.send_message("bob", "x")
    d.addErrback(lambda f: None)
    [req] = conn.requests()
    d.cancel()
    conn.drop()
    reactor.advance(0)
    conn2 = nodes.accept()
    conn2.handshake(node=2, resume_user="alice")
    assert conn2.requests() == []


def test_garbage_lines_from_a_server_are_ignored():
    reactor, client, nodes, conn, _, events = logged_in()
    conn.protocol.dataReceived(b"not json\n[1,2]\n{\"id\": 999, \"ok\": true}\n")
    got = results(client.hello())
    [req] = conn.requests()
    conn.answer(req, {"node": 1, "leader": None, "nodes": [], "protocol": 1})
    assert got[0]["leader"] is None


def test_a_message_too_large_once_encoded_fails_before_connecting():
    from paxchat.client.errors import RequestTooLarge
    reactor, client, nodes, _, _ = make_client()
    [failure] = results(client.send_message("bob", "🎉" * 16384))  # 16,384 characters, 65,536 bytes
    assert failure.check(RequestTooLarge) and failure.value.op == "send_message"
    reactor.advance(0)
    assert reactor.tcpClients == []                    # nothing was sent anywhere


def test_frame_too_large_fails_the_request_and_it_is_never_resent():
    reactor, client, nodes, conn, _, _ = logged_in()
    got = results(client.send_message("bob", "hi"))
    [req] = conn.requests()
    conn.send({"id": None, "ok": False, "error": {"code": "frame_too_large", "message": "too big"}})
    conn.drop()                                         # the server closes after saying so
    [failure] = got
    assert failure.check(ServerError) and failure.value.code == "frame_too_large"
    reactor.advance(POLICY.initial_delay)
    conn2 = nodes.accept()
    conn2.handshake(node=2, resume_user="alice")
    assert conn2.requests() == []                       # not sent again


def test_the_cli_timeout_bounds_unavailable_retries():
    # 3 of 5 nodes down: every live node answers unavailable, for as long as that lasts.
    from paxchat.client.cli import build_parser, failover_policy
    args = build_parser().parse_args(["--timeout", "5", "list"])
    reactor, client, nodes, conn, _, _ = logged_in(policy=failover_policy(args.timeout))
    assert failover_policy(args.timeout).unavailable_window > 5   # the window alone would wait longer
    started = reactor.seconds()
    got = results(client.list_accounts())
    while not got:
        for req in conn.requests():
            conn.fail(req, "unavailable")
        if conn.transport.disconnecting:
            conn.drop()
            reactor.advance(0)
            conn = nodes.accept()
            conn.handshake(node=conn.port - 7100, resume_user="alice")
        reactor.advance(0.25)
    [failure] = got
    assert failure.check(ServerError) and failure.value.code == "unavailable"
    assert reactor.seconds() - started == pytest.approx(5, abs=0.25)
    reactor.advance(60)
    assert conn.requests() == []                        # no retry after giving up


def test_a_call_timeout_fails_a_call_a_silent_node_holds():
    from paxchat.client.errors import TimedOut
    from dataclasses import replace
    reactor, client, nodes, conn, _, _ = logged_in(policy=replace(POLICY, call_timeout=2))
    got = results(client.send_message("bob", "hi"))
    [req] = conn.requests()
    reactor.advance(2)
    [failure] = got
    assert failure.check(TimedOut) and "2 seconds" in str(failure.value)
    assert "may or may not" in str(failure.value)
    conn.answer(req, {"message_id": 1, "ts": 1.0})      # a late answer is ignored
    assert len(got) == 1
    # A read that times out changed nothing, and is not said to have.
    got = results(client.history(limit=5))
    reactor.advance(2)
    [failure] = got
    assert failure.check(TimedOut) and "2 seconds" in str(failure.value)
    assert "may or may not" not in str(failure.value)


def test_a_call_timeout_with_no_node_reachable_says_so():
    from dataclasses import replace
    reactor, client, nodes, _, _ = make_client(policy=replace(POLICY, call_timeout=2, deadline=60))
    got = results(client.hello())
    reactor.advance(2)
    [failure] = got
    assert failure.check(Unreachable)


# -- what a round over the nodes says ----------------------------------------------------

def dial_each(reactor, nodes, *how):
    """Take the client's next dials in turn, ``how[i](nodes)`` for the i-th (within one round)."""
    for each in how:
        reactor.advance(0)
        each(nodes)


def refused(nodes):
    nodes.refuse()


def untrusted(nodes):
    nodes.accept().refuse_certificate()


def test_certificates_refused_by_every_node_fail_the_call_at_once_naming_the_nodes():
    """A wrong ca.pem refuses every node's certificate; waiting cannot mend that, so the
    call fails after one round, not at the deadline, and does not say the nodes answer nothing."""
    from paxchat.client.errors import UntrustedNodes
    reactor, client, nodes, statuses, _ = make_client()
    got = results(client.login("alice", "secret-pw"))
    dial_each(reactor, nodes, untrusted, untrusted, untrusted)
    [failure] = got
    assert failure.check(UntrustedNodes) and not failure.check(ClosedUnanswered)
    assert reactor.seconds() < POLICY.deadline
    assert explain(failure.value) == (
        "TLS refused the paxchat servers' certificates: node 1 (127.0.0.1:7101), node 2 (127.0.0.1:7102)"
        " and node 3 (127.0.0.1:7103): certificate refused (certificate verify failed).")
    assert statuses[-1].state == "failed" and isinstance(statuses[-1].error, UntrustedNodes)
    assert len(reactor.tcpClients) == 3                    # one round, no more dials


def test_a_node_whose_certificate_is_refused_is_passed_over_for_one_that_is_trusted():
    reactor, client, nodes, statuses, _ = make_client()
    got = results(client.connect())
    dial_each(reactor, nodes, untrusted)
    reactor.advance(0)
    nodes.accept().handshake(node=2)
    assert got and got[0]["node"] == 2
    assert statuses[-1].state == "connected"


def test_a_refused_certificate_that_cannot_be_explained_still_moves_on_to_the_next_node():
    """Saying why TLS refused a certificate reads the one the node presented, which
    may be anything: a certificate it cannot read must not keep the client on that node."""
    import dataclasses

    class UnreadableCA:
        def refusal(self, chain, host, hostname=False, detail=""):
            raise ValueError("error parsing asn1 value")
    reactor, client, nodes, statuses, _ = make_client()
    client.targets[1] = dataclasses.replace(client.targets[1], ca=UnreadableCA())
    got = results(client.connect())
    dial_each(reactor, nodes, untrusted)
    reactor.advance(0)
    nodes.accept().handshake(node=2)
    assert got and got[0]["node"] == 2


def test_refused_certificates_with_the_other_nodes_down_give_up_at_the_round_end_too():
    from paxchat.client.errors import UntrustedNodes
    reactor, client, nodes, statuses, _ = make_client()
    got = results(client.hello())
    dial_each(reactor, nodes, refused, untrusted, refused)
    [failure] = got
    assert failure.check(UntrustedNodes)
    assert [r[0] for r in failure.value.refusals] == ["node 2 (127.0.0.1:7102)"]


def test_every_call_waiting_hears_why_though_a_caller_tries_again_at_once():
    """A caller that calls again as its call fails starts the next campaign there and
    then: the calls failed after it are still told why this one gave up."""
    from paxchat.client.errors import UntrustedNodes
    reactor, client, nodes, statuses, _ = make_client()
    again = []
    first = results(client.hello().addErrback(lambda f: again.append(client.hello()) or f))
    second = results(client.list_accounts("a*"))
    dial_each(reactor, nodes, untrusted, untrusted, untrusted)
    assert again and first[0].check(UntrustedNodes)
    assert second[0].check(UntrustedNodes), second[0]


def test_every_node_refusing_is_said_once_after_the_first_round_and_the_client_waits_on():
    """A stopped cluster: the client says so once (a command would sit silent for its
    whole timeout), and keeps trying until the deadline (nodes restart)."""
    reactor, client, nodes, statuses, _ = make_client()
    got = results(client.hello())
    dial_each(reactor, nodes, refused, refused)
    assert not [s for s in statuses if s.not_accepted]     # not in mid-round
    dial_each(reactor, nodes, refused)
    said = [s for s in statuses if s.not_accepted]
    assert said == [statuses[-1]] and said[0].state == "connecting"
    assert said[0].not_accepted == (("127.0.0.1:7101", "connection refused"),
                                    ("127.0.0.1:7102", "connection refused"),
                                    ("127.0.0.1:7103", "connection refused"))
    assert said[0].retry_for == POLICY.deadline
    assert got == []
    until_answered(reactor, nodes, got, nodes.refuse)
    assert [s for s in statuses if s.not_accepted] == said  # once, not once per round
    assert got[0].check(Unreachable) and reactor.seconds() >= POLICY.deadline


def test_no_node_accepting_is_not_said_when_a_node_answers():
    reactor, client, nodes, statuses, _ = make_client()
    got = results(client.hello())

    def some_answer():
        if nodes.pending_ports()[0] == 7103:
            nodes.accept().drop()                              # it took the connection
        else:
            nodes.refuse()
    until_answered(reactor, nodes, got, some_answer)
    assert got[0].check(ClosedUnanswered)
    assert not [s for s in statuses if s.not_accepted]


# -- leader events ---------------------------------------------------------------------

def connected(leader_events=True, leader=1):
    """A client connected to node 1, whose hello answered as a node of this build
    (``leader_events``) or of an earlier one (None: the argument ignored)."""
    reactor, client, nodes, statuses, events = make_client(prefer_node=1)
    client.connect()
    reactor.advance(0)
    conn = nodes.accept()
    [hello] = conn.requests()
    assert hello["op"] == "hello" and hello["leader_events"] is True
    answer = {"node": 1, "leader": leader, "nodes": [], "protocol": 1}
    if leader_events is not None:
        answer["leader_events"] = leader_events
    conn.answer(hello, answer)
    return reactor, client, conn, statuses, events


def test_each_connection_asks_for_leader_events_and_follows_them_in_its_status():
    reactor, client, conn, statuses, events = connected()
    assert client.leader_pushed and client.leader == 1
    conn.push({"event": "leader", "leader": None})         # node 1 runs for election
    assert client.leader is None
    assert statuses[-1] == Status("connected", 1, None)
    conn.push({"event": "leader", "leader": 3})
    assert client.leader == 3 and statuses[-1] == Status("connected", 1, 3)
    assert [e["leader"] for e in events if e["event"] == "leader"] == [None, 3]
    seen = len(statuses)
    conn.push({"event": "leader", "leader": 3})            # nothing new: no status
    conn.push({"event": "leader", "leader": "node 2"})     # not a node id: ignored
    conn.push({"event": "leader", "leader": True})
    assert len(statuses) == seen and client.leader == 3
    assert results(client.connect())[0]["leader"] == 3     # what connect() says too
    assert conn.requests() == []                           # nothing asked for it


def test_a_node_of_an_earlier_build_ignores_the_ask_and_the_client_works_as_before():
    # Such a node answers hello as always, without "leader_events" (checked on the
    # build before this one: arguments an op does not know are ignored).
    reactor, client, conn, statuses, events = connected(leader_events=None, leader=2)
    assert client.connected and not client.leader_pushed
    assert client.leader == 2 and statuses[-1] == Status("connected", 1, 2)
    got = results(client.hello())
    [hello] = conn.requests()
    assert "leader_events" not in hello                  # a refresh changes nothing
    conn.answer(hello, {"node": 1, "leader": 3, "nodes": [], "protocol": 1})
    assert got[0]["leader"] == 3 and client.leader == 3 and statuses[-1] == Status("connected", 1, 3)


def test_a_leader_event_during_the_resume_is_not_undone_by_the_hello_before_it():
    reactor, client, nodes, conn, statuses, _ = logged_in()
    conn.drop()
    reactor.advance(POLICY.initial_delay)
    second = nodes.accept()
    [hello] = second.requests()
    second.answer(hello, {"node": 2, "leader": 1, "nodes": [], "protocol": 1, "leader_events": True})
    [resume] = second.requests()
    second.push({"event": "leader", "leader": None})       # the old leader is gone
    second.answer(resume, {"username": "alice", "unread": 0})
    assert client.leader is None and statuses[-1] == Status("connected", 2, None)
    assert client.leader_pushed


def test_leader_pushed_ends_with_the_connection():
    reactor, client, conn, statuses, events = connected()
    conn.drop()
    assert not client.leader_pushed
