"""ChatClient: one connection, JSON lines, answers matched by id."""

import json

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from paxchat.client.connection import ChatClient, encode_request
from paxchat.client.errors import ConnectionDropped, ServerError


def connected():
    events, lost = [], []
    proto = ChatClient(on_event=events.append, on_lost=lost.append)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, events, lost


def written(transport):
    return [json.loads(line) for line in transport.value().splitlines()]


def test_requests_are_one_json_line_each_with_increasing_ids():
    proto, transport, _, _ = connected()
    proto.request("hello")
    proto.request("send_message", to="bob", body="héllo\nworld", client_msg_id="c1")
    assert transport.value().count(b"\n") == 2
    a, b = written(transport)
    assert a == {"id": 1, "op": "hello"}
    assert b == {"id": 2, "op": "send_message", "to": "bob", "body": "héllo\nworld", "client_msg_id": "c1"}


def test_encode_request_is_utf8_json_line():
    assert encode_request(5, "login", {"username": "é"}) == '{"id":5,"op":"login","username":"é"}\n'.encode()


def test_pipelined_answers_out_of_order_and_errors():
    proto, transport, _, _ = connected()
    got = {}
    proto.request("a").addCallback(lambda r: got.setdefault("a", r))
    proto.request("b").addErrback(lambda f: got.setdefault("b", f.value))
    assert proto.in_flight == 2
    proto.dataReceived(b'{"id": 2, "ok": false, "error": {"code": "no_such_user", "message": "x"}}\r\n')
    proto.dataReceived(b'{"id": 1, "ok": true, "result": {"v": 1}}\n')
    assert got["a"] == {"v": 1}
    assert isinstance(got["b"], ServerError) and got["b"].code == "no_such_user"
    assert proto.in_flight == 0


def test_events_go_to_the_callback_and_bad_lines_are_ignored():
    proto, transport, events, _ = connected()
    proto.dataReceived(b'garbage\n{"event": "session_ended", "reason": "r"}\n\n')
    assert events == [{"event": "session_ended", "reason": "r"}]


def test_lost_connection_fails_pending_then_reports():
    proto, transport, _, lost = connected()
    failures = []
    proto.request("history").addErrback(failures.append)
    proto.connectionLost(Failure(ConnectionDone()))
    assert failures[0].check(ConnectionDropped)
    assert len(lost) == 1
    after = []
    proto.request("hello").addErrback(after.append)
    assert after[0].check(ConnectionDropped)


def _body_for_line_of(size):
    """A send_message body whose request line (id 1, no newline) is ``size`` bytes."""
    overhead = len(encode_request(1, "send_message", {"to": "bob", "body": ""})) - 1
    return "x" * (size - overhead)


def test_a_request_over_the_frame_limit_fails_at_once_and_is_not_written():
    from paxchat.client.errors import RequestTooLarge
    from paxchat.limits import MAX_LINE_BYTES
    proto, transport, _, _ = connected()
    failures = []
    proto.request("send_message", to="bob", body="🎉" * 16384).addErrback(failures.append)
    [failure] = failures
    assert failure.check(RequestTooLarge)
    assert failure.value.size > MAX_LINE_BYTES and failure.value.limit == MAX_LINE_BYTES
    assert "65,536" in str(failure.value) and "too large" in str(failure.value)
    assert transport.value() == b"" and proto.in_flight == 0


def test_a_request_exactly_at_the_frame_limit_is_sent():
    from paxchat.limits import MAX_LINE_BYTES
    proto, transport, _, _ = connected()
    proto.request("send_message", to="bob", body=_body_for_line_of(MAX_LINE_BYTES))
    assert len(transport.value()) == MAX_LINE_BYTES + 1 and proto.in_flight == 1


def test_frame_too_large_fails_the_longest_request_in_flight_and_only_it():
    proto, transport, _, _ = connected()
    small, big = [], []
    proto.request("hello").addBoth(small.append)
    proto.request("send_message", to="bob", body="y" * 1000).addBoth(big.append)
    proto.dataReceived(b'{"id":null,"ok":false,"error":{"code":"frame_too_large","message":"too big"}}\n')
    [failure] = big
    assert failure.check(ServerError) and failure.value.code == "frame_too_large"
    assert small == []                                  # may still be answered before the close
    proto.connectionLost(Failure(ConnectionDone()))
    assert small[0].check(ConnectionDropped)


def test_the_client_shares_the_server_limits():
    from paxchat import limits
    from paxchat.server import protocol, validation
    assert limits.MAX_LINE_BYTES == protocol.MAX_LINE_BYTES
    assert limits.MAX_BODY_CHARS == validation.MAX_BODY_CHARS
    assert limits.MAX_LIMIT == validation.MAX_LIMIT
    assert limits.PATTERN.pattern == validation.PATTERN.pattern
