"""The desktop app's model and controller, without a display."""

import time

from twisted.internet import defer
from twisted.internet.task import Clock

from paxchat.client.api import Status
from paxchat.client.errors import ServerError, Unreachable
from paxchat.client.gui_controller import ChatController
from paxchat.client.gui_model import (PAGE_SIZE, ChatModel, Coalescer, search_pattern, status_level, status_text,
                                      time_label)

from .test_client_failover import logged_in, until_answered, without_majority


def msg(i, frm, to, body="x", ts=None, read=False):
    return {"id": i, "from": frm, "to": to, "body": body, "ts": ts if ts is not None else 1000.0 + i, "read": read}


def model_for(me="alice"):
    changes = []
    model = ChatModel(on_change=changes.append)
    model.signed_in(me)
    changes.clear()
    return model, changes


def test_status_bar_sentences():
    assert status_text(Status("connected", 2, 1)) == "Connected to node 2 · leader 1"
    assert status_text(Status("connected", 3, None)) == "Connected to node 3 · no leader yet"
    assert status_text(Status("reconnecting")) == "Reconnecting…"
    assert status_text(Status("reconnecting", detail="node 2 is stopping")) == \
        "Reconnecting (node 2 is stopping)…"
    assert status_text(Status("connecting")) == "Connecting…"
    assert status_text(Status("failed")).startswith("Offline")
    assert status_text(Status("connecting", detail="node 3 could not reach a majority")) == \
        "Connecting (node 3 could not reach a majority)…"


def test_the_status_dot_is_green_only_while_a_leader_can_take_writes():
    assert status_level(Status("connected", 2, 1)) == "ok"
    # A majority down: the node answers, but nothing can be written.
    assert status_level(Status("connected", 5, None)) == "warn"
    assert status_level(Status("reconnecting")) == status_level(Status("connecting")) == "warn"
    assert status_level(Status("failed")) == "danger"
    model = ChatModel()
    assert model.status_level == "warn"
    model.set_status(Status("connected", 5, None))
    assert model.status == "Connected to node 5 · no leader yet" and model.status_level == "warn"
    model.set_status(Status("connected", 5, 3))
    assert model.status_level == "ok"


def test_a_cluster_without_a_majority_is_not_called_unreachable():
    reactor, client, nodes, conn, statuses, _ = logged_in()
    got = []
    client.history().addBoth(got.append)
    conn.drop()
    until_answered(reactor, nodes, got, lambda: without_majority(nodes))
    assert status_text(statuses[-1]) == "Offline: servers answer, but too few are up to agree. Retrying…"


def test_unread_badges_count_received_unread_messages_until_opened():
    model, changes = model_for()
    model.add_messages([msg(1, "bob", "alice"), msg(2, "bob", "alice"), msg(3, "alice", "bob"),
                        msg(4, "carol", "alice", read=True)])
    rows = {r["peer"]: r for r in model.conversation_rows()}
    assert rows["bob"]["unread"] == 2 and rows["carol"]["unread"] == 0
    assert model.total_unread == 2 and model.title == "(2) paxchat — alice"
    assert model.open("bob") == [1, 2]
    assert model.conversation_rows()[0]["unread"] == 0
    # A message arriving in the open conversation is read at once.
    assert model.add_messages([msg(5, "bob", "alice")], live=True) == [5]
    assert model.conversation("bob").unread == 0
    assert model.add_messages([msg(6, "carol", "alice")], live=True) == []


def test_messages_pushed_while_the_newest_are_out_of_view_stay_unread_until_seen():
    clock, model, client, ctl = controller()
    client.auto = {"history": {"messages": [msg(1, "bob", "alice")], "more": False}}
    model.signed_in("alice")
    ctl.open("bob")
    clock.advance(0)
    assert client.last("mark_read")[1] == ([1],)
    # Scrolled up (or the window away): pushes into the open conversation wait.
    ctl.newest_in_view(False)
    ctl.on_event({"event": "message", "message": msg(2, "bob", "alice")})
    ctl.on_event({"event": "message", "message": msg(3, "bob", "alice")})
    clock.advance(0)
    assert len([c for c in client.calls if c[0] == "mark_read"]) == 1
    assert model.unseen_below == 2 and model.unseen_cue == "↓ 2 new messages"
    assert model.conversation_rows()[0]["unread"] == 2 and model.title == "(2) paxchat — alice"
    assert not model.conversation("bob").messages[2]["read"]
    # An older page loaded meanwhile (scrolled to the top) is read as it shows.
    assert model.add_history_page("bob", [msg(0, "bob", "alice")], PAGE_SIZE, older=True) == [0]
    # Read on another device: no longer waiting here either.
    ctl.on_event({"event": "read", "ids": [2]})
    assert model.unseen_cue == "↓ 1 new message"
    # Back at the bottom: marked read, in one request.
    ctl.newest_in_view(True)
    clock.advance(0)
    assert client.last("mark_read")[1] == ([3],)
    assert model.unseen_below == 0 and model.title == "paxchat — alice" and model.unseen_cue == ""
    ctl.newest_in_view(True)
    clock.advance(0)
    assert len([c for c in client.calls if c[0] == "mark_read"]) == 2  # nothing more to mark
    # In view, a push is read at once, as before.
    ctl.on_event({"event": "message", "message": msg(4, "bob", "alice")})
    clock.advance(0)
    assert client.last("mark_read")[1] == ([4],)


def test_what_a_failover_catch_up_brings_waits_too_while_scrolled_up():
    clock, model, client, ctl = controller()
    client.auto = {"history": {"messages": [msg(1, "bob", "alice", read=True)], "more": False}}
    model.signed_in("alice")
    ctl.open("bob")
    ctl.newest_in_view(False)
    client.auto["history"] = {"messages": [msg(2, "bob", "alice"), msg(1, "bob", "alice", read=True)],
                              "more": False}
    ctl.on_status(Status("reconnecting"))
    ctl.on_status(Status("connected", 2, 1))
    clock.advance(0)
    assert not [c for c in client.calls if c[0] == "mark_read"] and model.unseen_below == 1
    ctl.newest_in_view(True)
    clock.advance(0)
    assert client.last("mark_read")[1] == ([2],)
    ctl.stop()


def test_conversation_list_is_most_recent_first_with_previews():
    model, _ = model_for()
    model.add_messages([msg(1, "bob", "alice", "old", ts=10), msg(2, "alice", "carol", "new\nline", ts=20)])
    rows = model.conversation_rows()
    assert [r["peer"] for r in rows] == ["carol", "bob"]
    assert rows[0]["preview"] == "You: new line"


def test_bubbles_are_oldest_first_aligned_by_sender_with_pending_last():
    model, _ = model_for()
    model.add_messages([msg(3, "bob", "alice", "c"), msg(1, "alice", "bob", "a"), msg(2, "bob", "alice", "b")])
    model.open("bob")
    model.sending("bob", "k1", "on its way")
    bubbles = model.bubbles()
    assert [b["body"] for b in bubbles] == ["a", "b", "c", "on its way"]
    assert [b["mine"] for b in bubbles] == [True, False, False, True]
    assert bubbles[1]["sender"] == "bob" and bubbles[0]["sender"] == "You"
    assert bubbles[-1]["time"] == "sending…"
    model.sent("bob", "k1", 9, 2000.0)
    assert model.bubbles()[-1]["id"] == 9


def test_history_pages_tell_whether_older_messages_remain():
    model, _ = model_for()
    model.open("bob")
    page = [msg(i, "bob", "alice", read=True) for i in range(100, 100 - PAGE_SIZE, -1)]
    model.add_history_page("bob", page, PAGE_SIZE, older=False)
    assert model.conversation("bob").more_before
    model.add_history_page("bob", [msg(10, "bob", "alice", read=True)], PAGE_SIZE, older=True)
    conv = model.conversation("bob")
    assert not conv.more_before and conv.oldest_id == 10


def test_where_a_reused_names_new_account_begins_is_noted():
    model, _ = model_for()
    model.open("bob")
    old = [msg(i, "bob", "alice", ts=100.0 + i, read=True) for i in (1, 2)]
    model.add_history_page("bob", old[::-1], PAGE_SIZE, older=False)
    assert model.account_notes() == (None, None)            # the server has not said
    model.set_peer_created("bob", None)
    assert model.account_notes() == (None, "bob's account was deleted.")
    # A new account of the name writes: it existed by then, its messages come after the note.
    model.add_messages([msg(3, "bob", "alice", ts=500.0)], live=True)
    above, text = model.account_notes()
    assert above == 3 and text.startswith("bob is a new account since ")
    assert text.endswith("the messages above were with an earlier account of that name.")
    # The server's word, when it comes, places it; nothing before it: no note.
    model.set_peer_created("bob", 101.5)
    assert model.account_notes()[0] == 2
    model.set_peer_created("bob", 50.0)
    assert model.account_notes() == (None, None)
    # Every loaded message older: the note comes last.
    model.set_peer_created("bob", 900.0)
    above, text = model.account_notes()
    assert above is None and text.startswith("bob is a new account since ")


def test_the_controller_passes_on_peer_created_from_every_history_answer():
    clock, model, client, ctl = controller()
    client.auto = {"login": {"session": "t", "unread": 0}, "history": {"messages": []}}
    ctl.log_in("alice", "pw-123456")
    client.auto = {}
    ctl.open("bob")
    client.last("history")[3].callback({"messages": [msg(1, "bob", "alice", ts=10.0, read=True)],
                                        "more": False, "peer_created": 20.0})
    assert model.conversation("bob").peer_created == 20.0
    assert model.account_notes()[0] is None and "new account" in model.account_notes()[1]
    ctl.open("bob")                            # caught up: the name was freed since
    client.last("history")[3].callback({"messages": [], "more": False, "peer_created": None})
    assert model.account_notes()[1] == "bob's account was deleted."
    ctl.open("bob")                            # an earlier build: unchanged
    client.last("history")[3].callback({"messages": [], "more": False})
    assert model.conversation("bob").peer_created is None
    # A send refused for want of the account says so in the conversation too.
    model.set_peer_created("bob", 20.0)
    ctl.send("still there?")
    client.last("send_message")[3].errback(ServerError("no_such_user", "no such user"))
    assert model.account_notes()[1] == "bob's account was deleted."


def test_a_short_page_the_server_says_is_not_the_last_keeps_older_loadable():
    # A page cut short by the answer size limit: fewer than asked, more left.
    model, _ = model_for()
    model.open("bob")
    model.add_history_page("bob", [msg(100, "bob", "alice", read=True)], PAGE_SIZE, older=False, more=True)
    assert model.conversation("bob").more_before
    model.add_history_page("bob", [msg(99, "bob", "alice", read=True)], PAGE_SIZE, older=True, more=False)
    assert not model.conversation("bob").more_before


def test_selection_and_removal():
    model, _ = model_for()
    model.add_messages([msg(1, "bob", "alice"), msg(2, "bob", "alice")])
    model.open("bob")
    model.toggle_selected(1)
    assert [b["selected"] for b in model.bubbles()] == [True, False]
    model.remove_messages([1])
    assert [b["id"] for b in model.bubbles()] == [2] and model.selected == set()


def test_errors_become_sentences():
    model, _ = model_for()
    model.show_error(ServerError("bad_credentials", "nope"))
    assert model.error == "The username or password is wrong."
    model.show_error(Unreachable("no paxchat node could be reached: 127.0.0.1:7101"))
    assert model.error.startswith("Cannot reach any paxchat server")


def test_search_patterns():
    assert search_pattern("al") == "al*"
    assert search_pattern("a?c*") == "a?c*"
    assert search_pattern("  ") == "*"
    assert search_pattern("a" * 63) == "a" * 63 + "*" and search_pattern("a" * 64) == "a" * 64


def test_time_labels():
    now = time.mktime((2026, 11, 22, 12, 0, 0, 0, 0, -1))
    assert time_label(now - 60, now) == time.strftime("%H:%M", time.localtime(now - 60))
    assert time_label(now - 3 * 86400, now).count(":") == 1
    assert time_label(now - 30 * 86400, now).startswith("2026-10")


def test_a_burst_of_a_thousand_messages_is_one_redraw():
    clock = Clock()
    redraws = []
    coalescer = Coalescer(clock.callLater, redraws.append)
    model = ChatModel(on_change=coalescer.notify)
    model.signed_in("alice")
    for i in range(1000):
        model.add_messages([msg(i, "bob", "alice")], live=True)
    assert redraws == [] and coalescer.pending
    clock.advance(0)
    assert len(redraws) == 1 and {"list", "screen"} <= redraws[0]
    assert not coalescer.pending
    assert model.conversation("bob").unread == 1000


# -- the controller --------------------------------------------------------------------

class FakeClient:
    """Each op returns a Deferred the test fires; calls are recorded."""

    def __init__(self):
        self.calls = []
        self.connected = True
        self.leader_pushed = False   # a node of an earlier build, unless a test says so
        self.auto = {}

    def __getattr__(self, op):
        if op.startswith("_"):
            raise AttributeError(op)

        def call(*args, **kwargs):
            d = defer.Deferred()
            self.calls.append((op, args, kwargs, d))
            if op in self.auto:
                answer = self.auto[op]
                d.errback(answer) if isinstance(answer, Exception) else d.callback(answer)
            return d
        return call

    def last(self, op):
        return [c for c in self.calls if c[0] == op][-1]


def controller():
    clock = Clock()
    model = ChatModel()
    client = FakeClient()
    ctl = ChatController(clock, model, lambda on_event, on_status: client)
    return clock, model, client, ctl


def test_login_loads_recent_history_into_the_list():
    clock, model, client, ctl = controller()
    client.auto = {"login": {"session": "t", "unread": 1},
                   "history": {"messages": [msg(2, "bob", "alice"), msg(1, "alice", "bob", read=True)]}}
    ctl.log_in("alice", "pw-123456")
    assert model.screen == "chats" and model.me == "alice" and not model.busy
    assert client.last("history")[2] == {"limit": 200, "before": None}
    assert model.conversation_rows()[0]["unread"] == 1


def answer_history(client, server):
    """Answer each history call from ``server`` (oldest first), newest first with ``more``, as a node does."""
    answered = 0
    while answered < len([c for c in client.calls if c[0] == "history"]):
        _, _, kwargs, d = [c for c in client.calls if c[0] == "history"][answered]
        older = [m for m in server if kwargs.get("before") is None or m["id"] < kwargs["before"]]
        page = older[::-1][:kwargs["limit"]]
        d.callback({"messages": page, "more": len(older) > len(page)})
        answered += 1
    return answered


def test_login_loads_history_until_every_unread_message_is_listed():
    # While alice was away dave sent 3, bob 2, then carol 210: more than one page.
    server = ([msg(i, "alice", "erin", read=True) for i in range(1, 501)]
              + [msg(i, "dave", "alice") for i in range(501, 504)] + [msg(i, "bob", "alice") for i in range(504, 506)]
              + [msg(i, "carol", "alice") for i in range(506, 716)])
    clock, model, client, ctl = controller()
    client.auto = {"login": {"session": "t", "unread": 215}}
    ctl.log_in("alice", "pw-123456")
    assert answer_history(client, server) == 2  # not a third page: every unread one is in
    unread = {r["peer"]: r["unread"] for r in model.conversation_rows()}
    assert unread == {"carol": 210, "bob": 2, "dave": 3, "erin": 0}
    assert model.title == "(215) paxchat — alice" and not model.busy


def test_an_unread_note_to_oneself_does_not_send_login_paging_to_its_bound():
    # The server counts a message to oneself as unread; the login's count includes it.
    server = [msg(i, "bob", "alice", read=True) for i in range(1, 4000)] + [msg(4000, "alice", "alice")]
    clock, model, client, ctl = controller()
    client.auto = {"login": {"session": "t", "unread": 1}}
    ctl.log_in("alice", "pw-123456")
    assert answer_history(client, server) == 1
    assert model.title == "paxchat — alice"


def test_login_stops_paging_at_a_bound_and_the_title_still_counts_every_unread_message():
    from paxchat.client.gui_controller import RECENT, RECENT_PAGES
    total = RECENT * RECENT_PAGES + 5
    server = [msg(i, "bob", "alice") for i in range(1, 6)] + [msg(i, "carol", "alice") for i in range(6, total + 1)]
    clock, model, client, ctl = controller()
    client.auto = {"login": {"session": "t", "unread": total}}
    ctl.log_in("alice", "pw-123456")
    assert answer_history(client, server) == RECENT_PAGES
    assert model.total_unread == total - 5 and model.title == f"({total}) paxchat — alice"
    # bob's messages come in when his older history is loaded: counted once, not twice.
    model.add_messages([msg(i, "bob", "alice") for i in range(1, 6)])
    assert model.title == f"({total}) paxchat — alice" and model.conversation("bob").unread == 5


def test_bad_login_shows_a_sentence_and_stays_on_the_login_screen():
    clock, model, client, ctl = controller()
    client.auto = {"login": ServerError("bad_credentials", "no")}
    ctl.log_in("alice", "wrong-pass")
    assert model.screen == "login" and model.error == "The username or password is wrong."
    ctl.log_in("", "")
    assert model.error == "Enter your username and password."


def test_a_refused_login_says_which_field_is_wrong():
    clock, model, client, ctl = controller()
    client.auto = {"login": ServerError("bad_credentials", "no")}
    ctl.log_in("alice", "wrong-pass")
    assert model.error_about == "password"
    client.auto = {"create_account": ServerError("invalid_username", "no")}
    ctl.create_account("al ice", "good-password", "good-password")
    assert model.error.startswith("That username is not allowed") and model.error_about == "username"
    client.auto = {"create_account": ServerError("username_taken", "no")}
    ctl.create_account("alice", "good-password", "good-password")
    assert model.error_about == "username"
    client.auto = {"create_account": ServerError("invalid_password", "no")}
    ctl.create_account("alice", "short", "short")
    assert model.error_about == "password"
    client.auto = {"login": Unreachable("no paxchat node could be reached")}
    ctl.log_in("alice", "good-password")
    assert model.error.startswith("Cannot reach") and model.error_about is None
    ctl.log_in("", "good-password")
    assert model.error_about == "username"
    ctl.log_in("alice", "")
    assert model.error_about == "password"


def test_creating_an_account_asks_for_the_password_twice_and_refuses_two_that_differ():
    clock, model, client, ctl = controller()
    model.set_creating(True)
    assert model.creating_account
    client.auto = {"create_account": {}, "login": {"session": "t", "unread": 0}, "get_settings": {}}
    ctl.create_account("alice", "good-password", "")
    assert model.error == "Type the password again under Repeat password." and model.error_about == "repeat"
    ctl.create_account("alice", "good-password", "good-passwrod")
    assert model.error == "The two passwords differ. Type the password again in both fields."
    assert model.error_about == "password"     # both are typed again: which one is wrong is not known
    assert not [c for c in client.calls if c[0] in ("create_account", "login")]
    assert model.screen == "login" and model.creating_account and not model.busy
    ctl.create_account("alice", "good-password", "good-password")
    assert client.last("create_account")[1] == ("alice", "good-password")
    assert model.screen == "chats" and model.error == ""
    # Back on the login screen, it logs in again.
    model.signed_out()
    assert not model.creating_account
    model.set_creating(True)
    model.signed_in("alice")
    assert not model.creating_account


def test_a_too_long_error_goes_once_the_text_fits():
    from paxchat.client.gui_controller import MAX_BODY
    clock, model, client, ctl = controller()
    model.signed_in("alice")
    ctl.open("bob")
    ctl.send("x" * (MAX_BODY + 1))
    assert "too long" in model.error and model.error_about == "compose"
    ctl.compose_changed("x" * (MAX_BODY + 1) + "\n")   # still too long
    assert "too long" in model.error
    ctl.compose_changed("x" * MAX_BODY + "\n")
    assert model.error == ""
    # Other errors stay as the text changes.
    model.show_error("Cannot search for that.")
    ctl.compose_changed("")
    assert model.error == "Cannot search for that."


def test_open_marks_read_in_one_batch_and_loads_the_newest_page():
    clock, model, client, ctl = controller()
    model.signed_in("alice")
    model.add_messages([msg(1, "bob", "alice"), msg(2, "bob", "alice")])
    ctl.open("bob")
    assert client.last("history")[2] == {"peer": "bob", "before": None, "limit": PAGE_SIZE}
    for i in range(3, 50):
        ctl.on_event({"event": "message", "message": msg(i, "bob", "alice")})
    clock.advance(0)
    marks = [c for c in client.calls if c[0] == "mark_read"]
    assert len(marks) == 1 and marks[0][1][0] == list(range(1, 50))


def test_a_message_sent_from_another_device_joins_its_conversation_unmarked():
    clock, model, client, ctl = controller()
    model.signed_in("alice")
    model.add_messages([msg(1, "bob", "alice", read=True)])
    ctl.open("bob")
    ctl.on_event({"event": "sent", "message": msg(2, "alice", "bob")})
    ctl.on_event({"event": "sent", "message": msg(3, "alice", "carol")})
    clock.advance(0)
    assert sorted(model.conversation("bob").messages) == [1, 2]
    assert list(model.conversation("carol").messages) == [3]
    assert [row["unread"] for row in model.conversation_rows()] == [0, 0]
    assert not [c for c in client.calls if c[0] == "mark_read"]


def test_messages_read_or_deleted_on_another_device_leave_the_badges_and_the_conversation():
    clock, model, client, ctl = controller()
    model.signed_in("alice")
    model.add_messages([msg(1, "bob", "alice"), msg(2, "bob", "alice"), msg(3, "carol", "alice"),
                        msg(4, "alice", "bob", read=False)])
    assert [(row["peer"], row["unread"]) for row in model.conversation_rows()] == [("bob", 2), ("carol", 1)]
    changes = []
    model.on_change = changes.append
    ctl.on_event({"event": "read", "ids": [1, 4, 99, "x"]})     # 4 is alice's own: not hers to read
    assert dict((row["peer"], row["unread"]) for row in model.conversation_rows()) == {"bob": 1, "carol": 1}
    assert model.conversation("bob").messages[1]["read"] and not model.conversation("bob").messages[4]["read"]
    assert changes == [{"list"}]
    ctl.on_event({"event": "read", "ids": [99]})                 # none of ours: nothing to redraw
    assert changes == [{"list"}]
    ctl.on_event({"event": "deleted", "ids": [2, 3]})
    assert sorted(model.conversation("bob").messages) == [1, 4] and not model.conversation("carol").messages
    assert model.total_unread == 0
    ctl.on_event({"event": "deleted", "ids": "all"})             # malformed: ignored
    assert sorted(model.conversation("bob").messages) == [1, 4]
    assert not [c for c in client.calls if c[0] in ("mark_read", "delete_messages")]


def test_reading_elsewhere_what_was_too_old_to_load_lowers_the_count_of_older_unread():
    clock, model, client, ctl = controller()
    model.signed_in("alice")
    model.add_messages([msg(20, "bob", "alice")])
    model.set_older_unread(3, older_than=10)                    # ids below 10, not loaded
    assert model.total_unread + model.older_unread == 4
    ctl.on_event({"event": "read", "ids": [5, 6, 12]})          # 12: above them, unknown here
    assert model.older_unread == 1 and model.total_unread == 1
    ctl.on_event({"event": "read", "ids": [1, 2, 3, 20]})
    assert model.older_unread == 0 and model.total_unread == 0


def test_a_deleted_unread_message_too_old_to_load_lowers_the_count_of_older_unread():
    clock, model, client, ctl = controller()
    model.signed_in("alice")
    model.add_messages([msg(20, "bob", "alice"), msg(21, "carol", "alice")])
    model.set_older_unread(3, older_than=10)                    # ids below 10, not loaded
    changes = []
    model.on_change = changes.append
    # Bob deletes one of the three: the ids alone cannot tell it was unread, the count can.
    ctl.on_event({"event": "deleted", "ids": [4], "unread": 4})
    assert model.older_unread == 2 and model.total_unread == 2
    assert "list" in changes[-1]
    ctl.on_event({"event": "deleted", "ids": [20, 5], "unread": 2})  # one loaded, one not
    assert model.older_unread == 1 and model.total_unread == 1
    # A read one of hers deleted: the count stays; a count above what is known never raises it.
    ctl.on_event({"event": "deleted", "ids": [3], "unread": 2})
    ctl.on_event({"event": "deleted", "ids": [2], "unread": 9})
    assert model.older_unread == 1
    # From a server without the count (an earlier build), or a malformed one: as before.
    ctl.on_event({"event": "deleted", "ids": [1]})
    ctl.on_event({"event": "deleted", "ids": [1], "unread": "0"})
    ctl.on_event({"event": "deleted", "ids": [1], "unread": True})
    assert model.older_unread == 1
    ctl.on_event({"event": "deleted", "ids": [6], "unread": 1})
    assert model.older_unread == 0 and model.total_unread == 1


def test_scrolling_up_loads_older_once_at_a_time():
    clock, model, client, ctl = controller()
    model.signed_in("alice")
    ctl.open("bob")
    client.last("history")[3].callback({"messages": [msg(i, "bob", "alice", read=True)
                                                     for i in range(200, 150, -1)]})
    ctl.load_older()
    ctl.load_older()
    older = [c for c in client.calls if c[0] == "history"]
    assert len(older) == 2 and older[-1][2]["before"] == 151
    older[-1][3].callback({"messages": [msg(5, "bob", "alice", read=True)]})
    assert not model.conversation("bob").more_before
    ctl.load_older()
    assert len([c for c in client.calls if c[0] == "history"]) == 2


def test_reopening_a_conversation_merges_what_was_sent_from_another_device():
    clock, model, client, ctl = controller()
    model.signed_in("alice")
    ctl.open("bob")
    first = [msg(3, "bob", "alice", read=True), msg(1, "bob", "alice", read=True)]
    client.last("history")[3].callback({"messages": first, "more": False})
    ctl.open("carol")
    ctl.open("bob")                     # alice sent #4 from the CLI meanwhile: no push reaches her
    call = client.last("history")
    assert call[2] == {"peer": "bob", "limit": PAGE_SIZE}
    call[3].callback({"messages": [msg(4, "alice", "bob"), msg(3, "bob", "alice", read=True)], "more": True})
    conv = model.conversation("bob")
    assert sorted(conv.messages) == [1, 3, 4] and not conv.more_before      # paging untouched


def test_a_catch_up_that_does_not_reach_what_is_shown_starts_the_conversation_over():
    clock, model, client, ctl = controller()
    model.signed_in("alice")
    ctl.open("bob")
    client.last("history")[3].callback({"messages": [msg(2, "bob", "alice", read=True),
                                                     msg(1, "bob", "alice", read=True)], "more": False})
    ctl.open("carol")
    ctl.open("bob")                     # 60 were sent from another device meanwhile
    newest = [msg(i, "alice", "bob") for i in range(62, 62 - PAGE_SIZE, -1)]
    client.last("history")[3].callback({"messages": newest, "more": True})
    conv = model.conversation("bob")
    assert sorted(conv.messages) == list(range(62 - PAGE_SIZE + 1, 63))   # no gap under them
    assert conv.more_before and conv.oldest_id == 62 - PAGE_SIZE + 1        # the rest load on scrolling


def test_a_conversation_open_across_a_failover_is_caught_up_quietly():
    clock, model, client, ctl = controller()
    model.signed_in("alice")
    ctl.open("bob")
    client.last("history")[3].callback({"messages": [msg(1, "bob", "alice", read=True)], "more": False})
    ctl.on_status(Status("reconnecting"))
    ctl.on_status(Status("connected", 2, 1))
    call = client.last("history")
    assert call[2] == {"peer": "bob", "limit": PAGE_SIZE}
    call[3].errback(ServerError("unavailable", "retry"))
    assert not model.error                          # a background refresh: no banner
    ctl.on_status(Status("reconnecting"))
    ctl.on_status(Status("connected", 3, 1))
    client.last("history")[3].callback({"messages": [msg(2, "bob", "alice")], "more": False})
    assert sorted(model.conversation("bob").messages) == [1, 2]


def test_a_malformed_send_answer_is_logged_and_the_send_still_ends():
    from twisted.logger import globalLogPublisher
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        clock, model, client, ctl = controller()
        model.signed_in("alice")
        ctl.open("bob")
        ended = []
        ctl.send("hello").addBoth(ended.append)
        client.last("send_message")[3].callback({"ts": 1.0})       # no message_id
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert ended == [None]
    assert any(e.get("log_format") == "showing a sent message failed" for e in events)


def test_a_pending_message_says_waiting_while_no_node_with_a_leader_can_take_it():
    model, changes = model_for()
    model.open("bob")
    model.set_status(Status("connected", 1, 1))
    model.sending("bob", "k1", "hi")
    assert model.bubbles()[-1]["time"] == "sending…"
    changes.clear()
    model.set_status(Status("connected", 1, None))       # the leader died: no majority to commit
    assert model.bubbles()[-1]["time"] == "waiting…"
    assert changes[-1] == {"status", "conversation"}      # the bubble is redrawn with its new word
    model.set_status(Status("reconnecting"))
    assert model.bubbles()[-1]["time"] == "waiting…" and changes[-1] == {"status"}
    model.set_status(Status("connected", 2, 3))
    assert model.bubbles()[-1]["time"] == "sending…" and changes[-1] == {"status", "conversation"}
    model.sent("bob", "k1", 9, 2000.0)
    changes.clear()
    model.set_status(Status("failed"))
    assert changes == [{"status"}]                         # nothing pending: no redraw of the conversation


def test_send_shows_pending_then_the_stored_message_or_an_error():
    clock, model, client, ctl = controller()
    model.signed_in("alice")
    ctl.open("bob")
    ctl.send("hello\n")
    assert client.last("send_message")[1] == ("bob", "hello")
    assert model.bubbles()[-1]["time"] == "sending…"
    client.last("send_message")[3].callback({"message_id": 7, "ts": 5.0})
    assert model.bubbles()[-1]["id"] == 7
    assert client.last("send_message")[3].result is None  # sent: nothing to put back
    unsent = ctl.send("again\n")
    client.last("send_message")[3].errback(ServerError("no_such_user", "gone"))
    assert model.error == "Not sent: there is no account with that name."
    assert [b["body"] for b in model.bubbles()] == ["hello"]
    assert unsent.result == "again"  # goes back into the compose box
    too_long = ctl.send("x" * 16385)
    assert "too long" in model.error and too_long.result == "x" * 16385


def test_a_failed_send_keeps_its_error_until_dismissed_or_the_next_send():
    clock, model, client, ctl = controller()
    model.signed_in("alice")
    ctl.open("bob")
    ctl.send("hello")
    client.last("send_message")[3].errback(ServerError("no_majority", "too few nodes"))
    assert model.error.startswith("Not sent: ") and model.error_sticky
    # Sending again takes it away (a new failure would show its own).
    ctl.send("hello")
    assert model.error == "" and not model.error_sticky
    client.last("send_message")[3].errback(ServerError("no_majority", "too few nodes"))
    assert model.error_sticky
    model.clear_error()                      # dismissed
    assert model.error == "" and not model.error_sticky
    # Other errors go by themselves.
    ctl.search("bo b")
    assert model.error and not model.error_sticky


def test_a_message_too_large_once_encoded_is_shown_as_not_sent():
    from paxchat.client.errors import RequestTooLarge
    clock, model, client, ctl = controller()
    model.signed_in("alice")
    ctl.open("bob")
    client.auto = {"send_message": RequestTooLarge("send_message", 65601, 65536)}
    unsent = ctl.send("🎉" * 16384)
    assert model.error.startswith("Not sent: that message is too large to send: 65,601 bytes")
    assert model.bubbles() == []
    assert unsent.result == "🎉" * 16384


def test_deleting_selected_messages_is_asked_first():
    clock, model, client, ctl = controller()
    model.signed_in("alice")
    client.auto = {"delete_messages": {"deleted": 2}, "history": {"messages": [], "more": False}}
    model.add_messages([msg(1, "bob", "alice"), msg(2, "bob", "alice"), msg(3, "alice", "bob")])
    ctl.open("bob")
    model.ask_delete()
    assert not model.confirming_delete  # nothing selected, nothing to ask
    model.toggle_selected(1)
    model.ask_delete()
    assert model.confirming_delete and model.delete_question == \
        "Delete 1 message for both of you? No undo."
    # Selecting more asks again, with the new count.
    model.toggle_selected(2)
    assert not model.confirming_delete
    model.ask_delete()
    assert model.delete_questions == ("Delete 2 messages for both of you? No undo.",
                                      "Delete 2 for both of you?", "For both?")
    # Cancel deletes nothing and keeps the selection.
    model.cancel_delete()
    assert not model.confirming_delete and model.selected == {1, 2}
    assert not [c for c in client.calls if c[0] == "delete_messages"]
    # Opening another conversation drops the question.
    model.ask_delete()
    ctl.open("carol")
    assert not model.confirming_delete and not model.selected
    ctl.open("bob")
    model.toggle_selected(1)
    model.toggle_selected(2)
    model.ask_delete()
    ctl.delete_selected()
    assert client.last("delete_messages")[1] == ([1, 2],)
    assert not model.confirming_delete and [b["id"] for b in model.bubbles()] == [3]


def test_the_selected_messages_text_is_their_bodies_oldest_first():
    model, _ = model_for()
    model.add_messages([msg(1, "bob", "alice", "first"), msg(2, "alice", "bob", "second\nline"),
                        msg(3, "bob", "alice", "third")])
    assert model.selected_text() == ""
    model.open("bob")
    model.toggle_selected(3)
    model.toggle_selected(1)
    assert model.selected_text() == "first\nthird"
    assert model.selected_text(3) == "first\nthird"     # right-clicked one of them: all of them
    assert model.selected_text(2) == "second\nline"     # another one: that one alone


def test_search_delete_logout_and_session_end():
    clock, model, client, ctl = controller()
    model.signed_in("alice")
    client.auto = {"list_accounts": {"accounts": ["alice", "albert"], "more": False},
                   "delete_messages": {"deleted": 1}, "logout": {}}
    ctl.search("al")
    assert client.last("list_accounts")[1] == ("al*",) and model.search_results == ["albert"]
    model.add_messages([msg(1, "bob", "alice")])
    ctl.open("bob")
    model.toggle_selected(1)
    ctl.delete_selected()
    assert client.last("delete_messages")[1] == ([1],) and model.bubbles() == []
    model.show_error("Not sent: there is no account with that name.")
    ctl.log_out()
    assert model.screen == "login" and model.error == ""
    model.signed_in("alice")
    ctl.on_event({"event": "session_ended", "reason": "logged_out"})
    assert model.screen == "login" and model.notice == "Your session ended. Please log in again."
    model.signed_in("alice")
    ctl.on_event({"event": "session_ended", "reason": "account_deleted"})
    assert model.screen == "login"
    assert model.notice == "The account alice was deleted elsewhere, so you were logged out."


def test_a_new_error_or_attempt_replaces_the_notice_of_why_the_login_screen_is_back():
    clock, model, client, ctl = controller()
    model.signed_in("alice")
    client.auto = {"logout": {}, "login": ServerError("bad_credentials", "no")}
    ctl.log_out()
    assert model.notice == "You are logged out."
    ctl.log_in("alice", "wrong-pass")
    assert model.error == "The username or password is wrong." and model.notice == ""
    # An error found before asking the server, too.
    model.signed_out("Your session ended. Please log in again.")
    ctl.create_account("alice", "good-password", "good-passwrod")
    assert model.error.startswith("The two passwords differ") and model.notice == ""
    # An attempt, from its start.
    model.signed_out("You are logged out.")
    client.auto = {}
    ctl.log_in("alice", "good-password")
    assert model.busy and model.notice == "" and model.error == ""
    # Going on to create an account: the card makes room for the repeat field.
    model.signed_out("You are logged out.")
    model.set_creating(True)
    assert model.creating_account and model.notice == ""


def test_a_search_the_server_would_refuse_is_explained_and_clears_old_results():
    clock, model, client, ctl = controller()
    model.signed_in("alice")
    client.auto = {"list_accounts": {"accounts": ["bob"], "more": False}}
    ctl.search("b")
    assert model.search_results == ["bob"]
    ctl.search("bo b")
    assert len([c for c in client.calls if c[0] == "list_accounts"]) == 1
    assert model.error.startswith("Cannot search for “bo b”: use up to 64 letters, digits")
    assert model.error_about == "search"      # shown under the search box, not over the conversation
    assert model.search_pattern is None and model.search_results == []
    ctl.search("b")
    assert model.error == "" and model.search_results == ["bob"]
    client.auto = {"list_accounts": Unreachable("no paxchat node could be reached")}
    ctl.search("c")
    assert model.error.startswith("Cannot reach") and model.search_results == []
    assert model.error_about == "search"


def test_editing_the_search_text_takes_back_the_results_of_what_it_held_before():
    clock, model, client, ctl = controller()
    model.signed_in("alice")
    client.auto = {"list_accounts": {"accounts": ["bob"], "more": True}}
    ctl.search("?ob")
    assert model.search_pattern == "?ob" and model.search_results == ["bob"]
    ctl.search_edited()
    assert model.search_pattern is None and model.search_results == [] and not model.search_more
    # So does an error about it...
    ctl.search("bo b")
    ctl.search_edited()
    assert model.error == ""
    # ...but not another one.
    model.show_error("Not sent: no majority.", sticky=True)
    ctl.search_edited()
    assert model.error == "Not sent: no majority."
    # A search answered after the text changed is not shown: it answers other text.
    client.auto = {}
    ctl.search("b")
    ctl.search_edited()
    client.last("list_accounts")[3].callback({"accounts": ["bob"], "more": False})
    assert model.search_pattern is None and model.search_results == []
    # Nor is one overtaken by a later search.
    ctl.search("b")
    first = client.last("list_accounts")[3]
    ctl.search("c")
    client.last("list_accounts")[3].callback({"accounts": ["carol"], "more": False})
    first.callback({"accounts": ["bob"], "more": False})
    assert model.search_pattern == "c*" and model.search_results == ["carol"]


def test_delete_account_needs_the_password():
    clock, model, client, ctl = controller()
    model.signed_in("alice")
    ctl.delete_account("")
    assert "password" in model.error and not [c for c in client.calls if c[0] == "delete_account"]
    assert model.error_about == "delete_account"
    client.auto = {"delete_account": ServerError("bad_credentials", "no")}
    ctl.delete_account("not-my-password")
    assert model.screen == "chats" and model.error == "That password is wrong." and not model.busy
    # Shown in the dialog that asked, not in the banner behind it; so is any other failure.
    assert model.error_about == "delete_account"
    client.auto = {"delete_account": Unreachable("no paxchat node could be reached")}
    ctl.delete_account("pw-123456")
    assert model.error.startswith("Cannot reach") and model.error_about == "delete_account"
    client.auto = {"delete_account": {}}
    ctl.delete_account("pw-123456")
    assert model.screen == "login" and "alice was deleted" in model.notice


def test_offline_retries_connecting_periodically():
    clock, model, client, ctl = controller()
    ctl.on_status(Status("failed"))
    assert model.status.startswith("Offline")
    clock.advance(5)
    assert [c[0] for c in client.calls] == ["connect"]


def test_a_broken_config_is_shown_not_raised():
    model = ChatModel()

    def broken(on_event, on_status):
        raise ValueError("cluster.ini: [node.1] client: 'x' is not a valid host:port")
    ctl = ChatController(Clock(), model, broken)
    assert "not a valid host:port" in model.error
    ctl.log_in("a", "b")


def test_runs_of_one_sender_share_one_name():
    model, _ = model_for()
    model.add_messages([msg(1, "bob", "alice", ts=0), msg(2, "bob", "alice", ts=60), msg(3, "bob", "alice", ts=1000),
                        msg(4, "alice", "bob", ts=1001), msg(5, "bob", "alice", ts=1002)])
    model.open("bob")
    assert [b["first_in_run"] for b in model.bubbles()] == [True, False, True, True, True]


def test_the_newest_message_sent_says_whether_its_recipient_has_read_it():
    clock, model, client, ctl = controller()
    model.signed_in("alice")
    model.add_messages([msg(1, "alice", "bob", read=True), msg(2, "bob", "alice", read=True),
                        msg(3, "alice", "bob"), msg(4, "alice", "alice")])
    model.open("bob")
    receipts = lambda: [(b["id"], b["receipt"]) for b in model.bubbles() if b["receipt"]]  # noqa: E731
    assert receipts() == [(3, "Sent")]
    changes = []
    model.on_change = changes.append
    ctl.on_event({"event": "seen", "ids": [2, 4, 99, "x"]})      # none of hers to bob unread: nothing
    assert changes == [] and receipts() == [(3, "Sent")]
    ctl.on_event({"event": "seen", "ids": [3]})
    assert receipts() == [(3, "Read")] and changes == [{"conversation"}]
    # A message sent from here is unread by its recipient until it says so.
    model.sending("bob", "k", "another")
    assert receipts() == [(3, "Read")]                             # "sending…" is its own word
    model.sent("bob", "k", 5, 1005.0)
    assert receipts() == [(5, "Sent")]
    model.open("alice")                                            # notes to oneself: no receipt
    assert receipts() == []


def test_read_receipts_are_loaded_at_login_and_turned_off_from_the_menu():
    from paxchat.client.errors import ServerError
    clock, model, client, ctl = controller()
    client.auto = {"login": {"session": "t", "unread": 0}, "history": {"messages": []},
                   "get_settings": {"read_receipts": True}}
    assert model.read_receipts is None                # not known: the menu leaves it alone
    ctl.log_in("alice", "pw-123456")
    assert model.read_receipts is True
    model.add_messages([msg(3, "alice", "bob", read=True)])
    model.open("bob")
    receipt = lambda: [b["receipt"] for b in model.bubbles() if b["receipt"]]  # noqa: E731
    assert receipt() == ["Read"]
    changes = []
    model.on_change = changes.append
    ctl.set_read_receipts(False)
    assert client.last("set_settings")[1] == (False,)
    assert model.read_receipts is True                # until the server says so
    client.last("set_settings")[3].callback({"read_receipts": False})
    assert model.read_receipts is False and {"settings", "conversation"} in changes
    assert receipt() == ["Sent"]                      # as the server shows it now
    # Refused (an upgrade under way): the menu goes back to what it was, and says why.
    ctl.set_read_receipts(True)
    client.last("set_settings")[3].errback(ServerError("upgrade_in_progress", "not yet"))
    assert model.read_receipts is False and "upgrade" in model.error
    # Changed on another device.
    ctl.on_event({"event": "settings", "settings": {"read_receipts": True}})
    assert model.read_receipts is True and receipt() == ["Read"]
    model.signed_out()
    assert model.read_receipts is None
    ctl.on_event({"event": "settings", "settings": {"read_receipts": False}})
    assert model.read_receipts is None                # not for the login screen


def test_a_server_without_settings_leaves_them_unknown():
    from paxchat.client.errors import ServerError
    clock, model, client, ctl = controller()
    client.auto = {"login": {"session": "t", "unread": 0}, "history": {"messages": []},
                   "get_settings": ServerError("unknown_op", "no such op")}
    ctl.log_in("alice", "pw-123456")
    assert model.screen == "chats" and model.read_receipts is None and model.error == ""


def test_the_leader_in_the_status_bar_is_asked_for_every_few_seconds():
    clock, model, client, ctl = controller()
    hellos = lambda: len([c for c in client.calls if c[0] == "hello"])  # noqa: E731
    ctl.start()
    clock.advance(3)
    assert hellos() == 1
    clock.advance(3)
    assert hellos() == 2
    ctl.stop()
    assert not clock.getDelayedCalls()


def test_after_a_failover_the_leader_is_asked_again_soon_a_few_times():
    clock, model, client, ctl = controller()
    hellos = lambda: len([c for c in client.calls if c[0] == "hello"])  # noqa: E731
    ctl.on_status(Status("connected", 1, 1))
    clock.advance(10)
    assert hellos() == 0
    ctl.on_status(Status("reconnecting", None, 1))
    ctl.on_status(Status("connected", 2, 1))
    assert model.status == "Connected to node 2 · leader 1"
    clock.advance(1)
    assert hellos() == 1
    clock.pump([1] * 10)
    assert hellos() == 5
    ctl.stop()
    assert not clock.getDelayedCalls()


def test_a_commit_while_the_bar_says_no_leader_asks_for_the_leader_at_once():
    clock, model, client, ctl = controller()
    hellos = lambda: len([c for c in client.calls if c[0] == "hello"])  # noqa: E731
    ctl.start()
    model.signed_in("alice")
    model.open("bob")
    ctl.on_status(Status("connected", 2, None))
    clock.advance(0.5)
    # A message pushed: something committed, so there is a leader again. Asked now, not at 3 s.
    ctl.on_event({"event": "message", "message": msg(1, "bob", "alice")})
    assert hellos() == 1
    # A burst of them asks once a second at most.
    for i in range(2, 20):
        ctl.on_event({"event": "message", "message": msg(i, "bob", "alice")})
    assert hellos() == 1
    clock.advance(1)
    ctl.on_event({"event": "read", "ids": [1]})
    assert hellos() == 2
    # A send answered is a commit too: the bubbles said "waiting…", the bar catches up at once.
    clock.advance(1)
    ctl.send("are you there?")
    assert model.sends_wait and model.bubbles()[-1]["time"] == "waiting…"
    client.last("send_message")[3].callback({"message_id": 50, "ts": 1.0})
    assert hellos() == 3
    client.last("hello")[3].callback({})
    ctl.on_status(Status("connected", 2, 3))     # what the client reports once hello names one
    assert model.status == "Connected to node 2 · leader 3" and not model.sends_wait
    # With a leader known, pushes ask nothing: the refresh alone keeps the bar.
    clock.advance(3)                             # t = 5.5: the refresh asked at 3 s
    assert hellos() == 4
    for i in range(20, 30):
        ctl.on_event({"event": "message", "message": msg(i, "bob", "alice")})
    assert hellos() == 4
    ctl.stop()


def test_a_node_that_pushes_leader_changes_is_never_asked_who_leads():
    clock, model, client, ctl = controller()
    hellos = lambda: len([c for c in client.calls if c[0] == "hello"])  # noqa: E731
    client.leader_pushed = True
    ctl.start()
    model.signed_in("alice")
    ctl.on_status(Status("connected", 2, 1))
    clock.advance(60)
    assert hellos() == 0
    # The client reports what the node pushes: the bar follows without a question.
    ctl.on_status(Status("connected", 2, None))
    assert model.status == "Connected to node 2 · no leader yet" and model.status_level == "warn"
    ctl.on_event({"event": "message", "message": msg(1, "bob", "alice")})    # a commit: not asked either
    ctl.on_status(Status("reconnecting", None, None))
    ctl.on_status(Status("connected", 3, 2))                                 # after a failover neither
    clock.pump([1] * 10)
    assert hellos() == 0 and model.status == "Connected to node 3 · leader 2"
    # Moved to a node of an earlier build: asked every few seconds again.
    client.leader_pushed = False
    clock.advance(3)
    assert hellos() == 1
    ctl.stop()
    assert not clock.getDelayedCalls()


def test_drafts_are_kept_per_conversation_until_signed_out():
    model, _ = model_for()
    model.keep_draft("bob", "half a thought")
    model.keep_draft("carol", "  \n ")           # blank: nothing to keep
    assert model.drafts == {"bob": "half a thought"}
    assert model.take_draft("bob") == "half a thought" and model.take_draft("bob") == ""
    model.keep_draft("bob", "again")
    model.keep_draft("bob", "")                  # emptied: forgotten
    assert model.drafts == {}
    model.keep_draft("bob", "kept")
    model.signed_out()
    assert model.drafts == {}


def test_a_send_answered_after_its_session_ended_is_shown_to_no_one():
    clock, model, client, ctl = controller()
    client.auto = {"history": {"messages": [], "more": False}, "logout": {}}
    model.signed_in("alice")
    ctl.open("bob")
    failing, landing = ctl.send("for bob"), ctl.send("also for bob")
    (_, _, _, fail), (_, _, _, land) = [c for c in client.calls if c[0] == "send_message"]
    ctl.log_out()
    model.signed_in("carol")
    fail.errback(ServerError("no_majority", "too few nodes"))
    land.callback({"message_id": 9, "ts": 5.0})
    # Not put back for carol, no error over her chats, no conversation with bob in her list.
    assert failing.result is None and landing.result is None
    assert model.error == "" and model.drafts == {} and model.conversations == {}


def test_neighbour_walks_the_sidebar_and_stops_at_its_ends():
    model, _ = model_for()
    assert model.neighbour(1) is None
    model.add_messages([msg(1, "carol", "alice", ts=10.0), msg(2, "bob", "alice", ts=30.0),
                        msg(3, "dave", "alice", ts=20.0)])
    assert [r["peer"] for r in model.conversation_rows()] == ["bob", "dave", "carol"]
    assert model.neighbour(1) == "bob" and model.neighbour(-1) == "carol"  # none open
    model.open("dave")
    assert model.neighbour(1) == "carol" and model.neighbour(-1) == "bob"
    model.open("carol")
    assert model.neighbour(1) == "carol"
    model.open("bob")
    assert model.neighbour(-1) == "bob"


def test_a_ca_pem_that_is_not_the_clusters_is_said_in_the_status_bar_and_at_login(tmp_path):
    """Not "cannot reach any server": the servers answer, with certificates the app's
    ca.pem did not sign; the bar names the file, a login the nodes and what to do."""
    from paxchat import tls
    from paxchat.client.api import PaxchatClient
    from paxchat.client.targets import NodeTarget, targets_from_addresses
    from twisted.internet.testing import MemoryReactorClock
    from cryptography import x509
    from .client_fakes import FakeNodes
    from .test_client_failover import POLICY, PORTS
    from .test_tls import make_config
    ours, theirs = make_config(tmp_path / "ours"), make_config(tmp_path / "theirs")
    tls.make_cluster_certs(ours)
    tls.make_cluster_certs(theirs)
    ca = tls.read_client_ca(ours.ca_path)
    node_cert = x509.load_pem_x509_certificate(theirs.node_cert_path(1).read_bytes())
    reactor = MemoryReactorClock()
    plain = targets_from_addresses(reactor, {i: ("127.0.0.1", p) for i, p in PORTS.items()})
    targets = [NodeTarget(t.node_id, t.endpoint, t.label, ca) for t in plain]
    nodes = FakeNodes(reactor)
    model = ChatModel()
    ctl = ChatController(reactor, model, lambda on_event, on_status: PaxchatClient(
        reactor, targets, on_event=on_event, on_status=on_status, policy=POLICY, random=lambda: 0.0))

    def dial_round():
        for _ in PORTS:
            reactor.advance(0)
            nodes.accept().refuse_certificate([node_cert])
    ctl.start()
    dial_round()
    assert model.status == (f"Offline: TLS refused the servers' certificates (certificate not signed by"
                            f" the CA in {ours.ca_path}). Retrying…")
    assert model.status_level == "danger"
    ctl.log_in("alice", "pw-123456")
    dial_round()
    assert model.error.startswith(
        "TLS refused the paxchat servers' certificates: node 1 (127.0.0.1:7101), node 2 (127.0.0.1:7102)"
        f" and node 3 (127.0.0.1:7103): certificate not signed by the CA in {ours.ca_path} (it was issued by")
    assert f"copy the cluster's own ca.pem there" in model.error
    assert model.screen == "login" and not model.busy
    ctl.stop()


def test_the_keys_walk_the_sidebar_from_find_people_and_back():
    model, changes = model_for()
    assert not model.enter_list() and model.list_cursor is None     # no row to go to
    model.add_messages([msg(1, "carol", "alice", ts=10.0), msg(2, "bob", "alice", ts=30.0),
                        msg(3, "dave", "alice", ts=20.0)])
    assert model.list_peers() == ["bob", "dave", "carol"]
    changes.clear()
    # Down from Find people: the first row, which the drawing marks (and only it).
    assert model.enter_list() and model.list_cursor == "bob" and {"list"} in changes
    assert [r["peer"] for r in model.conversation_rows() if r["cursor"]] == ["bob"]
    assert model.move_list_cursor(1) and model.list_cursor == "dave"
    assert model.move_list_cursor(5) and model.list_cursor == "carol"      # stops at the last row
    assert model.move_list_cursor(-5) and model.list_cursor == "bob"       # and, a page up, at the first
    # The row stays on its person when a new message moves them up the list.
    model.move_list_cursor(1)
    model.add_messages([msg(4, "carol", "alice", ts=40.0)])
    assert model.list_peers() == ["carol", "bob", "dave"] and model.list_cursor == "dave"
    model.list_cursor_to_end(False)
    assert model.list_cursor == "carol"
    model.list_cursor_to_end(True)
    assert model.list_cursor == "dave"
    # Up on the first row leaves the list, for Find people.
    model.list_cursor_to_end(False)
    assert not model.move_list_cursor(-1) and model.list_cursor is None
    assert not any(r["cursor"] for r in model.conversation_rows())
    # Opening a conversation takes the keys to its compose box: no row is theirs.
    model.enter_list()
    model.open("bob")
    assert model.list_cursor is None and model.open_peer == "bob"
    # The open conversation's row and the keys' row are told apart.
    model.enter_list()
    model.move_list_cursor(1)
    rows = {r["peer"]: (r["open"], r["cursor"]) for r in model.conversation_rows()}
    assert rows == {"carol": (False, False), "bob": (True, True), "dave": (False, False)}
    model.signed_out()
    assert model.list_cursor is None


def test_while_a_search_is_shown_the_keys_walk_its_results():
    model, _ = model_for()
    model.add_messages([msg(1, "bob", "alice")])
    model.enter_list()
    # Results replace the list: the keys start again from Find people.
    model.set_search("c*", ["carl", "alice", "cora"], False)
    assert model.list_cursor is None and model.list_peers() == ["carl", "cora"]    # not oneself
    assert model.enter_list() and model.list_cursor == "carl"
    assert model.move_list_cursor(1) and model.list_cursor == "cora"
    model.clear_search()
    assert model.list_cursor is None and model.list_peers() == ["bob"]
    # No one found: nowhere to go.
    model.set_search("z*", [], False)
    assert not model.enter_list() and not model.move_list_cursor(1) and model.list_cursor is None
    # A cursor left on a row the list no longer has starts again from the first.
    model.set_search("c*", ["carl", "cora"], False)
    model.list_cursor = "bob"
    assert model.move_list_cursor(1) and model.list_cursor == "carl"
