"""A write resent with the same client_msg_id is applied once and answers as the first time."""

import pytest

from paxchat.state.chat import DEDUP_WINDOW_SECONDS, ChatState

from .server_support import Server

PW = "correct horse"


@pytest.fixture
def server(tmp_path):
    state = ChatState.open(tmp_path / "state.db")
    yield Server(state=state)
    state.close()


def logged_in(server, name):
    client = server.connect()
    client.ok("create_account", username=name, password=PW)
    client.ok("login", username=name, password=PW)
    return client


def test_read_messages_resent_with_its_key_returns_the_same_messages(server):
    alice, bob = logged_in(server, "alice"), logged_in(server, "bob")
    for body in ("one", "two", "three"):
        alice.ok("send_message", to="bob", body=body)
    first = bob.ok("read_messages", limit=2, client_msg_id="read-1")
    assert [m["body"] for m in first["messages"]] == ["one", "two"] and first["unread"] == 1
    # The answer was lost; the client resends it (here on a new connection of the same user).
    again = logged_in_again(server, "bob").ok("read_messages", limit=2, client_msg_id="read-1")
    assert again == first
    assert server.state.unread_count("bob") == 1
    # A new key is a new read.
    assert [m["body"] for m in bob.ok("read_messages", limit=2, client_msg_id="read-2")["messages"]] == ["three"]


def logged_in_again(server, name):
    client = server.connect()
    client.ok("login", username=name, password=PW)
    return client


def test_mark_read_and_delete_messages_resent_answer_the_first_count(server):
    alice, bob = logged_in(server, "alice"), logged_in(server, "bob")
    ids = [alice.ok("send_message", to="bob", body=b)["message_id"] for b in ("a", "b")]
    assert bob.ok("mark_read", ids=ids, client_msg_id="m") == {"marked": 2}
    assert bob.ok("mark_read", ids=ids, client_msg_id="m") == {"marked": 2}
    assert bob.ok("delete_messages", ids=ids, client_msg_id="d") == {"deleted": 2}
    assert bob.ok("delete_messages", ids=ids, client_msg_id="d") == {"deleted": 2}


def test_a_key_reused_for_another_kind_of_write_is_refused_and_the_write_not_done(server):
    frank = logged_in(server, "frank")
    frank.ok("read_messages", limit=1, client_msg_id="k")
    error = frank.call("logout", client_msg_id="k")["error"]
    assert error["code"] == "invalid_request" and "read_messages" in error["message"]
    assert frank.ok("read_messages", limit=1) == {"messages": [], "unread": 0}   # still logged in
    assert frank.error("delete_account", password=PW, client_msg_id="k") == "invalid_request"
    assert server.state.account("frank") is not None


def test_create_account_resent_with_its_key_answers_ok_not_taken(server):
    client = server.connect()
    assert client.ok("create_account", username="carol", password=PW, client_msg_id="c1") == {"username": "carol"}
    pw_hash = server.state.account("carol")["pw_hash"]
    assert server.connect().ok("create_account", username="carol", password=PW,
                               client_msg_id="c1") == {"username": "carol"}
    # Someone else's key, or no key, or another password: the name is taken.
    assert client.error("create_account", username="carol", password=PW, client_msg_id="c2") == "username_taken"
    assert client.error("create_account", username="carol", password=PW) == "username_taken"
    assert client.error("create_account", username="carol", password="other password",
                        client_msg_id="c1") == "username_taken"
    assert server.state.account("carol")["pw_hash"] == pw_hash
    assert client.ok("login", username="carol", password=PW)["unread"] == 0


def test_delete_account_resent_with_its_key_answers_ok(server):
    dave = logged_in(server, "dave")
    other = logged_in_again(server, "dave")
    assert dave.ok("delete_account", password=PW, client_msg_id="del") == {}
    assert server.state.account("dave") is None
    # Another connection of the ended session resending it is told the session ended.
    assert other.error("delete_account", password=PW, client_msg_id="del") == "not_logged_in"


def test_logout_carries_its_key_and_owner(server):
    erin = logged_in(server, "erin")
    assert erin.ok("logout", client_msg_id="bye") == {}


@pytest.mark.parametrize("op, args", [
    ("read_messages", {}), ("mark_read", {"ids": []}), ("delete_messages", {"ids": []}),
    ("logout", {}), ("delete_account", {"password": PW}),
])
@pytest.mark.parametrize("bad", [7, ["k"], "k" * 129])
def test_a_mistyped_key_is_rejected_and_changes_nothing(server, op, args, bad):
    frank = logged_in(server, "frank")
    before = server.state.digest()
    assert frank.error(op, client_msg_id=bad, **args) == "invalid_request"
    assert server.state.digest() == before
    assert frank.ok("history") == {"messages": [], "more": False}


@pytest.mark.parametrize("bad", [False, {"k": 1}, "k" * 129])
def test_create_account_with_a_mistyped_key_is_rejected(server, bad):
    assert server.connect().error("create_account", username="gina", password=PW,
                                  client_msg_id=bad) == "invalid_request"
    assert server.state.account("gina") is None


def test_a_keyed_write_is_recognized_for_a_day_of_the_servers_clock(server):
    logged_in(server, "alice")
    bob = logged_in(server, "bob")
    bob.ok("mark_read", ids=[], client_msg_id="old")
    server.clock.advance(DEDUP_WINDOW_SECONDS + 1)
    alice = logged_in_again(server, "alice")
    alice.ok("send_message", to="bob", body="hi", client_msg_id="new")   # expires "old"
    keys = [k for k, _ in server.state.dump()[1] if k.startswith("d/")]
    assert keys == ["d/alice/m/new"]
