"""Every op of the protocol and its errors, over StringTransport with a fake state."""

import json

import pytest

from paxchat.interfaces import Unavailable
from paxchat.limits import MAX_LIMIT
from paxchat.server.push import EventPusher
from paxchat.server.sessions import ConnectionRegistry, Session, token_hash
from paxchat.state.chat import ChatState

from .server_support import Server

PW = "correct horse"


@pytest.fixture
def server():
    return Server()


@pytest.fixture
def chat_server(tmp_path):
    """A Server over the real ChatState: for what depends on the apply's answers."""
    state = ChatState.open(tmp_path / "state.db")
    yield Server(state=state)
    state.close()


def account(server, name, password=PW):
    client = server.connect()
    assert client.ok("create_account", username=name, password=password) == {"username": name}
    return client


def logged_in(server, name, password=PW):
    client = server.connect()
    if server.state.account(name) is None:
        client.ok("create_account", username=name, password=password)
    result = client.ok("login", username=name, password=password)
    client.token = result["session"]
    return client


def test_hello(server):
    assert server.connect().ok("hello") == {
        "node": 1, "leader": 1, "protocol": 1,
        "nodes": [{"id": 1, "client": "127.0.0.1:7101"}, {"id": 2, "client": "127.0.0.1:7102"}],
    }


def test_hello_lists_the_addresses_a_reload_gave(server):
    server.factory.use_nodes([{"id": 1, "client": "127.0.0.1:7101"},
                              {"id": 2, "client": "10.0.0.9:7102"}])
    assert server.connect().ok("hello")["nodes"] == [
        {"id": 1, "client": "127.0.0.1:7101"}, {"id": 2, "client": "10.0.0.9:7102"}]


def test_answers_echo_string_and_int_ids(server):
    client = server.connect()
    assert client.answer(client.send(id="abc", op="hello"))["id"] == "abc"
    assert client.answer(client.send(id=2**70, op="hello"))["id"] == 2**70


def test_create_account_stores_a_bcrypt_hash_never_the_password(server):
    account(server, "alice")
    command = server.state.applied[0]
    assert command["op"] == "create_account" and command["pw_hash"].startswith("$2b$04$")
    assert PW not in repr(server.state.applied)


@pytest.mark.parametrize("name", ["", "a" * 33, "bad name", "é", "a/b", "a*"])
def test_create_account_rejects_bad_usernames(server, name):
    assert server.connect().error("create_account", username=name, password=PW) == "invalid_username"


@pytest.mark.parametrize("password", ["short", "x" * 1025, "é" * 513, "\ud800" * 8])
def test_create_account_rejects_bad_passwords(server, password):
    assert server.connect().error("create_account", username="bob", password=password) == "invalid_password"


def test_long_passwords_work(server):
    account(server, "bob", "é" * 512)
    logged_in(server, "bob", "é" * 512)
    assert server.connect().error("login", username="bob", password="é" * 511 + "e") == "bad_credentials"


def test_create_account_rejects_a_taken_name(server):
    account(server, "alice")
    assert server.connect().error("create_account", username="alice", password=PW) == "username_taken"


@pytest.mark.parametrize("args", [{}, {"username": "a"}, {"username": 1, "password": PW},
                                  {"username": "alice", "password": None}, {"username": ["a"], "password": PW}])
def test_create_account_mistyped_arguments(server, args):
    assert server.connect().error("create_account", **args) == "invalid_request"


def test_login_returns_a_token_and_unread_and_replicates_only_its_hash(server):
    account(server, "alice")
    client = server.connect()
    result = client.ok("login", username="alice", password=PW)
    assert set(result) == {"session", "unread"} and result["unread"] == 0
    command = server.state.applied[-1]
    assert command["op"] == "login" and command["session"] == token_hash(result["session"])
    assert result["session"] not in repr(server.state.applied)
    assert command["expires"] == command["ts"] + server.settings.session_ttl


@pytest.mark.parametrize("name,password", [("alice", "wrong password"), ("nobody", PW),
                                           ("not a name", PW), ("alice", "short")])
def test_login_bad_credentials(server, name, password):
    account(server, "alice")
    assert server.connect().error("login", username=name, password=password) == "bad_credentials"


def test_ops_needing_a_session_say_not_logged_in(server):
    client = server.connect()
    for op, args in [("logout", {}), ("list_accounts", {}), ("send_message", {"to": "a", "body": "x"}),
                     ("read_messages", {}), ("mark_read", {"ids": []}), ("history", {}),
                     ("delete_messages", {"ids": []}), ("delete_account", {"password": PW})]:
        assert client.error(op, **args) == "not_logged_in", op


def test_resume_attaches_a_new_connection_to_the_session(server):
    alice = logged_in(server, "alice")
    bob = logged_in(server, "bob")
    bob.ok("send_message", to="alice", body="hi")
    again = server.connect()
    assert again.ok("resume", session=alice.token) == {"username": "alice", "unread": 1}
    assert again.ok("read_messages")["messages"][0]["body"] == "hi"


@pytest.mark.parametrize("token", ["nope", "", "x" * 300])
def test_resume_unknown_session(server, token):
    assert server.connect().error("resume", session=token) == "bad_session"


def test_resume_mistyped(server):
    assert server.connect().error("resume", session=5) == "invalid_request"
    assert server.connect().error("resume") == "invalid_request"


def test_resume_an_expired_session(server):
    alice = logged_in(server, "alice")
    server.clock.advance(server.settings.session_ttl + 1)
    assert server.connect().error("resume", session=alice.token) == "bad_session"
    # The connection that held it is logged out too.
    assert alice.error("history") == "not_logged_in"


def test_logout_ends_the_session_everywhere_and_tells_the_others(server):
    alice = logged_in(server, "alice")
    other = server.connect()
    other.ok("resume", session=alice.token)
    assert alice.ok("logout") == {}
    assert alice.error("history") == "not_logged_in"
    assert alice.events() == []
    assert other.events() == [{"event": "session_ended", "reason": "logged_out"}]
    assert other.error("history") == "not_logged_in"
    assert server.connect().error("resume", session=alice.token) == "bad_session"


def test_list_accounts(server):
    viewer = logged_in(server, "viewer")
    for name in ["anna", "anton", "bert", "a.b", "a-c"]:
        account(server, name)
    assert viewer.ok("list_accounts") == {"accounts": ["a-c", "a.b", "anna", "anton", "bert", "viewer"],
                                          "more": False}
    assert viewer.ok("list_accounts", pattern="an*", limit=1) == {"accounts": ["anna"], "more": True}
    assert viewer.ok("list_accounts", pattern="an*", limit=1, after="anna") == {"accounts": ["anton"],
                                                                                 "more": False}
    assert viewer.ok("list_accounts", pattern="a?c")["accounts"] == ["a-c"]


@pytest.mark.parametrize("args", [{"limit": 0}, {"limit": 1001}, {"limit": True}, {"limit": "5"},
                                  {"pattern": 5}, {"pattern": ""}, {"pattern": "[a]"}, {"after": 3},
                                  {"limit": 1.0}])
def test_list_accounts_bad_arguments(server, args):
    assert logged_in(server, "viewer").error("list_accounts", **args) == "invalid_request"


def test_send_message_pushes_to_every_connection_of_the_recipient(server):
    alice = logged_in(server, "alice")
    alice2 = server.connect()
    alice2.ok("resume", session=alice.token)
    alice3 = logged_in(server, "alice")
    bob = logged_in(server, "bob")
    result = bob.ok("send_message", to="alice", body="hello")
    assert set(result) == {"message_id", "ts"} and isinstance(result["ts"], float)
    expected = {"event": "message", "message": {"id": result["message_id"], "from": "bob", "to": "alice",
                                                "body": "hello", "ts": result["ts"], "read": False}}
    for conn in (alice, alice2, alice3):
        assert conn.events() == [expected]
    assert bob.events() == []


def test_send_message_tells_the_senders_other_sessions_but_not_its_own(server):
    bob = logged_in(server, "bob")
    bob_resumed = server.connect()
    bob_resumed.ok("resume", session=bob.token)
    bob_laptop = logged_in(server, "bob")
    alice = logged_in(server, "alice")
    result = bob.ok("send_message", to="alice", body="hello", client_msg_id="m1")
    message = {"id": result["message_id"], "from": "bob", "to": "alice", "body": "hello",
               "ts": result["ts"], "read": False}
    assert alice.events() == [{"event": "message", "message": message}]
    assert bob_laptop.events() == [{"event": "sent", "message": message}]
    # The session that sent it has its answer, on each of its connections.
    assert bob.events() == [] and bob_resumed.events() == []
    # A retry answers the first send and tells no one again.
    assert bob_resumed.ok("send_message", to="alice", body="hello", client_msg_id="m1") == result
    assert len(alice.events()) == len(bob_laptop.events()) == 1
    assert bob.events() == [] and bob_resumed.events() == []


def test_a_message_to_oneself_comes_to_every_connection_once_as_message(server):
    bob = logged_in(server, "bob")
    bob_laptop = logged_in(server, "bob")
    result = bob.ok("send_message", to="bob", body="note to self")
    for conn in (bob, bob_laptop):
        assert [(e["event"], e["message"]["id"]) for e in conn.events()] == [("message", result["message_id"])]


def test_send_message_with_client_msg_id_is_idempotent_and_pushed_once(server):
    alice = logged_in(server, "alice")
    bob = logged_in(server, "bob")
    first = bob.ok("send_message", to="alice", body="once", client_msg_id="m1")
    server.clock.advance(5)
    assert bob.ok("send_message", to="alice", body="once", client_msg_id="m1") == first
    assert len(alice.events()) == 1
    assert alice.ok("read_messages")["unread"] == 0


@pytest.mark.parametrize("args,code", [
    ({"to": "ghost", "body": "x"}, "no_such_user"),
    ({"to": "not a name", "body": "x"}, "no_such_user"),
    ({"to": "alice", "body": "x" * 16385}, "body_too_large"),
    ({"to": "alice", "body": ""}, "invalid_request"),
    ({"to": "alice"}, "invalid_request"),
    ({"to": 7, "body": "x"}, "invalid_request"),
    ({"to": "alice", "body": ["x"]}, "invalid_request"),
    ({"to": "alice", "body": "\udc80"}, "invalid_request"),
    ({"to": "alice", "body": "x", "client_msg_id": 5}, "invalid_request"),
    ({"to": "alice", "body": "x", "client_msg_id": "c" * 129}, "invalid_request"),
])
def test_send_message_errors(server, args, code):
    logged_in(server, "alice")
    assert logged_in(server, "bob").error("send_message", **args) == code


def test_a_body_of_16384_characters_is_fine(server):
    logged_in(server, "alice")
    logged_in(server, "bob").ok("send_message", to="alice", body="é" * 16384)


def test_read_messages_mark_read_history_delete_messages(server):
    alice = logged_in(server, "alice")
    bob = logged_in(server, "bob")
    ids = [bob.ok("send_message", to="alice", body=f"m{n}")["message_id"] for n in range(5)]
    alice.ok("send_message", to="bob", body="reply")
    read = alice.ok("read_messages", limit=2)
    assert [m["body"] for m in read["messages"]] == ["m0", "m1"] and read["unread"] == 3
    assert alice.ok("mark_read", ids=ids[2:4] + [ids[2], 999]) == {"marked": 2}
    last = alice.ok("read_messages")
    assert last["unread"] == 0
    assert [(m["id"], m["from"], m["to"], m["body"], m["read"]) for m in last["messages"]] == [
        (ids[4], "bob", "alice", "m4", True)]
    history = alice.ok("history")["messages"]
    assert [m["body"] for m in history] == ["reply", "m4", "m3", "m2", "m1", "m0"]
    assert [m["body"] for m in alice.ok("history", peer="bob", before=ids[3], limit=2)["messages"]] == ["m2", "m1"]
    assert alice.ok("delete_messages", ids=ids[:2]) == {"deleted": 2}
    assert alice.ok("delete_messages", ids=ids[:2]) == {"deleted": 0}
    assert len(alice.ok("history")["messages"]) == 4


def test_what_one_session_reads_or_deletes_is_told_to_the_accounts_other_sessions(chat_server):
    server = chat_server
    alice = logged_in(server, "alice")
    alice_laptop = logged_in(server, "alice")
    bob = logged_in(server, "bob")
    ids = [bob.ok("send_message", to="alice", body=f"m{n}")["message_id"] for n in range(4)]
    pushed = len(alice_laptop.events())
    assert pushed == 4
    alice.ok("read_messages", limit=2)
    alice.ok("mark_read", ids=[ids[2], ids[2], 999])
    alice.ok("mark_read", ids=[ids[2]])              # nothing left to mark: no event
    alice.ok("delete_messages", ids=[ids[0], 999])
    alice.ok("delete_messages", ids=[ids[0]])        # already gone: no event
    alice.ok("read_messages")
    alice.ok("read_messages")                        # nothing unread: no event
    # Only the ids that were marked or deleted: 999 is nobody's.
    assert alice_laptop.events()[pushed:] == [
        {"event": "read", "ids": ids[:2]},
        {"event": "read", "ids": [ids[2]]},
        {"event": "deleted", "ids": [ids[0]], "unread": 1},   # ids[3] is left unread
        {"event": "read", "ids": [ids[3]]},
    ]
    # The session that did it has its answers. The sender hears what was
    # read, as `seen`, and loses the deleted message too.
    assert [e["event"] for e in alice.events()] == ["message"] * 4
    assert bob.events() == [
        {"event": "seen", "ids": ids[:2]},
        {"event": "seen", "ids": [ids[2]]},
        {"event": "deleted", "ids": [ids[0]], "unread": 0},
        {"event": "seen", "ids": [ids[3]]},
    ]


def test_the_sender_of_a_message_hears_once_that_it_was_read(chat_server):
    server = chat_server
    alice, alice_phone = logged_in(server, "alice"), logged_in(server, "alice")
    bob = logged_in(server, "bob")
    first = alice.ok("send_message", to="bob", body="one")["message_id"]
    second = alice.ok("send_message", to="bob", body="two")["message_id"]
    note = bob.ok("send_message", to="bob", body="note to self")["message_id"]
    before = {conn: len(conn.events()) for conn in (alice, alice_phone, bob)}
    assert bob.ok("mark_read", ids=[second, note, first], client_msg_id="r1") == {"marked": 3}
    assert bob.ok("mark_read", ids=[second, note, first], client_msg_id="r1") == {"marked": 3}
    told = {conn: conn.events()[before[conn]:] for conn in before}
    # Every session of the sender, once; the reader's own note tells no one.
    assert told[alice] == told[alice_phone] == [{"event": "seen", "ids": [second, first]}]
    assert told[bob] == []
    assert all(m["read"] for m in alice.ok("history")["messages"])


def report_every_node(server):
    """Apply version 1, as a leader moves it once every node's build knows it."""
    server.log.submit({"op": "set_apply_version", "version": 1})
    assert server.state.version() == 1


def test_settings_wait_for_the_upgrade_and_then_turn_read_receipts_off(chat_server):
    server = chat_server
    alice, alice_phone = logged_in(server, "alice"), logged_in(server, "alice")
    bob = logged_in(server, "bob")
    assert alice.ok("get_settings") == {"read_receipts": True}
    assert alice.error("set_settings", read_receipts=False) == "upgrade_in_progress"
    assert alice.ok("get_settings") == {"read_receipts": True}
    report_every_node(server)
    assert alice.error("set_settings", read_receipts="off") == "invalid_request"
    assert alice.error("set_settings") == "invalid_request"
    phone_heard = len(alice_phone.events())
    assert alice.ok("set_settings", read_receipts=False, client_msg_id="s1") == {"read_receipts": False}
    assert alice.ok("set_settings", read_receipts=False, client_msg_id="s1") == {"read_receipts": False}
    assert alice_phone.ok("get_settings") == {"read_receipts": False}
    # Her other session is told; the one that set it has its answer.
    assert alice_phone.events()[phone_heard:] == [
        {"event": "settings", "settings": {"read_receipts": False}}] * 2
    assert not any(e["event"] == "settings" for e in alice.events() + bob.events())
    assert bob.ok("get_settings") == {"read_receipts": True}
    # Bob's message read by alice: bob is not told, and his history shows it unread.
    message_id = bob.ok("send_message", to="alice", body="hi")["message_id"]
    before = len(bob.events())
    assert alice.ok("mark_read", ids=[message_id]) == {"marked": 1}
    assert bob.events()[before:] == []
    assert [m["read"] for m in bob.ok("history")["messages"]] == [False]
    assert [m["read"] for m in alice.ok("history")["messages"]] == [True]
    alice.ok("set_settings", read_receipts=True)
    assert [m["read"] for m in bob.ok("history")["messages"]] == [True]
    assert server.connect().error("get_settings") == "not_logged_in"


def test_a_deleted_message_goes_from_its_other_partys_sessions(chat_server):
    server = chat_server
    alice = logged_in(server, "alice")
    bob, bob_phone = logged_in(server, "bob"), logged_in(server, "bob")
    carol = logged_in(server, "carol")
    to_bob = alice.ok("send_message", to="bob", body="oops")["message_id"]
    kept = alice.ok("send_message", to="bob", body="still here")["message_id"]
    to_carol = alice.ok("send_message", to="carol", body="hi")["message_id"]
    to_self = alice.ok("send_message", to="alice", body="note")["message_id"]
    before = {conn: len(conn.events()) for conn in (alice, bob, bob_phone, carol)}
    assert alice.ok("delete_messages", ids=[to_self, to_bob, to_carol], client_msg_id="d1") == {"deleted": 3}
    # Resent (same client_msg_id): the stored answer, and no one is told again.
    assert alice.ok("delete_messages", ids=[to_self, to_bob, to_carol], client_msg_id="d1") == {"deleted": 3}
    told = {conn: conn.events()[before[conn]:] for conn in before}
    # With what each has unread after it: a client that never loaded an
    # unread message deleted this way can still count right.
    assert told[bob] == told[bob_phone] == [{"event": "deleted", "ids": [to_bob], "unread": 1}]
    assert told[carol] == [{"event": "deleted", "ids": [to_carol], "unread": 0}]
    assert told[alice] == []
    assert [m["id"] for m in bob.ok("history")["messages"]] == [kept]


def test_a_deleted_accounts_namesake_is_not_told_of_its_messages(chat_server):
    server = chat_server
    alice = logged_in(server, "alice")
    bob = logged_in(server, "bob")
    # Deleting an account removes what was sent to it; what it sent stays with alice.
    kept = bob.ok("send_message", to="alice", body="from the first bob")["message_id"]
    bob.ok("delete_account", password=PW)
    new_bob = logged_in(server, "bob")
    assert alice.ok("delete_messages", ids=[kept]) == {"deleted": 1}
    assert new_bob.events() == []


def test_a_deleted_accounts_messages_go_from_their_senders_sessions(chat_server):
    server = chat_server
    alice, carol, bob = (logged_in(server, name) for name in ("alice", "carol", "bob"))
    to_bob = [alice.ok("send_message", to="bob", body=f"a{n}")["message_id"] for n in range(2)]
    from_carol = carol.ok("send_message", to="bob", body="c")["message_id"]
    from_bob = bob.ok("send_message", to="alice", body="b")["message_id"]
    bob.ok("send_message", to="bob", body="note")
    before = {conn: len(conn.events()) for conn in (alice, carol)}
    assert bob.ok("delete_account", password=PW) == {}
    assert alice.events()[before[alice]:] == [{"event": "deleted", "ids": to_bob, "unread": 1}]
    assert carol.events()[before[carol]:] == [{"event": "deleted", "ids": [from_carol], "unread": 0}]
    # What bob sent stays with its recipient.
    assert [m["id"] for m in alice.ok("history")["messages"]] == [from_bob]


def test_ids_past_a_requests_limit_come_in_several_events():
    """A deleted account's senders may have sent it any number of messages."""
    class Conn:
        session = None

        def __init__(self):
            self.events = []

        def send_event(self, event):
            self.events.append(event)
    registry = ConnectionRegistry()
    alice = Conn()
    registry.attach(alice, Session("alice", "hash-a", 1e12))
    ids = list(range(1, MAX_LIMIT * 2 + 501))
    EventPusher(registry)({"op": "delete_account", "username": "bob", "session": "hash-b"},
                          {"ok": True, "result": {}, "effect": {"others": {"alice": ids}}})
    assert [len(e["ids"]) for e in alice.events] == [MAX_LIMIT, MAX_LIMIT, 500]
    assert [i for e in alice.events for i in e["ids"]] == ids


@pytest.mark.parametrize("op,args", [
    ("read_messages", {"limit": 0}), ("read_messages", {"limit": False}), ("read_messages", {"limit": 10**30}),
    ("mark_read", {}), ("mark_read", {"ids": 1}), ("mark_read", {"ids": [True]}), ("mark_read", {"ids": ["1"]}),
    ("mark_read", {"ids": [-1]}), ("mark_read", {"ids": [2**63]}), ("mark_read", {"ids": list(range(1001))}),
    ("delete_messages", {"ids": [1.5]}), ("delete_messages", {"ids": {"a": 1}}),
    ("history", {"peer": 3}), ("history", {"peer": "no way"}), ("history", {"before": "9"}),
    ("history", {"before": 0}), ("history", {"limit": 5000}),
])
def test_message_ops_reject_bad_arguments(server, op, args):
    assert logged_in(server, "alice").error(op, **args) == "invalid_request"


def test_delete_account_needs_the_password_and_ends_every_session(server):
    alice = logged_in(server, "alice")
    other = logged_in(server, "alice")
    third = server.connect()
    third.ok("resume", session=alice.token)
    assert alice.error("delete_account", password="not the one") == "bad_credentials"
    assert alice.error("delete_account", password=7) == "invalid_request"
    assert alice.ok("delete_account", password=PW) == {}
    assert alice.events() == []
    for conn in (other, third):
        assert conn.events() == [{"event": "session_ended", "reason": "account_deleted"}]
        assert conn.error("history") == "not_logged_in"
    assert alice.error("history") == "not_logged_in"
    assert server.connect().error("login", username="alice", password=PW) == "bad_credentials"
    # The name can be taken again.
    account(server, "alice", "another password")


def test_history_with_a_peer_tells_when_its_account_was_created(chat_server):
    alice = logged_in(chat_server, "alice")
    logged_in(chat_server, "bob")
    created = chat_server.state.account("bob")["created"]
    assert alice.ok("history", peer="bob") == {"messages": [], "more": False, "peer_created": created}
    assert alice.ok("history") == {"messages": [], "more": False}
    assert alice.ok("history", peer="nobody")["peer_created"] is None


def test_a_write_whose_session_ended_underneath_logs_the_connection_out(server):
    alice = logged_in(server, "alice")
    # The session vanishes from the state without this node's connection hearing of it.
    server.state.sessions.clear()
    assert alice.error("send_message", to="alice", body="x") == "not_logged_in"
    assert alice.proto.session is None


def test_unknown_op_and_bad_op(server):
    client = server.connect()
    assert client.error("fly") == "unknown_op"
    # Commands only a node makes are not ops of the client port.
    assert client.error("set_apply_version", version=99) == "unknown_op"
    assert client.answer(client.send(op=5)) ["error"]["code"] == "invalid_request"
    assert client.answer(client.send(op=None))["error"]["code"] == "invalid_request"


def test_unavailable_when_the_log_cannot_commit(server):
    client = logged_in(server, "alice")

    def fail(command):
        from twisted.internet import defer
        return defer.fail(Unavailable("no quorum"))

    server.log.submit = fail
    assert client.error("send_message", to="alice", body="x") == "unavailable"
    assert client.ok("hello")["protocol"] == 1


def test_an_unexpected_exception_is_internal_and_the_server_keeps_serving(server):
    client = logged_in(server, "alice")

    def broken(*args):
        raise KeyError("bug")

    server.state.history = broken
    assert client.error("history") == "internal"
    assert client.ok("hello")["protocol"] == 1
    assert server.connect().ok("hello")["protocol"] == 1


def test_internal_errors_never_log_passwords_or_tokens(server):
    from twisted.logger import globalLogPublisher
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        account(server, "alice")
        token = logged_in(server, "alice").token

        def broken(*args):
            raise RuntimeError("bug")

        server.state.account = broken
        client = server.connect()
        assert client.error("login", username="alice", password=PW) == "internal"
        assert client.error("create_account", username="zed", password=PW) == "internal"
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert events, "the internal error was logged"
    from twisted.logger import formatEvent
    text = repr(events) + "".join(formatEvent(e) for e in events)
    assert PW not in text and token not in text


def test_requests_after_a_login_wait_for_it(server):
    from .server_support import HeldWorker
    server = Server(worker_class=HeldWorker)
    client = server.connect()
    client.send(id="c", op="create_account", username="alice", password=PW)
    server.worker.release_all()
    lines = b"".join(json.dumps(r).encode() + b"\n" for r in [
        {"id": "login", "op": "login", "username": "alice", "password": PW},
        {"id": "send", "op": "send_message", "to": "alice", "body": "to myself"},
        {"id": "hello", "op": "hello"},
    ])
    client.send_line(lines)
    assert [m["id"] for m in client.received()] == ["c"]  # all three wait on the login
    server.worker.release_all()
    server.worker.release_all()
    assert [m.get("id") for m in client.received()] == ["c", "login", "hello", None, "send"]
    assert client.answer("send")["ok"] is True


def test_login_on_a_logged_in_connection_switches_sessions(server):
    alice = logged_in(server, "alice")
    old = alice.token
    logged_in(server, "bob")
    bob_token = alice.ok("login", username="bob", password=PW)["session"]
    assert alice.proto.session.username == "bob"
    assert alice.proto not in server.factory.registry.of_user("alice")
    assert server.connect().ok("resume", session=old)["username"] == "alice"
    assert alice.ok("resume", session=old)["username"] == "alice"
    assert alice.proto not in server.factory.registry.of_user("bob")
    assert bob_token


def test_a_failed_login_or_resume_leaves_the_connection_in_its_session(server):
    alice = logged_in(server, "alice")
    logged_in(server, "bob")
    assert alice.error("login", username="bob", password="wrong-password") == "bad_credentials"
    assert alice.error("resume", session="no-such-token") == "bad_session"
    assert alice.proto.session.username == "alice"
    assert alice.ok("list_accounts", pattern="alice") == {"accounts": ["alice"], "more": False}


def test_hello_while_there_is_no_leader(server):
    server.log.leader_id = lambda: None
    assert server.connect().ok("hello")["leader"] is None


def test_settings_from_a_cluster_config():
    from paxchat.config import loads
    from paxchat.server import ServerSettings
    config = loads("[cluster]\nbcrypt_cost = 5\nsession_ttl = 60\n"
                   "[node.2]\nclient = [::1]:7102\npeer = [::1]:7202\n"
                   "[node.1]\nclient = 127.0.0.1:7101\npeer = 127.0.0.1:7201\n")
    settings = ServerSettings.from_config(config, 2)
    assert settings.node_id == 2
    assert settings.nodes == ({"id": 1, "client": "127.0.0.1:7101"}, {"id": 2, "client": "[::1]:7102"})
    assert settings.bcrypt_cost == 5 and settings.session_ttl == 60
    assert ServerSettings.from_config(config, 1, max_pending_per_connection=3).max_pending_per_connection == 3
