"""Random sequences of requests against the real ChatState: never an internal error."""

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
)


# The events docs/protocol.md names for a running node (node_stopping comes only when it stops).
EVENTS = (None, "message", "sent", "read", "seen", "deleted", "session_ended")


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
