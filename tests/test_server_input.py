"""Bad input of every kind gets the contract's errors and never hurts the server."""

import json

from hypothesis import given, settings, strategies as st

from paxchat.server.protocol import MAX_LINE_BYTES

from .server_support import Server

OPS = ["hello", "create_account", "login", "resume", "logout", "list_accounts", "send_message",
       "read_messages", "mark_read", "history", "delete_messages", "delete_account"]
CODES = {"invalid_request", "unknown_op", "not_logged_in", "rate_limited", "invalid_username",
         "invalid_password", "username_taken", "bad_credentials", "bad_session", "no_such_user",
         "body_too_large"}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40) | st.sampled_from(["alice", "bob", "*", "", "\ud800"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
ARG_NAMES = ["username", "password", "session", "pattern", "limit", "after", "to", "body",
             "client_msg_id", "ids", "peer", "before"]


def fresh():
    """A server with alice (logged in on `alice`) and bob."""
    server = Server()
    alice = server.connect()
    alice.ok("create_account", username="alice", password="password-a")
    alice.ok("login", username="alice", password="password-a")
    server.connect().ok("create_account", username="bob", password="password-b")
    return server, alice


def assert_alive(server):
    other = server.connect()
    assert other.ok("hello")["protocol"] == 1
    other.ok("login", username="bob", password="password-b")
    assert "messages" in other.ok("history")


@settings(max_examples=150)
@given(op=st.sampled_from(OPS + ["nope", ""]),
       args=st.dictionaries(st.sampled_from(ARG_NAMES), json_values, max_size=5))
def test_random_arguments_to_every_op_get_an_answer_from_the_contract(op, args):
    server, alice = fresh()
    answer = alice.call(op, **args)
    assert answer["id"] is not None
    if not answer["ok"]:
        assert answer["error"]["code"] in CODES, answer
        assert isinstance(answer["error"]["message"], str)
    assert_alive(server)


@settings(max_examples=100)
@given(value=json_values)
def test_any_json_value_as_a_line(value):
    server, alice = fresh()
    try:
        line = json.dumps(value).encode()
    except UnicodeEncodeError:  # pragma: no cover - json.dumps escapes by default
        return
    alice.send_line(line + b"\n")
    answer = alice.received()[-1]
    if isinstance(value, dict) and type(value.get("id")) in (int, str) and isinstance(value.get("op"), str):
        assert "id" in answer
    else:
        assert answer["ok"] is False and answer["error"]["code"] in ("invalid_request", "unknown_op")
    assert alice.ok("hello")["protocol"] == 1


@settings(max_examples=100)
@given(data=st.binary(max_size=200))
def test_random_bytes_never_crash_the_connection(data):
    server, alice = fresh()
    alice.send_line(data.replace(b"\n", b" ") + b"\n")
    answer = alice.received()[-1]
    assert answer.get("event") is None
    if answer["ok"] is False:
        assert answer["error"]["code"] in CODES
    assert alice.ok("hello")["protocol"] == 1


def test_invalid_utf8_is_invalid_request_and_the_connection_stays():
    server, alice = fresh()
    alice.send_line(b'{"id": 1, "op": "hello", "x": "\xff\xfe"}\n')
    assert alice.received()[-1] == {"id": None, "ok": False, "error": {
        "code": "invalid_request", "message": "a line must be UTF-8"}}
    assert alice.ok("hello")["protocol"] == 1


def test_not_an_object_and_broken_json():
    server, alice = fresh()
    for line in [b"[1,2]", b"42", b'"hello"', b"null", b"{", b"{\"id\":1,", b"NaN",
                 b'{"id": 1, "op": "hello", "x": NaN}', b'{"id": 1, "op": "hello", "x": Infinity}',
                 b"[" * 50000,
                 b"   ", b'{"op": "hello"}', b'{"id": 1.5, "op": "hello"}', b'{"id": true, "op": "hello"}',
                 b'{"id": [1], "op": "hello"}', b'{"id": 1e400, "op": "hello"}']:
        alice.send_line(line + b"\n")
        answer = alice.received()[-1]
        assert answer["ok"] is False and answer["error"]["code"] == "invalid_request", (line[:40], answer)
        assert answer["id"] is None
    assert alice.ok("hello")["protocol"] == 1
    assert not alice.transport.disconnecting


def test_lone_surrogates_get_the_code_of_a_string_that_cannot_match():
    server, alice = fresh()
    lone = "\ud800"
    alice.send_line(b'{"id": "\\ud800", "op": "hello"}\n')
    assert alice.received()[-1]["id"] == lone                        # a string: echoed, escaped
    assert alice.error("send_message", to=lone, body="x") == "no_such_user"
    assert alice.error("create_account", username=lone, password="password-x") == "invalid_username"
    assert alice.error("login", username=lone, password="password-x") == "bad_credentials"
    assert server.connect().error("resume", session=lone) == "bad_session"
    error = alice.call("send_message", to="bob", body=lone)["error"]
    assert error == {"code": "invalid_request",
                     "message": "'body' is not valid Unicode (it holds a lone surrogate)"}
    assert alice.ok("history", peer="bob")["messages"] == []                 # nothing was stored


def test_deeply_nested_json_is_invalid_request():
    server, alice = fresh()
    alice.send_line(b'{"id": 1, "op": "hello", "x": ' + b"[" * 30000 + b"]" * 30000 + b"}\n")
    answer = alice.received()[-1]
    assert answer["error"]["code"] == "invalid_request"
    assert alice.ok("hello")["protocol"] == 1


def test_huge_numbers():
    server, alice = fresh()
    for args in [{"limit": 10**100}, {"before": 10**100}, {"before": -(10**100)}, {"limit": 1e308}]:
        assert alice.error("history", **args) == "invalid_request"
    alice.send_line(b'{"id": 5, "op": "history", "limit": ' + b"9" * 5000 + b"}\n")
    assert alice.received()[-1]["error"]["code"] == "invalid_request"
    assert alice.ok("hello")["protocol"] == 1


def test_a_line_of_exactly_the_limit_is_read():
    server, alice = fresh()
    head = b'{"id": 9, "op": "hello", "pad": "'
    line = head + b"x" * (MAX_LINE_BYTES - len(head) - 2) + b'"}'
    assert len(line) == MAX_LINE_BYTES
    alice.send_line(line + b"\n")
    assert alice.answer(9)["ok"] is True
    assert not alice.transport.disconnecting


def test_an_oversize_line_gets_frame_too_large_and_the_connection_closes():
    server, alice = fresh()
    alice.send_line(b'{"id": 1, "op": "hello", "pad": "' + b"x" * MAX_LINE_BYTES + b'"}\n{"id":2,"op":"hello"}\n')
    assert alice.received() and alice.inbox[-1] == {"id": None, "ok": False, "error": {
        "code": "frame_too_large", "message": "a line may hold at most 65536 bytes"}}
    assert alice.transport.disconnecting
    assert_alive(server)


def test_endless_data_without_a_newline_is_cut_off_without_buffering_it_all():
    server, alice = fresh()
    for _ in range(10):
        alice.send_line(b"x" * 10000)
    assert alice.inbox == [] or alice.received()[-1]["error"]["code"] == "frame_too_large"
    assert alice.received()[-1]["error"]["code"] == "frame_too_large"
    assert alice.transport.disconnecting
    assert len(alice.proto._buffer) == 0
    # More data after that is ignored, and an unread error does not hold the socket forever.
    alice.send_line(b"x" * 100000)
    assert len(alice.proto._buffer) == 0
    server.clock.advance(11)
    assert alice.transport.disconnected or alice.transport.disconnecting


def test_lines_split_across_reads_and_crlf():
    server, alice = fresh()
    data = b'{"id": 1, "op": "hello"}\r\n{"id": 2, "op": "hel'
    for byte in range(len(data)):
        alice.send_line(data[byte:byte + 1])
    alice.send_line(b'lo"}\n')
    assert alice.answer(1)["ok"] and alice.answer(2)["ok"]
