"""The real Tk window under Xvfb rides out kill -9 of its node in a 3-node cluster.

The window logs in on one node and chats with a second client on another;
then its node is killed. The status bar must say so and then name another
node, a message typed while it reconnects must arrive exactly once, the
second client's next message must show up, and no error may be shown.
"""

import collections
import shutil

import pytest
import pytest_twisted
from twisted.internet import task

from .cluster_support import (  # noqa: F401  (cluster_factory is a fixture)
    all_history, cluster_factory, create_accounts, logged_in, password, requires_replicated_log, started,
    wait_until, within)

pytestmark = [
    pytest.mark.skipif(shutil.which("Xvfb") is None, reason="Xvfb is not installed (apt-get install xvfb)"),
    requires_replicated_log,
]


def canvas_texts(canvas):
    return [canvas.itemcget(i, "text") for i in canvas.find_all() if canvas.type(i) == "text"]


def shown_texts(app):
    """Every piece of text the window shows now: labels, banner, bubbles, list."""
    labels = [app.status_label, app.error_banner, app.login_error, app.peer_label, app.me_label]
    return [w.cget("text") for w in labels] + canvas_texts(app.canvas) + canvas_texts(app.list_canvas)


def next_turn(reactor):
    """One reactor turn (not a pause: lets queued writes and redraws happen)."""
    return task.deferLater(reactor, 0, lambda: None)


@within(45)
@pytest_twisted.inlineCallbacks
def test_the_window_fails_over_when_its_node_is_killed(cluster_factory, tmp_path):
    tk = pytest.importorskip("tkinter")
    from twisted.internet import reactor, tksupport
    from paxchat.client.gui import ChatApp, client_maker
    from .xvfb import can_screenshot, on_screen, shared_xvfb

    cluster, leader = yield started(cluster_factory)
    yield create_accounts(cluster, "alice", "bob")
    # The window talks to the leader, so killing its node also forces an election.
    window_node = leader
    bob_node = next(n for n in cluster.node_ids if n != window_node)
    bob_events = []
    bob = yield logged_in(cluster, "bob", prefer=bob_node, on_event=bob_events.append)
    assert bob.node == bob_node

    def bob_got(body):
        return [e for e in bob_events if e.get("event") == "message" and e["message"]["body"] == body]

    with shared_xvfb(1000, 680) as x:
        root = tk.Tk(screenName=x.display, className="paxchat")
        tksupport.install(root)
        app = None
        try:
            app = ChatApp(root, reactor, client_maker(reactor, str(cluster.config.path), prefer_node=window_node))
            model = app.model
            errors, drawn = [], []
            show_error = model.show_error
            model.show_error = lambda reason: (errors.append(reason), show_error(reason))
            draw_status = app._draw_status
            app._draw_status = lambda: (draw_status(), drawn.append(app.status_label.cget("text")))

            yield wait_until(reactor, lambda: model.status.startswith(f"Connected to node {window_node} "),
                             10, f"the window to connect to node {window_node}")

            # Log in and open the conversation with bob by clicking his row in the search results.
            app.user_entry.insert(0, "alice")
            app.password_entry.insert(0, password("alice"))
            app.login_button.invoke()
            yield wait_until(reactor, lambda: model.screen == "chats", 10, "the chats screen")
            app.search_entry.focus_force()
            # A generated key goes where the keyboard focus is, once the X server has moved it.
            yield wait_until(reactor, lambda: root.update() or root.focus_get() is app.search_entry, 5,
                             "the keyboard focus in Find people")
            app.search_entry.insert(0, "bob")
            app.search_entry.event_generate("<Return>")
            yield wait_until(reactor, lambda: model.search_results == ["bob"] and app._list_rows, 10,
                             "bob in the search results")
            top, bottom, _ = app._list_rows[0]
            app.list_canvas.event_generate("<Button-1>", x=60, y=(top + bottom) // 2)
            yield wait_until(reactor, lambda: model.open_peer == "bob", 5, "the conversation with bob")

            def type_and_send(text):
                app.compose.insert("end", text)
                app.compose.event_generate("<Return>")
                assert app.compose.get("1.0", "end-1c") == "", "Enter did not send"

            # Send and receive before the fault.
            app.compose.focus_force()
            root.update()
            assert root.focus_get() is app.compose
            type_and_send("Hi bob, before the failover.")
            yield wait_until(reactor, lambda: bob_got("Hi bob, before the failover."), 10, "bob to get it")
            yield bob.send_message("alice", "Hi alice, I am on another node.")
            yield wait_until(reactor, lambda: "Hi alice, I am on another node." in canvas_texts(app.canvas),
                             10, "bob's message in the window")

            # As soon as the client starts reconnecting, type a message: it must wait, then go once.
            typed_while = []
            set_status = model.set_status

            def watch_status(status):
                set_status(status)
                if status.state == "reconnecting" and not typed_while:
                    typed_while.append(None)
                    reactor.callLater(0, type_when_the_bar_says_reconnecting, 200)

            def type_when_the_bar_says_reconnecting(turns):
                if app.status_label.cget("text") != "Reconnecting…" and turns:
                    reactor.callLater(0, type_when_the_bar_says_reconnecting, turns - 1)
                    return
                typed_while[0] = (app.controller.client.status.state, app.status_label.cget("text"))
                type_and_send("Typed while reconnecting.")
            model.set_status = watch_status

            # One message goes out in the same moment the node dies: sent or not, it must arrive once.
            type_and_send("Sent as the node dies.")
            yield next_turn(reactor)
            cluster.kill(window_node)

            yield wait_until(reactor, lambda: typed_while and typed_while[0], 10, "the client to reconnect")
            assert typed_while[0] == ("reconnecting", "Reconnecting…"), typed_while
            yield wait_until(reactor, lambda: app.controller.client.connected, 20, "the window to fail over")
            new_node = app.controller.client.node
            assert new_node not in (window_node, None)
            yield wait_until(reactor, lambda: app.status_label.cget("text").startswith(
                f"Connected to node {new_node} "), 5, "the status bar to name the new node")
            after_kill = drawn[drawn.index("Reconnecting…"):]
            assert after_kill[-1].startswith(f"Connected to node {new_node} "), drawn
            # The new node may have answered hello before it noticed: the leader shown catches up.
            new_leader = yield cluster.wait_leader()
            yield wait_until(reactor, lambda: app.status_label.cget("text") == (
                f"Connected to node {new_node} · leader {new_leader}"), 8, "the status bar to name the new leader")

            # Both messages are delivered, each exactly once, and the window shows them as sent.
            for body in ("Sent as the node dies.", "Typed while reconnecting."):
                yield wait_until(reactor, lambda body=body: bob_got(body), 20, f"bob to get {body!r}")
            yield wait_until(reactor, lambda: not model.conversation("bob").pending, 10, "no bubble still sending")

            # bob, after the failover: it appears in the window.
            yield bob.send_message("alice", "Welcome back, alice. Node down, chat up.")
            yield wait_until(reactor, lambda: "Welcome back, alice. Node down, chat up." in canvas_texts(app.canvas),
                             10, "bob's message after the failover in the window")

            history = yield all_history(bob, peer="alice")
            stored = collections.Counter(m["body"] for m in history)
            mine = ["Hi bob, before the failover.", "Sent as the node dies.", "Typed while reconnecting."]
            assert {body: stored[body] for body in mine} == {body: 1 for body in mine}, stored
            assert len(bob_got("Typed while reconnecting.")) == 1 and len(bob_got("Sent as the node dies.")) == 1
            shown = collections.Counter(m["body"] for m in model.conversation("bob").messages.values())
            assert all(shown[body] == 1 for body in mine), shown

            # No error, no traceback, anywhere on the window.
            assert not errors and not model.error, errors
            assert not app.error_banner.winfo_ismapped()
            assert not [t for t in shown_texts(app) if "Traceback" in t or "Error" in t], shown_texts(app)

            if can_screenshot():
                yield wait_until(reactor, lambda: not app.coalescer.pending, 5, "the window redrawn")
                on_screen(root)
                shot = tmp_path / "failover.png"
                x.screenshot(shot)
                assert shot.stat().st_size > 5000
                print(f"\nscreenshot of the reconnected window: {shot}")
            print(f"status bar after the kill of node {window_node}: {drawn[drawn.index('Reconnecting…'):]}")
        finally:
            if app is not None:
                yield app.close()
            tksupport.uninstall()
            root.destroy()
