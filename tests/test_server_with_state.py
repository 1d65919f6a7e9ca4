"""Random sequences of requests against the real ChatState: never an internal error, never a false event."""

import tempfile
from pathlib import Path

from hypothesis import example, given, settings, strategies as st

from paxchat.state.chat import ChatState

from .server_support import Server

NAMES = st.sampled_from(["alice", "bob", "carol", "x" * 33, "bad name"])
PASSWORDS = st.sampled_from(["password-a", "password-b", "short", "é" * 600])
IDS = st.lists(st.integers(min_value=-2, max_value=8) | st.sampled_from([2**63 - 1, 2**63]), max_size=4)
SMALL = st.none() | st.integers(min_value=-1, max_value=1001) | st.booleans()

REQUESTS = st.one_of(
    st.builds(lambda u, p: ("create_account", {"username": u, "password": p}), NAMES, PASSWORDS),
    st.builds(lambda u, p: ("login", {"username": u, "password": p}), NAMES, PASSWORDS),
    st.builds(lambda s: ("resume", {"session": s}), st.sampled_from(["", "nope", "TOKEN"])),
    st.just(("logout", {})),
    st.builds(lambda p, lim, a: ("list_accounts", {"pattern": p, "limit": lim, "after": a}),
              st.sampled_from(["*", "a*", "?o?", "[", "*" * 65]), SMALL, st.sampled_from(["", "alice", "zz"])),
    st.builds(lambda to, body, cmid: ("send_message", {"to": to, "body": body, "client_msg_id": cmid}),
              NAMES, st.sampled_from(["hi", "", "é" * 16385, "\ud800"]), st.none() | st.sampled_from(["m1", "m2"])),
    st.builds(lambda lim: ("read_messages", {"limit": lim}), SMALL),
    st.builds(lambda ids: ("mark_read", {"ids": ids}), IDS),
    st.builds(lambda peer, before, lim: ("history", {"peer": peer, "before": before, "limit": lim}),
              st.none() | NAMES, SMALL, SMALL),
    st.builds(lambda ids: ("delete_messages", {"ids": ids}), IDS),
    st.builds(lambda p: ("delete_account", {"password": p}), PASSWORDS),
    st.just(("get_settings", {})),
    st.builds(lambda on: ("set_settings", {"read_receipts": on}), st.booleans() | st.just("no")),
)


# The events docs/protocol.md names for a running node (node_stopping comes only when it stops).
EVENTS = (None, "message", "sent", "read", "seen", "deleted", "settings", "session_ended")


@settings(max_examples=60)
@given(steps=st.lists(st.tuples(st.integers(0, 2), REQUESTS), min_size=1, max_size=25))
# alice's connection logs in as bob and sends: bob's first connection hears `sent`.
@example(steps=[(0, ("login", {"username": "bob", "password": "password-b"})),
                (0, ("send_message", {"to": "alice", "body": "hi", "client_msg_id": None}))])
def test_random_sessions_against_the_real_state(steps):
    with tempfile.TemporaryDirectory() as directory:
        state = ChatState.open(Path(directory) / "state.db")
        try:
            server = Server(state=state)
            clients = [server.connect() for _ in range(3)]
            # alice on 0, bob on 1, nobody on 2; then anything goes.
            for client, name, password in [(clients[0], "alice", "password-a"), (clients[1], "bob", "password-b")]:
                client.ok("create_account", username=name, password=password)
                client.ok("login", username=name, password=password)
            tokens = []
            for index, (op, args) in steps:
                client = clients[index]
                if args.get("session") == "TOKEN" and tokens:
                    args = {"session": tokens[-1]}
                answer = client.call(op, **{k: v for k, v in args.items() if v is not None})
                if answer["ok"]:
                    if op == "login":
                        tokens.append(answer["result"]["session"])
                else:
                    assert answer["error"]["code"] != "internal", (op, args, answer)
            for client in clients:
                assert client.ok("hello")["protocol"] == 1
                assert all(message.get("event") in EVENTS for message in client.received())
        finally:
            state.close()


def _check_event(event, user, state, parties):
    """``event``, sent to a connection logged in as ``user``, is about ``user`` and true now."""
    kind = event["event"]
    assert user is not None, f"{kind} to a connection not logged in"
    if kind == "settings":
        assert event["settings"] == state.settings(user)
        return
    if kind in ("message", "sent"):
        message = event["message"]
        assert message[{"message": "to", "sent": "from"}[kind]] == user
        return
    for message_id in event.get("ids", ()):
        sender, recipient = parties[message_id]
        now = state.message(message_id)
        if kind == "read":
            assert recipient == user and now["read"] is True
        elif kind == "seen":
            assert sender == user != recipient and now["read"] is True
            # Told only while both have read receipts on.
            assert state.settings(sender)["read_receipts"] and state.settings(recipient)["read_receipts"]
        elif kind == "deleted":
            assert user in (sender, recipient) and now is None
    if kind == "deleted":
        assert event["unread"] == state.unread_count(user)


@settings(max_examples=60)
@given(steps=st.lists(st.tuples(st.integers(0, 2), REQUESTS), min_size=1, max_size=30))
@example(steps=[(0, ("send_message", {"to": "bob", "body": "hi", "client_msg_id": None})),
                (2, ("login", {"username": "alice", "password": "password-a"})),
                (1, ("read_messages", {"limit": 5})),
                (1, ("delete_messages", {"ids": [1]})),
                (2, ("delete_account", {"password": "password-a"}))])
@example(steps=[(0, ("send_message", {"to": "alice", "body": "hi", "client_msg_id": None})),
                (2, ("login", {"username": "alice", "password": "password-a"})),
                (2, ("mark_read", {"ids": [1]}))])
# bob turns read receipts off and reads alice's message: alice is not told.
@example(steps=[(1, ("set_settings", {"read_receipts": False})),
                (0, ("send_message", {"to": "bob", "body": "hi", "client_msg_id": None})),
                (1, ("read_messages", {"limit": 5}))])
def test_every_event_is_about_its_connections_account_and_true(steps):
    """Whatever the requests, an event goes to a connection logged in as an
    account it is about (a message to or from it, its own message read or
    deleted), and says what the state shows right after the write."""
    with tempfile.TemporaryDirectory() as directory:
        state = ChatState.open(Path(directory) / "state.db")
        try:
            server = Server(state=state)
            # The cluster's apply version has settings: set_settings applies.
            server.log.submit({"op": "set_apply_version", "version": 1})
            clients = [server.connect() for _ in range(3)]
            who = [None, None, None]            # the account each connection is logged in as
            for index, name, password in [(0, "alice", "password-a"), (1, "bob", "password-b")]:
                clients[index].ok("create_account", username=name, password=password)
                clients[index].ok("login", username=name, password=password)
                who[index] = name
            read_upto = [len(c.received()) for c in clients]
            parties, tokens = {}, []
            for index, (op, args) in steps:
                if args.get("session") == "TOKEN" and tokens:
                    args = {"session": tokens[-1][0]}
                args = {k: v for k, v in args.items() if v is not None}
                answer = clients[index].call(op, **args)
                if answer["ok"] and op == "send_message":
                    parties[answer["result"]["message_id"]] = (who[index], args["to"])
                for j, client in enumerate(clients):
                    new, read_upto[j] = client.received()[read_upto[j]:], len(client.inbox)
                    for event in (m for m in new if "event" in m):
                        _check_event(event, who[j], state, parties)
                        if event["event"] == "session_ended":
                            who[j] = None
                if answer["ok"] and op == "login":
                    who[index] = args["username"]
                    tokens.append((answer["result"]["session"], args["username"]))
                elif answer["ok"] and op == "resume":
                    who[index] = dict(tokens)[args["session"]]
                elif answer["ok"] and op in ("logout", "delete_account"):
                    who[index] = None
        finally:
            state.close()
