"""Bad input of every kind gets the contract's errors and never hurts the server."""

import json
import sys
import tempfile
from pathlib import Path

from hypothesis import given, settings, strategies as st

from paxchat.server.errors import ProtocolError
from paxchat.server.protocol import MAX_LINE_BYTES
from paxchat.server.request_line import decode_request

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


REPEATED_OP = ("the key 'op' appears more than once in one object: which value is meant is unclear")


def test_a_key_given_twice_is_refused_naming_it_and_nothing_runs():
    server, alice = fresh()
    applied = len(server.state.applied)
    alice.send_line(b'{"id": 7, "op": "login", "op": "send_message", "to": "bob", "body": "hi"}\n')
    assert alice.answer(7) == {"id": 7, "ok": False, "error": {
        "code": "invalid_request", "message": REPEATED_OP}}
    # The id given twice: the answer cannot say which request it is.
    alice.send_line(b'{"id": 8, "id": 9, "op": "hello"}\n')
    assert alice.received()[-1] == {"id": None, "ok": False, "error": {
        "code": "invalid_request",
        "message": "the key 'id' appears more than once in one object: which value is meant is unclear"}}
    for request_id, line in [
            # spelled differently, the same key
            (10, b'{"id": 10, "op": "send_message", "o\\u0070": "hello", "to": "bob", "body": "hi"}'),
            # a ":" spelled \u003a in the body stands for the ":" of the second "to"
            (11, b'{"id": 11, "op": "send_message", "to": "bob", "to": "alice", "body": "\\u003a"}'),
            # a long line (parsed another way), the repeat at its end
            (12, b'{"id": 12, "op": "send_message", "to": "bob", "body": "' + b"x" * 2000
             + b'", "op": "hello"}'),
            (13, b'{"id": 13, "op": "send_message", "to": "bob", "body": "a: b", "body": "c"}')]:
        alice.send_line(line + b"\n")
        assert alice.answer(request_id)["error"] == {"code": "invalid_request", "message": (
            REPEATED_OP if request_id in (10, 12)
            else REPEATED_OP.replace("'op'", "'to'" if request_id == 11 else "'body'"))}, line[:60]
    # In an argument's object too (no op takes one: it is ignored otherwise).
    alice.send_line(b'{"id": 14, "op": "hello", "x": [{"a": 1, "a": 2}]}\n')
    assert "the key 'a' appears" in alice.answer(14)["error"]["message"]
    assert server.state.applied[applied:] == []                       # nothing was proposed
    assert alice.ok("history", peer="bob")["messages"] == []
    assert not alice.transport.disconnecting


def test_keys_given_once_pass_whatever_colons_the_strings_hold():
    server, alice = fresh()
    bodies = ["at 10:30: see https://example.com/a:b", ":" * 40, "x" * 3000 + ":", "\u00e9:\U0001F600"]
    for body in bodies:
        alice.ok("send_message", to="bob", body=body)
    # ":" escaped, and whitespace around a key's ":"
    alice.send_line(b'{"id": 50, "op" :"send_message", "to"\t:  "bob", "body": "\\u003a\\u003A:"}\n')
    assert alice.answer(50)["ok"] is True
    alice.send_line(b'{"id": 51, "op": "hello", "x": {"a": {"b": ":"}, "c": [{"a": 1}]}}\n')
    assert alice.answer(51)["ok"] is True
    sent = [m["body"] for m in alice.ok("history", peer="bob")["messages"]]
    assert sent == [":::"] + bodies[::-1]


def _key_text(text, escape_colons):
    encoded = json.dumps(text)
    return encoded.replace(":", "\\u003a") if escape_colons else encoded


def _object_text(pairs, draw):
    items = []
    for key, value in pairs:
        if isinstance(value, tuple):          # a nested object, as its pairs
            value_text = _object_text(value, draw)
        elif isinstance(value, str):
            value_text = _key_text(value, draw(st.booleans()))
        else:
            value_text = json.dumps(value)
        items.append(_key_text(key, draw(st.booleans())) + draw(st.sampled_from([":", " : ", ":\t"]))
                     + value_text)
    return "{" + ",".join(items) + "}"


def _repeats(pairs):
    keys = [key for key, _ in pairs]
    return len(set(keys)) != len(keys) or any(
        _repeats(value) for _, value in pairs if isinstance(value, tuple))


KEYS = st.sampled_from(["id", "op", "to", "body", "a:", ":", "a"])
STRINGS = st.text(alphabet="a:\u00e9", max_size=6) | st.sampled_from(["", "x" * 1100, ":" * 3])
PAIRS = st.recursive(
    st.lists(st.tuples(KEYS, st.integers(-5, 5) | STRINGS), max_size=5),
    lambda inner: st.lists(st.tuples(KEYS, st.integers(-5, 5) | STRINGS | inner.map(tuple)), max_size=5),
    max_leaves=10).map(tuple)


@settings(max_examples=400)
@given(pairs=PAIRS, data=st.data())
def test_a_line_is_refused_exactly_when_some_object_repeats_a_key(pairs, data):
    """The cheap look that spares most lines the check never lets a repeat through."""
    line = _object_text(pairs, data.draw).encode()
    try:
        decode_request(line)
    except ProtocolError as e:
        assert _repeats(pairs) and "appears more than once" in e.message, (line, e.message)
    else:
        assert not _repeats(pairs), line


def test_a_number_too_long_for_an_int_is_named_and_nothing_runs():
    server, alice = fresh()
    applied = len(server.state.applied)
    limit = sys.get_int_max_str_digits()
    digits = b"9" * (limit + 1)
    too_long = f"more than {limit} digits"
    pad = b', "pad": "' + b"x" * 2000 + b'"'                  # a long line is parsed another way
    for line, request_id, message in [
            (b'{"id": ' + digits + b', "op": "hello"}', None, f'the "id" is a number of {too_long}'),
            (b'{"id": 5, "op": "history", "limit": ' + digits + b'}', 5,
             f"'limit' is a number of {too_long}"),
            (b'{"id": 6, "op": "mark_read", "ids": [1, -' + digits + b']}', 6,
             f"'ids' holds a number of {too_long}"),
            (b'{"id": 7, "op": "send_message", "to": "bob", "body": "hi", "x": {"y": [' + digits
             + b']}' + pad + b'}', 7, f"'x' holds a number of {too_long}"),
            (b'{"id": "eight", "op": "send_message", "to": "bob", "body": "hi", "before": ' + digits
             + pad + b'}', "eight", f"'before' is a number of {too_long}"),
            (b"[" + digits + b"]", None, "a request must be a JSON object"),
            (b'{"id": 9, "op": "hello", "n": ' + digits + b', ', None, "a line must be one JSON object")]:
        alice.send_line(line + b"\n")
        assert alice.received()[-1] == {"id": request_id, "ok": False, "error": {
            "code": "invalid_request", "message": message}}, line[:60]
    assert server.state.applied[applied:] == []
    # An integer id Python can read is echoed as it came, however long.
    longest = int("9" * limit)
    alice.send_line(b'{"id": ' + b"9" * limit + b', "op": "hello"}\n')
    assert alice.answer(longest)["ok"] is True


# Each string argument of each op, what a lone surrogate in it is answered,
# and the other arguments of a request that would otherwise run.
SURROGATE_ARGUMENTS = [
    ("create_account", "username", "invalid_username", {"password": "password-x"}),
    ("create_account", "password", "invalid_password", {"username": "carol"}),
    ("create_account", "client_msg_id", "invalid_request", {"username": "carol", "password": "password-x"}),
    ("login", "username", "bad_credentials", {"password": "password-a"}),
    ("login", "password", "bad_credentials", {"username": "alice"}),
    ("resume", "session", "bad_session", {}),
    ("logout", "client_msg_id", "invalid_request", {}),
    ("list_accounts", "pattern", "invalid_request", {}),
    ("list_accounts", "after", "invalid_request", {}),
    ("send_message", "to", "no_such_user", {"body": "hi"}),
    ("send_message", "body", "invalid_request", {"to": "bob"}),
    ("send_message", "client_msg_id", "invalid_request", {"to": "bob", "body": "hi"}),
    ("read_messages", "client_msg_id", "invalid_request", {}),
    ("mark_read", "client_msg_id", "invalid_request", {"ids": [1]}),
    ("history", "peer", "invalid_request", {}),
    ("delete_messages", "client_msg_id", "invalid_request", {"ids": [1]}),
    ("delete_account", "password", "bad_credentials", {}),
    ("delete_account", "client_msg_id", "invalid_request", {"password": "password-a"}),
    ("set_settings", "client_msg_id", "invalid_request", {"read_receipts": False}),
]
LONE_SURROGATES = ["\ud800", "a\udfffb", "\ude00\ud83d"]     # the last: a pair the wrong way round


def _utf8(text):
    text.encode("utf-8")          # raises on a lone surrogate
    return text


def test_a_lone_surrogate_in_any_string_is_stored_pushed_or_logged_nowhere():
    """docs/protocol.md, "Strings that are not Unicode": against the real state."""
    from paxchat.logs import format_json, format_text
    from paxchat.state.chat import ChatState
    from twisted.logger import globalLogPublisher

    with tempfile.TemporaryDirectory() as directory:
        state = ChatState.open(Path(directory) / "state.db")
        events = []
        globalLogPublisher.addObserver(events.append)
        try:
            server = Server(state=state)
            server.log.submit({"op": "set_apply_version", "version": 1})   # settings apply
            proposed = []
            submit = server.log.submit
            server.log.submit = lambda command: (proposed.append(command), submit(command))[1]
            alice = server.connect()
            alice.ok("create_account", username="alice", password="password-a")
            alice.ok("login", username="alice", password="password-a")
            bob = server.connect()
            bob.ok("create_account", username="bob", password="password-b")
            bob.ok("login", username="bob", password="password-b")
            alice.ok("send_message", to="bob", body="before")
            bob.received()
            heard = len(bob.inbox)
            dump = state.dump()
            for lone in LONE_SURROGATES:
                for op, name, code, others in SURROGATE_ARGUMENTS:
                    client = server.connect() if op in ("create_account", "login", "resume") else alice
                    answer = client.call(op, **others, **{name: lone})
                    assert answer["ok"] is False and answer["error"]["code"] == code, (op, name, answer)
                assert alice.error(lone) == "unknown_op"
                # Echoed as it came (escaped: answers are ASCII), and the request runs.
                alice.send_line(json.dumps({"id": lone, "op": "hello", lone: lone}).encode() + b"\n")
                assert alice.answer(lone)["ok"] is True
            assert state.dump() == dump                      # nothing changed
            assert bob.received()[heard:] == []              # nor was anything pushed
            # A pair spelled as two escapes is the character it spells, like any other.
            alice.send_line(b'{"id": "\\udc00!", "op": "send_message", "to": "bob",'
                            b' "body": "\\ud83d\\ude00"}\n')
            assert alice.answer("\udc00!")["ok"] is True
            assert bob.received()[-1]["message"]["body"] == "\U0001F600"
            assert bob.ok("history", peer="alice")["messages"][0]["body"] == "\U0001F600"
            for command in proposed:     # as the replicated log sends them to the others
                json.dumps(command, ensure_ascii=False).encode("utf-8")
            index, records = state.dump()
            for key, value in records:
                _utf8(key)
                if isinstance(value, bytes):
                    value.decode("utf-8")     # raises if it is not UTF-8
                else:
                    _utf8(value)
        finally:
            globalLogPublisher.removeObserver(events.append)
            state.close()
    for event in events:
        _utf8(format_text(event))
        _utf8(format_json(event))
