"""ChatState: every command's rules, the reads, determinism and crash safety."""

import fnmatch
import sqlite3
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.logger import capturedLogs

from paxchat.state import chat
from paxchat.state.chat import (
    DEDUP_WINDOW_SECONDS, MAX_ANSWER_MESSAGE_BYTES, MAX_BODY_CHARS, ChatState, glob_literal_prefix,
)
from paxchat.state.kv import SNAPSHOT_CHUNK_BYTES, SnapshotError, StoreError


@pytest.fixture
def state(tmp_path):
    s = ChatState.open(tmp_path / "state.db")
    yield s
    s.close()


def ok(response):
    assert response["ok"] is True, response
    return response["result"]


def code(response):
    assert response["ok"] is False, response
    return response["error"]["code"]


def create(state, name, pw="hash-" + "x", ts=1.0):
    return state.apply({"op": "create_account", "username": name, "pw_hash": pw, "ts": ts})


def login(state, name, session=None, pw="hash-x", ts=2.0, expires=1e12):
    session = session or "s-" + name
    return state.apply({"op": "login", "username": name, "pw_hash": pw, "session": session,
                        "ts": ts, "expires": expires})


def user(state, name):
    """Create and log in ``name``; returns its session hash."""
    ok(create(state, name))
    ok(login(state, name))
    return "s-" + name


def send(state, sender, to, body="hello", ts=3.0, cmid=None, session=None):
    return state.apply({"op": "send_message", "session": session or "s-" + sender,
                        "from": sender, "to": to, "body": body, "ts": ts,
                        "client_msg_id": cmid})


def op(state, name, who, **fields):
    return state.apply(dict({"op": name, "session": "s-" + who, "username": who}, **fields))


def ids(messages):
    return [m["id"] for m in messages]


# -- accounts ---------------------------------------------------------------------

def test_create_account(state):
    assert ok(create(state, "alice", pw="h1", ts=5.0)) == {"username": "alice"}
    assert state.account("alice") == {"username": "alice", "pw_hash": "h1", "created": 5.0}
    assert state.account("bob") is None
    assert state.applied_index() == 1


def test_create_account_rejects_taken_name(state):
    ok(create(state, "alice", pw="h1"))
    assert code(create(state, "alice", pw="h2")) == "username_taken"
    assert state.account("alice")["pw_hash"] == "h1"
    assert state.applied_index() == 2  # failed commands still use their index


def test_usernames_are_case_sensitive(state):
    ok(create(state, "alice"))
    ok(create(state, "Alice"))
    assert state.list_accounts() == (["Alice", "alice"], False)


@pytest.mark.parametrize("name", ["", "a" * 33, "a b", "a/b", "é", "a\n", "a*", "ä", "a\x00"])
def test_create_account_revalidates_username(state, name):
    assert code(create(state, name)) == "invalid_username"
    assert state.dump()[1] == []


@pytest.mark.parametrize("name", ["a", "a" * 32, "A.b-c_9", "...", "-", "_"])
def test_valid_usernames(state, name):
    assert ok(create(state, name)) == {"username": name}


# -- sessions -------------------------------------------------------------------------

def test_login_records_session(state):
    ok(create(state, "alice"))
    assert ok(login(state, "alice", session="abc", expires=99.0)) == {"unread": 0}
    assert state.session("abc") == {"username": "alice", "expires": 99.0}
    assert state.sessions_of("alice") == ["abc"]
    assert state.session("nope") is None


def test_login_reports_unread(state):
    user(state, "alice")
    ok(create(state, "bob"))
    ok(send(state, "alice", "bob"))
    ok(send(state, "alice", "bob"))
    assert ok(login(state, "bob")) == {"unread": 2}


def test_login_bad_credentials(state):
    ok(create(state, "alice", pw="h1"))
    assert code(login(state, "alice", pw="other")) == "bad_credentials"
    assert code(login(state, "ghost")) == "bad_credentials"
    assert state.sessions_of("alice") == []


def test_login_after_account_recreated_with_new_hash_fails(state):
    s = user(state, "alice")
    ok(op(state, "delete_account", "alice", pw_hash="hash-x"))
    ok(create(state, "alice", pw="new"))
    assert code(login(state, "alice", pw="hash-x")) == "bad_credentials"
    assert state.session(s) is None


def test_login_drops_expired_sessions_of_that_user(state):
    ok(create(state, "alice"))
    ok(login(state, "alice", session="old", ts=1.0, expires=10.0))
    ok(login(state, "alice", session="live", ts=2.0, expires=100.0))
    ok(login(state, "alice", session="new", ts=20.0, expires=200.0))
    assert sorted(state.sessions_of("alice")) == ["live", "new"]
    assert state.session("old") is None


def test_logout(state):
    s = user(state, "alice")
    assert ok(state.apply({"op": "logout", "session": s})) == {}
    assert state.session(s) is None
    assert state.sessions_of("alice") == []
    assert code(state.apply({"op": "logout", "session": s})) == "bad_session"


def test_session_of_another_user_is_refused(state):
    user(state, "alice")
    user(state, "bob")
    assert code(send(state, "bob", "alice", session="s-alice")) == "bad_session"
    assert code(state.apply({"op": "read_messages", "session": "s-alice",
                             "username": "bob", "limit": 5})) == "bad_session"
    assert code(state.apply({"op": "logout", "session": "s-alice",
                             "username": "bob"})) == "bad_session"


@pytest.mark.parametrize("command", [
    {"op": "send_message", "from": "alice", "to": "alice", "body": "x", "ts": 1.0,
     "client_msg_id": None},
    {"op": "read_messages", "username": "alice", "limit": 1},
    {"op": "mark_read", "username": "alice", "ids": [1]},
    {"op": "delete_messages", "username": "alice", "ids": [1]},
    {"op": "delete_account", "username": "alice", "pw_hash": "hash-x"},
    {"op": "logout"},
])
def test_commands_with_ended_session_fail(state, command):
    user(state, "alice")
    ok(state.apply({"op": "logout", "session": "s-alice"}))
    before = state.dump()[1]
    assert code(state.apply(dict(command, session="s-alice"))) == "bad_session"
    assert state.dump()[1] == before


# -- messages -------------------------------------------------------------------------

def test_send_message(state):
    user(state, "alice")
    ok(create(state, "bob"))
    assert ok(send(state, "alice", "bob", "hi", ts=7.5)) == {"message_id": 1, "ts": 7.5}
    assert ok(send(state, "alice", "bob", "again", ts=8.0)) == {"message_id": 2, "ts": 8.0}
    assert state.unread_count("bob") == 2
    assert state.unread_count("alice") == 0
    assert state.message(1) == {"id": 1, "from": "alice", "to": "bob", "body": "hi",
                                "ts": 7.5, "read": False}


def test_send_to_missing_user(state):
    user(state, "alice")
    before = state.dump()[1]
    assert code(send(state, "alice", "ghost")) == "no_such_user"
    assert code(send(state, "alice", "bad/name")) == "no_such_user"
    assert state.dump()[1] == before


def test_send_body_rules(state):
    user(state, "alice")
    assert code(send(state, "alice", "alice", "")) == "invalid_request"
    assert code(send(state, "alice", "alice", "x" * 16385)) == "body_too_large"
    assert ok(send(state, "alice", "alice", "é" * 16384))["message_id"] == 1


def test_send_to_self(state):
    user(state, "alice")
    ok(send(state, "alice", "alice", "note"))
    assert state.unread_count("alice") == 1
    assert ids(state.history("alice")) == [1]
    assert ids(state.history("alice", peer="alice")) == [1]
    assert ok(op(state, "delete_messages", "alice", ids=[1])) == {"deleted": 1}
    assert state.unread_count("alice") == 0
    assert state.history("alice") == []


def test_send_dedup_by_client_msg_id(state):
    user(state, "alice")
    user(state, "bob")
    first = ok(send(state, "alice", "bob", "one", ts=1.0, cmid="c1"))
    ok(send(state, "alice", "bob", "two", ts=2.0, cmid="c2"))
    again = ok(send(state, "alice", "bob", "one", ts=9.0, cmid="c1"))
    assert again == first == {"message_id": 1, "ts": 1.0}
    assert state.unread_count("bob") == 2
    # The same client_msg_id from another sender is another message.
    assert ok(send(state, "bob", "alice", "x", cmid="c1"))["message_id"] == 3


def test_send_dedup_answers_even_after_recipient_is_gone(state):
    user(state, "alice")
    user(state, "bob")
    first = ok(send(state, "alice", "bob", cmid="c1"))
    ok(op(state, "delete_account", "bob", pw_hash="hash-x"))
    assert ok(send(state, "alice", "bob", cmid="c1")) == first


def test_message_ids_increase_in_commit_order(state):
    user(state, "alice")
    responses = state.apply_entries(
        [(state.applied_index() + i, [
            {"op": "send_message", "session": "s-alice", "from": "alice", "to": "alice",
             "body": str(i), "ts": 100.0 - i, "client_msg_id": None}] * 2) for i in (1, 2, 3)])
    got = [r["result"]["message_id"] for entry in responses for r in entry]
    assert got == [1, 2, 3, 4, 5, 6]


def test_read_messages_oldest_first_and_marks_read(state):
    user(state, "alice")
    user(state, "bob")
    for i in range(5):
        ok(send(state, "alice", "bob", f"m{i}", ts=float(i)))
    result = ok(op(state, "read_messages", "bob", limit=2))
    assert [m["body"] for m in result["messages"]] == ["m0", "m1"]
    assert all(m["read"] for m in result["messages"])
    assert result["unread"] == 3
    assert state.unread_count("bob") == 3
    result = ok(op(state, "read_messages", "bob", limit=10))
    assert ids(result["messages"]) == [3, 4, 5]
    assert result["unread"] == 0
    assert ok(op(state, "read_messages", "bob", limit=10)) == {"messages": [], "unread": 0}
    assert state.message(1)["read"] is True


def test_reads_stop_at_the_answer_size_limit_and_leave_the_rest(state):
    user(state, "alice")
    user(state, "bob")
    body = "\U0001F600" * MAX_BODY_CHARS     # 12 bytes a character once escaped
    for i in range(8):
        ok(send(state, "alice", "bob", body, ts=float(i)))
    per_message = 12 * MAX_BODY_CHARS
    fit = MAX_ANSWER_MESSAGE_BYTES // per_message
    assert 1 <= fit < 8
    page = state.history_page("bob", limit=1000)
    assert ids(page["messages"]) == list(range(8, 8 - fit, -1)) and page["more"] is True
    rest = state.history_page("bob", before=page["messages"][-1]["id"], limit=1000)
    assert fit >= 4 and rest == {"messages": state.history("bob", before=8 - fit + 1, limit=8),
                                 "more": False}
    assert ids(rest["messages"]) == list(range(8 - fit, 0, -1))
    result = ok(op(state, "read_messages", "bob", limit=1000))
    assert ids(result["messages"]) == list(range(1, fit + 1))
    assert result["unread"] == 8 - fit == state.unread_count("bob")
    assert state.message(fit + 1)["read"] is False


def test_a_message_over_the_answer_size_limit_still_comes_alone(state, monkeypatch):
    monkeypatch.setattr(chat, "MAX_ANSWER_MESSAGE_BYTES", 100)
    user(state, "alice")
    for i in range(3):
        ok(send(state, "alice", "alice", "x" * 200))
    page = state.history_page("alice")
    assert ids(page["messages"]) == [3] and page["more"] is True
    assert ids(ok(op(state, "read_messages", "alice", limit=10))["messages"]) == [1]


def test_history_says_whether_older_messages_are_left(state):
    user(state, "alice")
    for i in range(3):
        ok(send(state, "alice", "alice"))
    assert state.history_page("alice", limit=2)["more"] is True
    assert state.history_page("alice", limit=3) == {"messages": state.history("alice"), "more": False}
    assert state.history_page("alice", before=2, limit=1) == {"messages": [state.message(1)], "more": False}


def test_read_messages_limit_zero(state):
    user(state, "alice")
    ok(send(state, "alice", "alice"))
    assert ok(op(state, "read_messages", "alice", limit=0)) == {"messages": [], "unread": 1}


def test_mark_read_only_own_unread_messages(state):
    user(state, "alice")
    user(state, "bob")
    ok(send(state, "alice", "bob"))   # 1: to bob
    ok(send(state, "bob", "alice"))   # 2: to alice
    ok(send(state, "alice", "bob"))   # 3: to bob
    assert ok(op(state, "mark_read", "bob", ids=[1, 2, 1, 99, -4, 0, 2 ** 80])) == {"marked": 1}
    assert state.message(1)["read"] is True
    assert state.message(2)["read"] is False
    assert state.unread_count("bob") == 1
    assert state.unread_count("alice") == 1
    assert ok(op(state, "mark_read", "bob", ids=[1])) == {"marked": 0}
    assert ok(op(state, "mark_read", "bob", ids=[])) == {"marked": 0}


def test_delete_messages_sent_or_received_for_both_sides(state):
    user(state, "alice")
    user(state, "bob")
    user(state, "carol")
    ok(send(state, "alice", "bob"))    # 1
    ok(send(state, "bob", "alice"))    # 2
    ok(send(state, "carol", "bob"))    # 3
    assert ok(op(state, "delete_messages", "alice", ids=[1, 2, 3, 3, 42])) == {"deleted": 2}
    assert state.message(1) is None and state.message(2) is None
    assert state.message(3) is not None
    assert ids(state.history("bob")) == [3]
    assert state.history("alice") == []
    assert state.history("bob", peer="alice") == []
    assert state.unread_count("bob") == 1   # message 1 was unread: counter follows
    assert state.unread_count("alice") == 0
    assert ids(ok(op(state, "read_messages", "bob", limit=10))["messages"]) == [3]


def test_what_a_command_marked_or_deleted_comes_beside_its_answer_once(state):
    """The ``effect`` the node tells connections of: never stored, so a resend has none."""
    user(state, "alice")
    user(state, "bob")
    ok(send(state, "alice", "bob"))    # 1
    ok(send(state, "bob", "alice"))    # 2
    ok(send(state, "alice", "alice"))  # 3
    marked = op(state, "mark_read", "bob", ids=[2, 1, 1, 99], dedup="m")
    assert marked["effect"] == {"ids": [1], "senders": {"alice": [1]}} and ok(marked) == {"marked": 1}
    assert op(state, "mark_read", "bob", ids=[2, 1, 1, 99], dedup="m") == {"ok": True, "result": {"marked": 1}}
    assert "effect" not in op(state, "mark_read", "bob", ids=[1])
    read = op(state, "read_messages", "alice", limit=10)
    assert read["effect"] == {"ids": [2, 3], "senders": {"bob": [2]}}      # 3: her own, to herself
    assert "effect" not in op(state, "read_messages", "alice", limit=10)
    deleted = op(state, "delete_messages", "alice", ids=[3, 2, 1, 42], dedup="d")
    # With the unread count after it of each account told.
    assert deleted["effect"] == {"ids": [3, 2, 1], "others": {"bob": [2, 1]}, "unread": {"alice": 0, "bob": 0}}
    assert op(state, "delete_messages", "alice", ids=[3, 2, 1, 42], dedup="d") == {"ok": True, "result": {"deleted": 3}}
    assert "effect" not in op(state, "delete_messages", "alice", ids=[3])
    ok(send(state, "alice", "bob"))    # 4
    ok(send(state, "bob", "alice"))    # 5: stays with alice
    ok(send(state, "bob", "bob"))      # 6
    gone = op(state, "delete_account", "bob", pw_hash="hash-x")
    assert gone == {"ok": True, "result": {}, "effect": {"others": {"alice": [4]}, "unread": {"alice": 1}}}
    # A new bob is not told that the first one's message was read.
    user(state, "bob")
    assert op(state, "mark_read", "alice", ids=[5])["effect"] == {"ids": [5], "senders": {}}
    assert not any(b"effect" in value for _key, value in state.dump()[1])


def test_delete_read_message_keeps_counts(state):
    user(state, "alice")
    user(state, "bob")
    ok(send(state, "alice", "bob"))
    ok(send(state, "alice", "bob"))
    ok(op(state, "mark_read", "bob", ids=[1]))
    ok(op(state, "delete_messages", "bob", ids=[1]))
    assert state.unread_count("bob") == 1


# -- history ---------------------------------------------------------------------------

def test_history_newest_first_with_peer_and_paging(state):
    for name in ("alice", "bob", "carol"):
        user(state, name)
    ok(send(state, "alice", "bob"))    # 1
    ok(send(state, "bob", "alice"))    # 2
    ok(send(state, "carol", "alice"))  # 3
    ok(send(state, "alice", "carol"))  # 4
    ok(send(state, "bob", "carol"))    # 5
    assert ids(state.history("alice")) == [4, 3, 2, 1]
    assert ids(state.history("alice", peer="bob")) == [2, 1]
    assert ids(state.history("alice", peer="carol")) == [4, 3]
    assert ids(state.history("alice", before=4)) == [3, 2, 1]
    assert ids(state.history("alice", before=3, limit=1)) == [2]
    assert ids(state.history("alice", before=1)) == []
    assert ids(state.history("alice", before=2 ** 70)) == [4, 3, 2, 1]
    assert ids(state.history("alice", limit=2)) == [4, 3]
    assert ids(state.history("carol")) == [5, 4, 3]
    assert state.history("alice", peer="nobody") == []
    assert state.history("nobody") == []
    assert state.history("a/b") == []
    assert state.history("alice")[0] == {"id": 4, "from": "alice", "to": "carol",
                                         "body": "hello", "ts": 3.0, "read": False}


def test_history_with_a_peer_says_when_its_account_was_created(state):
    # Messages with an earlier account of the name are older than that.
    user(state, "alice")
    ok(create(state, "bob", ts=10.0))
    ok(login(state, "bob"))
    ok(send(state, "bob", "alice", ts=11.0))
    assert state.history_page("alice", peer="bob")["peer_created"] == 10.0
    assert "peer_created" not in state.history_page("alice")
    ok(state.apply({"op": "delete_account", "session": "s-bob", "username": "bob",
                    "pw_hash": "hash-x"}))
    page = state.history_page("alice", peer="bob")
    assert page["peer_created"] is None and ids(page["messages"]) == [1]
    ok(create(state, "bob", ts=50.0))
    ok(login(state, "bob", session="s-bob-2"))
    ok(send(state, "bob", "alice", ts=51.0, session="s-bob-2"))
    page = state.history_page("alice", peer="bob")
    assert page["peer_created"] == 50.0
    assert [m["ts"] for m in page["messages"]] == [51.0, 11.0]
    assert state.history_page("alice", peer="nobody")["peer_created"] is None


def test_history_of_names_sharing_a_prefix_stays_apart(state):
    user(state, "al")
    user(state, "al.x")
    user(state, "al_")
    ok(send(state, "al.x", "al_"))
    assert state.history("al") == []
    assert ids(state.history("al_", peer="al.x")) == [1]
    assert state.history("al_", peer="al") == []


# -- delete_account ------------------------------------------------------------------

def test_delete_account_needs_matching_hash(state):
    user(state, "alice")
    assert code(op(state, "delete_account", "alice", pw_hash="wrong")) == "bad_credentials"
    assert state.account("alice") is not None


def test_delete_account_removes_account_sessions_and_received_messages(state):
    user(state, "alice")
    user(state, "bob")
    ok(login(state, "alice", session="second"))
    ok(send(state, "bob", "alice", "to alice"))    # 1: removed
    ok(send(state, "alice", "bob", "from alice"))  # 2: stays with bob
    ok(send(state, "alice", "alice", "self"))      # 3: removed
    ok(send(state, "alice", "bob", cmid="c9"))     # 4: stays
    assert ok(op(state, "delete_account", "alice", pw_hash="hash-x")) == {}
    assert state.account("alice") is None
    assert state.session("s-alice") is None and state.session("second") is None
    assert state.sessions_of("alice") == []
    assert state.unread_count("alice") == 0
    assert state.message(1) is None and state.message(3) is None
    assert state.message(2)["from"] == "alice"
    assert ids(state.history("bob")) == [4, 2]
    assert ids(state.history("bob", peer="alice")) == [4, 2]
    assert state.unread_count("bob") == 2
    # What is left: bob's index of what alice sent him, and the time index of
    # alice's send dedup entry, which goes when it expires.
    leftovers = [k for k, _ in state.dump()[1] if "/alice/" in k or k.endswith("/alice")]
    assert leftovers == ["p/bob/alice/0000000000000002", "p/bob/alice/0000000000000004",
                         "x/000000000bb8/alice/m/c9"]


def test_name_reuse_does_not_inherit_old_messages(state):
    user(state, "alice")
    user(state, "bob")
    ok(send(state, "alice", "bob", "old from alice", cmid="c1"))  # 1
    ok(send(state, "bob", "alice", "old to alice"))               # 2
    ok(op(state, "delete_account", "alice", pw_hash="hash-x"))
    user(state, "alice")
    assert state.unread_count("alice") == 0
    assert state.history("alice") == []
    assert state.history("alice", peer="bob") == []
    assert ok(op(state, "read_messages", "alice", limit=10))["messages"] == []
    # The old account's messages are not the new one's to delete or mark.
    assert ok(op(state, "delete_messages", "alice", ids=[1, 2])) == {"deleted": 0}
    assert ok(op(state, "mark_read", "alice", ids=[1])) == {"marked": 0}
    assert state.message(1)["body"] == "old from alice"
    # Its send dedup starts fresh too.
    assert ok(send(state, "alice", "bob", "new", cmid="c1"))["message_id"] == 3
    # bob can still delete the old message; the new alice is untouched.
    ok(send(state, "bob", "alice", "hi new"))  # 4
    assert ok(op(state, "delete_messages", "bob", ids=[1])) == {"deleted": 1}
    assert ids(state.history("alice")) == [4, 3]


# -- generic dedup -------------------------------------------------------------------

def test_generic_dedup_returns_first_response_and_changes_nothing(state):
    user(state, "alice")
    ok(send(state, "alice", "alice"))
    ok(send(state, "alice", "alice"))
    command = {"op": "read_messages", "session": "s-alice", "username": "alice",
               "limit": 1, "dedup": "r1"}
    first = state.apply(command)
    before = state.dump()[1]
    again = state.apply(command)
    assert ok(again) == ok(first) and "effect" not in again     # nobody is told twice
    assert state.dump()[1] == before
    assert ids(ok(state.apply(dict(command, dedup="r2")))["messages"]) == [2]


def test_generic_dedup_for_create_account_and_logout(state):
    command = {"op": "create_account", "username": "alice", "pw_hash": "hash-x", "ts": 1.0,
               "dedup": "c"}
    assert ok(state.apply(command)) == {"username": "alice"}
    assert ok(state.apply(command)) == {"username": "alice"}
    ok(login(state, "alice"))
    logout = {"op": "logout", "session": "s-alice", "username": "alice", "dedup": "l"}
    assert ok(state.apply(logout)) == {}
    assert ok(state.apply(logout)) == {}


def test_generic_dedup_for_delete_account_survives_the_deletion(state):
    user(state, "alice")
    command = {"op": "delete_account", "session": "s-alice", "username": "alice",
               "pw_hash": "hash-x", "dedup": "bye"}
    assert ok(state.apply(command)) == {}
    assert ok(state.apply(command)) == {}


def test_a_key_used_by_another_kind_of_write_is_refused_and_changes_nothing(state):
    user(state, "alice")
    ok(send(state, "alice", "alice"))
    ok(op(state, "read_messages", "alice", limit=1, dedup="k"))
    before = state.dump()[1]
    for name, fields in (("logout", {}), ("mark_read", {"ids": [1]}),
                         ("delete_messages", {"ids": [1]}),
                         ("delete_account", {"pw_hash": "hash-x"})):
        answer = op(state, name, "alice", dedup="k", **fields)
        assert code(answer) == "invalid_request"
        assert "read_messages" in answer["error"]["message"]
    assert state.dump()[1] == before
    assert state.session("s-alice") is not None and state.account("alice") is not None


def test_a_key_remembered_without_its_op_still_answers_a_resend(state):
    # Entries written before the op was kept with them.
    user(state, "alice")
    with state.kv.transaction():
        state.kv.put("d/alice/g/old", b'{"result":{}}')
    assert ok(op(state, "logout", "alice", dedup="old")) == {}
    assert state.session("s-alice") is not None


def test_failed_command_records_no_dedup(state):
    user(state, "alice")
    command = {"op": "send_message", "session": "s-alice", "from": "alice", "to": "bob",
               "body": "x", "ts": 1.0, "client_msg_id": "c", "dedup": "d"}
    assert code(state.apply(command)) == "no_such_user"
    ok(create(state, "bob"))
    assert ok(state.apply(command))["message_id"] == 1


DAY = DEDUP_WINDOW_SECONDS


def dedup_keys(state):
    return sorted(k for k, _ in state.dump()[1] if k.startswith(("d/", "x/")))


def test_a_resend_is_recognized_for_the_whole_window_then_forgotten(state):
    user(state, "alice")
    user(state, "bob")
    first = ok(send(state, "alice", "bob", ts=10.0, cmid="m1"))
    read = {"op": "read_messages", "session": "s-alice", "username": "alice", "limit": 5,
            "dedup": "r1", "ts": 10.0}
    answer = ok(state.apply(read))
    # Still recognized just before the window ends, whatever else happened.
    ok(send(state, "alice", "bob", ts=10.0 + DAY - 1, cmid="m2"))
    assert ok(send(state, "alice", "bob", ts=10.0 + DAY - 1, cmid="m1")) == first
    assert ok(state.apply(dict(read, ts=10.0 + DAY - 1))) == answer
    # A keyed write past the window expires both entries: a resend is a new write.
    ok(send(state, "alice", "bob", ts=10.0 + DAY + 1, cmid="m3"))
    assert not any(k.endswith(("/m1", "/r1")) for k in dedup_keys(state))
    again = ok(send(state, "alice", "bob", ts=10.0 + DAY + 2, cmid="m1"))
    assert again["message_id"] > first["message_id"]


def test_dedup_entries_stay_bounded_by_the_window(state):
    user(state, "alice")
    user(state, "bob")
    # One keyed write an hour for ten days: only about a day's worth is kept.
    for hour in range(240):
        ok(send(state, "alice", "bob", ts=3600.0 * hour, cmid=f"c{hour}"))
    kept = dedup_keys(state)
    assert len([k for k in kept if k.startswith("d/")]) <= 26
    assert len([k for k in kept if k.startswith("x/")]) <= 26
    assert "d/alice/m/c239" in kept and "d/alice/m/c100" not in kept


def test_a_keyed_write_without_a_time_is_kept_for_good(state):
    user(state, "alice")
    command = {"op": "logout", "session": "s-alice", "username": "alice", "dedup": "l"}
    ok(state.apply(command))
    assert dedup_keys(state) == ["d/alice/g/l"]


# -- list_accounts -------------------------------------------------------------------

@pytest.fixture
def people(state):
    for name in ["alice", "al.ice", "al_ice", "alex", "bob", "b", "Bob", "al", "x.y", "a-b"]:
        ok(create(state, name))
    return state


@pytest.mark.parametrize("pattern,expected", [
    ("*", ["Bob", "a-b", "al", "al.ice", "al_ice", "alex", "alice", "b", "bob", "x.y"]),
    ("al*", ["al", "al.ice", "al_ice", "alex", "alice"]),
    ("al?ice", ["al.ice", "al_ice"]),
    ("al.ice", ["al.ice"]),          # '.' is literal
    ("al_ice", ["al_ice"]),          # '_' is literal
    ("*.*", ["al.ice", "x.y"]),
    ("?", ["b"]),
    ("??", ["al"]),
    ("*b", ["Bob", "a-b", "b", "bob"]),
    ("[ab]*", []),                   # '[' is literal
    ("a[", []),
    ("", []),
    ("bob", ["bob"]),
    ("*o*", ["Bob", "bob"]),
    ("a*e", ["al.ice", "al_ice", "alice"]),
    ("\\*", []),
    ("^al$", []),
])
def test_list_accounts_glob(people, pattern, expected):
    assert people.list_accounts(pattern, 100, "") == (expected, False)


def test_list_accounts_brackets_and_dots_match_literally(tmp_path):
    # Names cannot hold '[' (the server refuses such patterns), but the
    # state still reads any pattern literally: never as a set of characters.
    state = ChatState.open(tmp_path / "s.db")
    for name in ("a", "b", "a.b", "axb"):
        state.apply({"op": "create_account", "username": name, "pw_hash": "h", "ts": 1.0})
    assert state.list_accounts("[ab]", 100, "") == ([], False)
    assert state.list_accounts("[a-z]*", 100, "") == ([], False)
    assert state.list_accounts("a[*", 100, "") == ([], False)
    assert state.list_accounts("a.?", 100, "") == (["a.b"], False)
    assert glob_literal_prefix("al?x*") == "al"
    assert glob_literal_prefix("*") == ""
    state.close()


@pytest.fixture(scope="module")
def glob_people(tmp_path_factory):
    """A state of every name of up to 3 characters from "ab." (kept for the module)."""
    import itertools
    state = ChatState.open(tmp_path_factory.mktemp("glob") / "s.db")
    names = ["".join(p) for n in range(1, 4) for p in itertools.product("ab.", repeat=n)]
    for name in names:
        state.apply({"op": "create_account", "username": name, "pw_hash": "h", "ts": 1.0})
    yield state, sorted(names)
    state.close()


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text("ab.[]*?", min_size=1, max_size=8))
def test_list_accounts_matches_as_fnmatch_does(glob_people, pattern):
    state, names = glob_people
    # fnmatch reads "[" as a set too; "[[]" is its literal "[".
    expected = sorted(n for n in names if fnmatch.fnmatchcase(n, pattern.replace("[", "[[]")))
    assert state.list_accounts(pattern, 1000, "") == (expected, False)


def test_a_pattern_of_many_stars_is_answered_at_once(state):
    # A matcher that backtracks takes seconds for 12 "*a" and grows
    # exponentially with each; 31 would not finish in a lifetime.
    name = "a" * 32
    state.apply({"op": "create_account", "username": name, "pw_hash": "h", "ts": 1.0})
    started = time.monotonic()
    assert state.list_accounts("*a" * 31 + "*b", 100, "") == ([], False)
    assert state.list_accounts("*?" * 31 + "*b", 100, "") == ([], False)
    assert state.list_accounts("*a" * 33 + "*", 100, "") == ([], False)
    assert state.list_accounts("*a" * 16 + "*", 100, "") == ([name], False)
    assert time.monotonic() - started < 1.0


def test_list_accounts_paging(people):
    names, more = people.list_accounts("al*", 2, "")
    assert (names, more) == (["al", "al.ice"], True)
    names, more = people.list_accounts("al*", 2, names[-1])
    assert (names, more) == (["al_ice", "alex"], True)
    names, more = people.list_accounts("al*", 2, names[-1])
    assert (names, more) == (["alice"], False)
    assert people.list_accounts("al*", 1, "alice") == ([], False)
    assert people.list_accounts("al*", 3, "a") == (["al", "al.ice", "al_ice"], True)
    assert people.list_accounts("*", 0, "") == ([], True)
    assert people.list_accounts("zz*", 0, "") == ([], False)
    assert people.list_accounts("al*", 5, "") == (["al", "al.ice", "al_ice", "alex", "alice"], False)


def test_deleted_account_leaves_the_list(state):
    user(state, "alice")
    ok(create(state, "bob"))
    ok(op(state, "delete_account", "alice", pw_hash="hash-x"))
    assert state.list_accounts() == (["bob"], False)


# -- malformed commands --------------------------------------------------------------

@pytest.mark.parametrize("command", [
    None, 3, "create_account", [], {},
    {"op": 5},
    {"op": "create_account"},
    {"op": "create_account", "username": 1, "pw_hash": "h", "ts": 1.0},
    {"op": "create_account", "username": "a", "pw_hash": None, "ts": 1.0},
    {"op": "create_account", "username": "a", "pw_hash": "h", "ts": "1"},
    {"op": "create_account", "username": "a", "pw_hash": "h", "ts": True},
    {"op": "create_account", "username": "a", "pw_hash": "h", "ts": float("nan")},
    {"op": "create_account", "username": "a", "pw_hash": "h", "ts": float("inf")},
    {"op": "create_account", "username": "a", "pw_hash": "h", "ts": 1.0, "dedup": 7},
    {"op": "create_account", "username": "\ud800", "pw_hash": "h", "ts": 1.0},
    {"op": "login", "username": "a", "pw_hash": "h", "session": "s", "ts": 1.0},
    {"op": "send_message", "session": "s-alice", "from": "alice", "to": "alice",
     "body": "x", "ts": 1.0, "client_msg_id": 5},
    {"op": "send_message", "session": "s-alice", "from": "alice", "to": "alice",
     "body": "\udc80", "ts": 1.0},
    {"op": "send_message", "session": "s-alice", "from": "alice", "to": "alice", "ts": 1.0},
    {"op": "read_messages", "session": "s-alice", "username": "alice", "limit": -1},
    {"op": "read_messages", "session": "s-alice", "username": "alice", "limit": 1.0},
    {"op": "read_messages", "session": "s-alice", "username": "alice", "limit": True},
    {"op": "mark_read", "session": "s-alice", "username": "alice", "ids": 1},
    {"op": "mark_read", "session": "s-alice", "username": "alice", "ids": ["1"]},
    {"op": "mark_read", "session": "s-alice", "username": "alice", "ids": [True]},
    {"op": "delete_messages", "session": "s-alice", "username": "alice", "ids": None},
    {"op": "delete_account", "session": "s-alice", "username": "alice"},
    {"op": "logout", "session": 1},
    {"op": "logout", "session": "s-alice", "username": 3},
])
def test_malformed_commands_are_invalid_requests_and_change_nothing(state, command):
    user(state, "alice")
    ok(send(state, "alice", "alice"))
    index, before = state.dump()
    assert code(state.apply(command)) == "invalid_request"
    assert state.dump() == (index + 1, before)


def test_commands_may_come_as_json_bytes(state):
    responses = state.apply_entries([(1, [
        b'{"op": "create_account", "username": "alice", "pw_hash": "h", "ts": 1.0}',
        b'{"op": "create_account", "username": "al',
        b"\xff\xfe\x00",
        b"[1, 2]",
        b"[" * 100000,
    ])])[0]
    assert ok(responses[0]) == {"username": "alice"}
    assert [code(r) for r in responses[1:]] == ["invalid_request"] * 4


def test_unknown_op(state):
    assert code(state.apply({"op": "drop_tables"})) == "unknown_op"
    assert code(state.apply({"op": "__init__"})) == "unknown_op"
    assert state.applied_index() == 2


def test_bug_in_a_command_answers_internal_and_rolls_back_its_writes(state, monkeypatch):
    user(state, "alice")
    index, before = state.dump()

    def half_done(command):
        state.kv.put("junk", b"x")
        raise KeyError("bug")

    monkeypatch.setitem(state._handlers, "logout", half_done)
    responses = state.apply_entries([(index + 1, [
        {"op": "logout", "session": "s-alice"},
        {"op": "create_account", "username": "bob", "pw_hash": "h", "ts": 1.0},
    ])])
    assert code(responses[0][0]) == "internal"
    assert ok(responses[0][1]) == {"username": "bob"}
    assert state.kv.get("junk") is None
    assert state.applied_index() == index + 1


def damage_the_second_half(path):
    """Overwrite part of every page in the second half of the file (the first, with
    its schema and meta, still opens)."""
    data = bytearray(path.read_bytes())
    for offset in range(len(data) // 2 // 4096 * 4096, len(data) - 4096, 4096):
        data[offset + 100:offset + 400] = b"\xff" * 300
    path.write_bytes(bytes(data))


def test_a_bug_on_a_damaged_file_stops_the_state_rather_than_answering_alone(
        tmp_path, monkeypatch):
    # On a whole file a bug answers `internal` on every node alike; on a
    # damaged one this node alone may fail, so it must not go on.
    path = tmp_path / "state.db"
    state = ChatState.open(path)
    user(state, "alice")
    for _ in range(300):
        ok(send(state, "alice", "alice", body="x" * 300))
    index = state.applied_index()
    state.close()
    damage_the_second_half(path)
    state = ChatState.open(path)
    try:
        monkeypatch.setitem(state._handlers, "logout", lambda command: {}["bug"])
        with pytest.raises(StoreError, match="state.db is damaged: On tree page .*"):
            state.apply({"op": "logout", "session": "s-alice"})
        assert state.applied_index() == index
    finally:
        state.close()


def test_a_bug_on_a_whole_file_checks_it_once_a_minute(state, monkeypatch):
    now = [100.0]
    state._clock = lambda: now[0]
    checks = []
    monkeypatch.setattr(state.kv, "check", lambda: checks.append(now[0]))
    monkeypatch.setitem(state._handlers, "logout", lambda command: {}["bug"])
    user(state, "alice")
    for at in (100.0, 130.0, 159.0, 160.0):
        now[0] = at
        assert code(state.apply({"op": "logout", "session": "s-alice"})) == "internal"
    assert checks == [100.0, 160.0]


def rejects_after_writing(state, monkeypatch):
    """A logout that writes, then is rejected."""
    def late_rejection(command):
        state.kv.put("junk", b"x")
        raise chat.Rejected("bad_session", "rejected after a write")
    monkeypatch.setitem(state._handlers, "logout", late_rejection)


def test_a_command_failing_after_it_wrote_leaves_no_trace_and_its_entry_goes_on(
        tmp_path, state, monkeypatch):
    """An entry runs in one savepoint; a command that fails after writing has
    its entry applied again with a savepoint per command: same answers, same
    state as if each command had always had its own entry."""
    bob, logout, carol = ({"op": "create_account", "username": "bob", "pw_hash": "h", "ts": 1.0},
                          {"op": "logout", "session": "s-alice"},
                          {"op": "create_account", "username": "carol", "pw_hash": "h", "ts": 1.0})
    user(state, "alice")
    index, _ = state.dump()
    rejects_after_writing(state, monkeypatch)
    statements = []
    state.kv._conn.set_trace_callback(statements.append)
    with capturedLogs() as events:
        responses = state.apply_entries([(index + 1, [bob, logout, carol])])[0]
    state.kv._conn.set_trace_callback(None)
    assert [ok(responses[0]), code(responses[1]), ok(responses[2])] == [
        {"username": "bob"}, "bad_session", {"username": "carol"}]
    assert state.kv.get("junk") is None
    assert state.account("bob") and state.account("carol")
    assert statements.count("ROLLBACK TO sp0") == 2   # the entry's, then the command's
    assert events == []                               # a rejection is no failure to log

    other = ChatState.open(tmp_path / "other.db")
    user(other, "alice")
    rejects_after_writing(other, monkeypatch)
    other.apply_entries([(index + 1, [bob]), (index + 2, [logout]), (index + 3, [carol])])
    assert other.dump()[1] == state.dump()[1]
    other.close()


def test_a_bug_after_a_write_is_logged_once(state, monkeypatch):
    user(state, "alice")

    def half_done(command):
        state.kv.put("junk", b"x")
        raise KeyError("bug")

    monkeypatch.setitem(state._handlers, "logout", half_done)
    with capturedLogs() as events:
        response = state.apply({"op": "logout", "session": "s-alice"})
    assert code(response) == "internal"
    assert [e["log_format"] for e in events] == ["applying a {op!r} command failed"]


def test_an_entry_whose_commands_succeed_takes_one_savepoint(state):
    user(state, "alice")
    statements = []
    state.kv._conn.set_trace_callback(statements.append)
    cmd = {"op": "send_message", "session": "s-alice", "from": "alice", "to": "alice",
           "body": "x", "ts": 1.0, "client_msg_id": "c"}
    responses = state.apply_entries([(3, [dict(cmd, client_msg_id=str(i)) for i in range(5)]
                                      + [dict(cmd, to="nobody")])])[0]
    state.kv._conn.set_trace_callback(None)
    assert [r["ok"] for r in responses] == [True] * 5 + [False]
    assert statements.count("SAVEPOINT sp0") == 1 and "ROLLBACK TO sp0" not in statements


# -- batches, replay and crashes -----------------------------------------------------

def test_entries_at_or_below_applied_index_are_skipped(state):
    cmd = {"op": "create_account", "username": "alice", "pw_hash": "h", "ts": 1.0}
    assert state.apply_entries([(1, [cmd])]) == [[{"ok": True, "result": {"username": "alice"}}]]
    dump = state.dump()
    assert state.apply_entries([(1, [cmd]), (0, [cmd])]) == [None, None]
    assert state.dump() == dump
    result = state.apply_entries([(1, [cmd]), (5, []), (3, [cmd])])
    assert result == [None, [], None]
    assert state.applied_index() == 5


def test_a_batch_is_one_transaction(state):
    user(state, "alice")
    statements = []
    state.kv._conn.set_trace_callback(statements.append)
    cmd = {"op": "send_message", "session": "s-alice", "from": "alice", "to": "alice",
           "body": "x", "ts": 1.0, "client_msg_id": None}
    state.apply_entries([(i, [cmd] * 3) for i in range(3, 13)])
    state.kv._conn.set_trace_callback(None)
    assert statements.count("BEGIN IMMEDIATE") == 1
    assert statements.count("COMMIT") == 1
    assert state.unread_count("alice") == 30


def logout_fills_the_disk(state, monkeypatch):
    """Applying a logout fails as SQLite does when the disk is full."""
    def disk_full(command):
        raise sqlite3.OperationalError("database or disk is full")
    monkeypatch.setitem(state._handlers, "logout", disk_full)


def test_sqlite_failure_rolls_back_the_whole_batch(state, monkeypatch):
    user(state, "alice")
    dump = state.dump()
    real = state._op_logout
    logout_fills_the_disk(state, monkeypatch)
    with pytest.raises(StoreError, match="state.db.*disk is full"):
        state.apply_entries([
            (3, [{"op": "create_account", "username": "bob", "pw_hash": "h", "ts": 1.0}]),
            (4, [{"op": "logout", "session": "s-alice"}]),
        ])
    assert state.dump() == dump
    monkeypatch.setitem(state._handlers, "logout", real)
    assert ok(state.apply({"op": "logout", "session": "s-alice"})) == {}


def test_grouped_batches_share_one_transaction_until_committed(state):
    user(state, "alice")
    statements = []
    state.kv._conn.set_trace_callback(statements.append)
    cmd = {"op": "send_message", "session": "s-alice", "from": "alice", "to": "alice",
           "body": "x", "ts": 1.0, "client_msg_id": None}
    for i in range(3, 13):
        state.apply_entries([(i, [cmd])], grouped=True)
    assert state.unread_count("alice") == 10 and state.applied_index() == 12
    state.commit_applied()
    state.kv._conn.set_trace_callback(None)
    assert statements.count("BEGIN IMMEDIATE") == 1
    assert statements.count("COMMIT") == 1
    # Each command's savepoint is the outermost one: SQLite drops its page
    # journal when it is released (nested in another, the journal would
    # grow with every command of the batch).
    assert "SAVEPOINT sp0" in statements and "SAVEPOINT sp1" not in statements


def test_a_failing_grouped_batch_rolls_back_to_the_last_commit(state, monkeypatch):
    user(state, "alice")
    dump = state.dump()
    ok(state.apply_entries([(3, [{"op": "create_account", "username": "bob", "pw_hash": "h",
                                  "ts": 1.0}])], grouped=True)[0][0])

    logout_fills_the_disk(state, monkeypatch)
    with pytest.raises(StoreError, match="disk is full"):
        state.apply_entries([
            (4, [{"op": "create_account", "username": "carol", "pw_hash": "h", "ts": 1.0}]),
            (5, [{"op": "logout", "session": "s-alice"}]),
        ], grouped=True)
    assert state.dump() == dump and state.applied_index() == 2   # bob's grouped batch too
    state.commit_applied()
    assert state.dump() == dump


def test_snapshot_and_restore(tmp_path, state):
    user(state, "alice")
    user(state, "bob")
    for i in range(300):
        ok(send(state, "alice", "bob", "x" * 2000, ts=float(i)))
    index, chunks = state.snapshot()
    chunks = list(chunks)
    assert index == state.applied_index()
    assert len(chunks) > 1 and all(len(c) <= SNAPSHOT_CHUNK_BYTES for c in chunks)
    other = ChatState.open(tmp_path / "other.db")
    ok(create(other, "zed"))
    other.restore(index, chunks)
    assert other.dump() == state.dump()
    assert other.unread_count("bob") == 300
    assert other.account("zed") is None
    # The restored state carries on exactly as the original.
    cmd = {"op": "send_message", "session": "s-bob", "from": "bob", "to": "alice",
           "body": "after", "ts": 1.0, "client_msg_id": None}
    assert other.apply(cmd) == state.apply(cmd)
    assert other.digest() == state.digest()
    with pytest.raises(SnapshotError):
        other.restore(index, chunks[:1])
    other.close()


def test_reopen_keeps_everything(tmp_path):
    path = tmp_path / "s.db"
    state = ChatState.open(path)
    user(state, "alice")
    ok(send(state, "alice", "alice", cmid="c"))
    dump = state.dump()
    state.close()
    state = ChatState.open(path)
    assert state.dump() == dump
    assert ok(send(state, "alice", "alice", cmid="c"))["message_id"] == 1
    state.close()


# -- properties ----------------------------------------------------------------------

NAMES = ["alice", "bob", "al.x", "Bob"]


def commands():
    name = st.sampled_from(NAMES)
    session = name.map(lambda n: "s-" + n)
    small_ids = st.lists(st.integers(min_value=-1, max_value=25), max_size=4)
    ts = st.floats(min_value=0, max_value=100, allow_nan=False)
    dedup = st.one_of(st.none(), st.sampled_from(["d1", "d2"]))

    def with_dedup(cmd, d):
        if d is not None:
            cmd["dedup"] = d
        return cmd

    send = st.builds(lambda a, b, body, t, c: {"op": "send_message", "session": "s-" + a,
                                               "from": a, "to": b, "body": body, "ts": t,
                                               "client_msg_id": c},
                     name, name, st.sampled_from(["hi", "yo", "é"]), ts,
                     st.one_of(st.none(), st.sampled_from(["c1", "c2", "c3"])))
    ops = st.one_of(
        send, send, send,
        st.builds(lambda n, p: {"op": "create_account", "username": n, "pw_hash": p, "ts": 1.0},
                  name, st.sampled_from(["p1", "p2"])),
        st.builds(lambda n, p, t: {"op": "login", "username": n, "pw_hash": p,
                                   "session": "s-" + n, "ts": t, "expires": t + 50},
                  name, st.sampled_from(["p1", "p2"]), ts),
        st.builds(lambda s: {"op": "logout", "session": s}, session),
        st.builds(lambda a, b, body, t, c: {"op": "send_message", "session": "s-" + a,
                                            "from": a, "to": b, "body": body, "ts": t,
                                            "client_msg_id": c},
                  name, name, st.sampled_from(["hi", "yo", "é"]), ts,
                  st.one_of(st.none(), st.sampled_from(["c1", "c2", "c3"]))),
        st.builds(lambda n, k: {"op": "read_messages", "session": "s-" + n, "username": n,
                                "limit": k}, name, st.integers(0, 3)),
        st.builds(lambda n, i: {"op": "mark_read", "session": "s-" + n, "username": n,
                                "ids": i}, name, small_ids),
        st.builds(lambda n, i: {"op": "delete_messages", "session": "s-" + n, "username": n,
                                "ids": i}, name, small_ids),
        st.builds(lambda n, p: {"op": "delete_account", "session": "s-" + n, "username": n,
                                "pw_hash": p}, name, st.sampled_from(["p1", "p2"])),
        st.just({"op": "send_message"}),
    )
    return st.builds(with_dedup, ops, dedup)


# Most accounts exist and are logged in, so random commands mostly do something.
SETUP = [{"op": "create_account", "username": n, "pw_hash": "p1", "ts": 1.0}
         for n in NAMES[:3]] + [
    {"op": "login", "username": n, "pw_hash": "p1", "session": "s-" + n,
     "ts": 1.0, "expires": 1000.0} for n in NAMES[:3]]


def command_lists(min_size=5, max_size=40):
    return st.lists(commands(), min_size=min_size, max_size=max_size).map(lambda c: SETUP + c)


def fresh(tmp_path_factory):
    return ChatState.open(tmp_path_factory.mktemp("state") / "s.db")


def check_invariants(state):
    """Counters and indexes agree with the messages they describe."""
    _, records = state.dump()
    keys = {k for k, _ in records}
    for name in NAMES:
        unread = [k for k in keys if k.startswith(f"u/{name}/")]
        assert state.unread_count(name) == len(unread)
        if state.account(name) is None:
            assert not unread and not any(k.startswith(f"h/{name}/") for k in keys)
        for m in state.history(name, limit=1000):
            assert name in (m["from"], m["to"])
            assert (f"u/{m['to']}/{m['id']:016x}" in keys) == (not m["read"])
    for key in keys:
        if key.startswith("m/"):
            m = state.message(int(key[2:], 16))
            assert f"h/{m['to']}/{key[2:]}" in keys
            assert state.account(m["to"]) is not None


@settings(max_examples=40, deadline=None)
@given(command_lists())
def test_same_commands_give_identical_state(tmp_path_factory, cmds):
    a, b = fresh(tmp_path_factory), fresh(tmp_path_factory)
    try:
        ra = [a.apply(c) for c in cmds]
        rb = [b.apply(c) for c in cmds]
        assert ra == rb
        assert a.dump() == b.dump()
        check_invariants(a)
    finally:
        a.close()
        b.close()


@settings(max_examples=40, deadline=None)
@given(command_lists(), st.data())
def test_batches_equal_one_by_one(tmp_path_factory, cmds, data):
    one, batched = fresh(tmp_path_factory), fresh(tmp_path_factory)
    try:
        singles = [one.apply_entries([(i + 1, [c])])[0][0] for i, c in enumerate(cmds)]
        # Random entries of several commands each, applied in random-size batches.
        entries, i = [], 0
        while i < len(cmds):
            n = data.draw(st.integers(1, 4))
            entries.append((i + 1, cmds[i:i + n]))
            i += n
        responses = []
        j = 0
        while j < len(entries):
            n = data.draw(st.integers(1, 5))
            for got in batched.apply_entries(entries[j:j + n]):
                responses.extend(got)
            j += n
        assert responses == singles
        assert batched.dump()[1] == one.dump()[1]
    finally:
        one.close()
        batched.close()


@settings(max_examples=40, deadline=None)
@given(command_lists(max_size=30), st.data())
def test_interrupted_batch_leaves_a_consistent_prefix(tmp_path_factory, cmds, data):
    crashed, reference = fresh(tmp_path_factory), fresh(tmp_path_factory)
    try:
        committed = data.draw(st.integers(0, len(cmds)))
        crashed.apply_entries([(i + 1, [c]) for i, c in enumerate(cmds[:committed])])
        # A second batch dies half-way: the disk fails under it.
        real = crashed.kv.put
        budget = [data.draw(st.integers(0, 30))]

        def failing_put(key, value):
            if budget[0] == 0:
                raise sqlite3.OperationalError("disk I/O error")
            budget[0] -= 1
            real(key, value)

        real_many = crashed.kv.put_many

        def failing_put_many(items):
            items = list(items)
            for key, value in items[:-1]:
                failing_put(key, value)
            failing_put(*items[-1])

        crashed.kv.put = failing_put
        crashed.kv.put_many = failing_put_many
        try:
            crashed.apply_entries([(i + 1, [c]) for i, c in enumerate(cmds) if i >= committed])
        except StoreError:
            pass
        crashed.kv.put = real
        crashed.kv.put_many = real_many
        index = crashed.applied_index()
        assert index in (committed, len(cmds))
        for i, c in enumerate(cmds[:index]):
            reference.apply_entries([(i + 1, [c])])
        assert crashed.dump() == reference.dump()
        # Replaying everything from the start applies only what is missing.
        crashed.apply_entries([(i + 1, [c]) for i, c in enumerate(cmds)])
        for i, c in enumerate(cmds[index:], start=index):
            reference.apply_entries([(i + 1, [c])])
        assert crashed.dump() == reference.dump()
        # Re-applying entries at or below the applied index changes nothing.
        again = crashed.apply_entries([(i + 1, [c]) for i, c in enumerate(cmds)])
        assert again == [None] * len(cmds)
        assert crashed.dump() == reference.dump()
    finally:
        crashed.close()
        reference.close()


@settings(max_examples=15, deadline=None)
@given(command_lists(max_size=30))
def test_snapshot_restore_reproduces_state(tmp_path_factory, cmds):
    source, target = fresh(tmp_path_factory), fresh(tmp_path_factory)
    try:
        for c in cmds:
            source.apply(c)
        index, chunks = source.snapshot()
        target.restore(index, chunks)
        assert target.dump() == source.dump()
    finally:
        source.close()
        target.close()


def test_process_killed_mid_batch_restarts_at_the_last_commit(tmp_path):
    import subprocess
    import sys
    import textwrap
    path = tmp_path / "s.db"
    script = textwrap.dedent(f"""
        import os
        from paxchat.state.chat import ChatState
        state = ChatState.open({str(path)!r})
        state.kv._conn.execute("PRAGMA cache_size = 10")  # spill pages to the WAL
        setup = {SETUP!r}
        state.apply_entries([(i + 1, [c]) for i, c in enumerate(setup)])
        def send(i):
            return {{"op": "send_message", "session": "s-alice", "from": "alice", "to": "bob",
                     "body": "m%d" % i + "x" * 3000, "ts": float(i), "client_msg_id": None}}
        state.apply_entries([(len(setup) + 1 + i, [send(i)]) for i in range(50)])
        real = state.kv.put_many
        calls = [0]
        def dying(items):
            calls[0] += 1
            if calls[0] == 400:
                os._exit(3)
            real(items)
        state.kv.put_many = dying
        state.apply_entries([(len(setup) + 51 + i, [send(50 + i)]) for i in range(1000)])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert out.returncode == 3, out.stderr
    state = ChatState.open(path, check=True)
    try:
        assert state.applied_index() == len(SETUP) + 50
        assert state.unread_count("bob") == 50
        assert [m["body"][:3] for m in state.history("bob", limit=1)] == ["m49"]
        # Replay from the start applies only the missing entries.
        cmd = {"op": "send_message", "session": "s-alice", "from": "alice", "to": "bob",
               "body": "next", "ts": 1.0, "client_msg_id": None}
        result = state.apply_entries([(1, [cmd]), (len(SETUP) + 51, [cmd])])
        assert result[0] is None and result[1][0]["result"]["message_id"] == 51
    finally:
        state.close()


# -- apply versions ----------------------------------------------------------

def move_to(state, version):
    return state.apply({"op": "set_apply_version", "version": version})


def everything(state):
    return state.kv.scan("")


def test_the_apply_version_rises_and_never_falls(state, monkeypatch):
    monkeypatch.setattr(chat, "APPLY_VERSION", 3)
    assert state.version() == 0
    assert ok(move_to(state, 2)) == {"version": 2}
    assert ok(move_to(state, 1)) == {"version": 2}      # a late or repeated proposal
    assert state.version() == 2
    assert ok(move_to(state, 3)) == {"version": 3} and state.version() == 3


def test_a_bad_move_changes_nothing(state):
    user(state, "alice")
    before = everything(state)
    assert code(move_to(state, 2 ** 31)) == "invalid_request"
    assert code(move_to(state, "1")) == "invalid_request"
    assert code(move_to(state, -1)) == "invalid_request"
    assert everything(state) == before
    assert state.applied_index() == 5


def test_a_state_past_this_builds_version_stops_the_apply_and_keeps_what_it_had(state, monkeypatch):
    monkeypatch.setattr(chat, "APPLY_VERSION", 2)
    ok(move_to(state, 2))
    user(state, "alice")
    before, index = everything(state), state.applied_index()
    monkeypatch.setattr(chat, "APPLY_VERSION", 1)      # the same data under an older build
    with pytest.raises(chat.NewerThanThisBuild, match="apply version is 2 and this build knows"
                                                      " versions up to 1"):
        state.check_version()
    with pytest.raises(chat.NewerThanThisBuild):
        state.apply_entries([(index + 1, [{"op": "create_account", "username": "bob",
                                           "pw_hash": "h", "ts": 1.0}])], grouped=True)
    assert everything(state) == before and state.applied_index() == index


def test_a_move_past_this_build_is_not_applied_nor_what_came_before_it_in_the_batch(state, monkeypatch):
    """A node downgraded while the others moved on stops at that entry, and the entries
    of its batch before it are undone too: it replays them with a newer build."""
    before, index = everything(state), state.applied_index()
    entries = [(index + 1, [{"op": "create_account", "username": "bob", "pw_hash": "h",
                             "ts": 1.0}]),
               (index + 2, [{"op": "set_apply_version", "version": 2}])]
    with pytest.raises(chat.NewerThanThisBuild):
        state.apply_entries(entries, grouped=True)
    assert everything(state) == before and state.applied_index() == index
    monkeypatch.setattr(chat, "APPLY_VERSION", 2)
    results = state.apply_entries(entries, grouped=True)
    assert results[1][0]["result"]["version"] == 2 and state.version() == 2


# -- read receipts, an account setting (apply version 1) -----------------------

def receipts(state, who, on):
    return op(state, "set_settings", who, read_receipts=on)


def at_version_1(state):
    ok(move_to(state, 1))


def test_set_settings_is_unknown_until_every_node_knows_it(state):
    user(state, "alice")
    before = everything(state)
    assert code(receipts(state, "alice", False)) == "unknown_op"
    # As a build without the op answers, whatever the fields.
    assert code(op(state, "set_settings", "alice", read_receipts="no")) == "unknown_op"
    assert everything(state) == before
    at_version_1(state)
    assert code(op(state, "set_settings", "alice", read_receipts="no")) == "invalid_request"
    assert ok(receipts(state, "alice", False)) == {"read_receipts": False}
    assert state.settings("alice") == {"read_receipts": False}
    assert ok(receipts(state, "alice", True)) == {"read_receipts": True}
    assert state.settings("bob") == {"read_receipts": True}


def test_a_reader_with_receipts_off_tells_no_sender_and_its_senders_see_no_read(state):
    at_version_1(state)
    for name in ("alice", "bob", "carol"):
        user(state, name)
    first = ok(send(state, "alice", "bob"))["message_id"]
    second = ok(send(state, "carol", "bob"))["message_id"]
    ok(receipts(state, "bob", False))
    response = op(state, "mark_read", "bob", ids=[first])
    assert response["effect"] == {"ids": [first], "senders": {}}
    response = op(state, "read_messages", "bob", limit=5)
    assert response["effect"] == {"ids": [second], "senders": {}}
    assert [m["read"] for m in state.history("alice")] == [False]
    assert [m["read"] for m in state.history("bob")] == [True, True]      # his own reads show
    ok(receipts(state, "bob", True))                   # the fact was kept: it shows again
    assert [m["read"] for m in state.history("alice")] == [True]


def test_a_sender_with_receipts_off_is_told_of_no_read_and_sees_none(state):
    at_version_1(state)
    user(state, "alice")
    user(state, "bob")
    ok(receipts(state, "alice", False))
    message_id = ok(send(state, "alice", "bob"))["message_id"]
    to_self = ok(send(state, "alice", "alice"))["message_id"]
    assert op(state, "mark_read", "bob", ids=[message_id])["effect"]["senders"] == {}
    assert {m["id"]: m["read"] for m in state.history("alice")} == {message_id: False,
                                                                      to_self: False}
    op(state, "mark_read", "alice", ids=[to_self])
    assert {m["id"]: m["read"] for m in state.history("alice")}[to_self] is True


def test_a_deleted_account_leaves_no_setting_to_its_namesake(state):
    at_version_1(state)
    user(state, "alice")
    ok(receipts(state, "alice", False))
    ok(op(state, "delete_account", "alice", pw_hash="hash-x"))
    assert state.kv.scan("r/") == []
    user(state, "alice")
    assert state.settings("alice") == {"read_receipts": True}
