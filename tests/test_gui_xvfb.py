"""The real Tk window under Xvfb against a real node: log in, find, send, receive, burst."""

import os
import shutil

import pytest
import pytest_twisted
from twisted.internet import defer

from .test_client_e2e import client_for, node, node_service, wait_for  # noqa: F401  (node and node_service are fixtures)
from .test_gui_model import msg

pytestmark = pytest.mark.skipif(shutil.which("Xvfb") is None, reason="Xvfb is not installed (apt-get install xvfb)")


@defer.inlineCallbacks
def settings_taken(client, timeout=10.0):
    """Poll until the cluster takes ``set_settings`` (bob's own, as it already is)."""
    from twisted.internet import reactor, task

    from paxchat.client.errors import ServerError
    deadline = reactor.seconds() + timeout
    while True:
        try:
            yield client.set_settings(True)
            return
        except ServerError as e:
            if e.code != "upgrade_in_progress" or reactor.seconds() > deadline:
                raise
        yield task.deferLater(reactor, 0.05, lambda: None)


def canvas_texts(canvas):
    return [canvas.itemcget(i, "text") for i in canvas.find_all() if canvas.type(i) == "text"]


@pytest_twisted.inlineCallbacks
def test_chat_in_the_window(node, tmp_path):
    import tkinter as tk
    from twisted.internet import reactor, task, tksupport
    from paxchat.client.gui import ChatApp, client_maker
    from paxchat.client.gui_theme import COLORS
    from .xvfb import can_screenshot, on_screen, pixel, shared_xvfb

    with shared_xvfb(1000, 680) as x:
        root = tk.Tk(screenName=x.display, className="paxchat")
        tksupport.install(root)
        app = None
        bob = client_for(node)
        bob_events = []
        bob.on_event = bob_events.append
        try:
            closed = []
            app = ChatApp(root, reactor, client_maker(reactor, str(node.path)), on_closed=lambda: closed.append(1))
            model = app.model
            yield wait_for(lambda: model.status.startswith("Connected to node 1"), 10)
            yield bob.create_account("bob", "bob-password")
            yield bob.login("bob", "bob-password")

            # Create an account from the login screen.
            app.user_entry.insert(0, "alice")
            app.password_entry.insert(0, "short")
            app.create_button.invoke()             # shows the field to type the password again
            app.repeat_entry.insert(0, "short")
            app.create_button.invoke()
            yield wait_for(lambda: app.login_error.cget("text"), 10)     # drawn, not just in the model
            assert app.login_error.cget("text") == "That password is not allowed: use 8 to 1,024 bytes."
            yield wait_for(lambda: app.repeat_entry.get() == "", 5)
            app.password_entry.insert(0, "alice-password")
            app.repeat_entry.insert(0, "alice-password")
            app.create_button.invoke()
            yield wait_for(lambda: model.screen == "chats" and app.me_label.cget("text"), 10)
            assert app.me_label.cget("text") == "alice"

            # Find bob by wildcard and open the conversation by clicking his row.
            app.search_entry.focus_force()
            root.update()
            app.search_entry.insert(0, "b*")
            app.search_entry.event_generate("<Return>")
            yield wait_for(lambda: model.search_results == ["bob"], 10)
            yield wait_for(lambda: app._list_rows, 5)
            top, bottom, peer = app._list_rows[0]
            app.list_canvas.event_generate("<Button-1>", x=60, y=(top + bottom) // 2)
            yield wait_for(lambda: model.open_peer == "bob", 5)

            # Enter sends, Shift+Enter makes a new line.
            app.compose.focus_force()
            root.update()
            app.compose.insert("end", "Hi bob!")
            app.compose.event_generate("<Shift-Return>")
            app.compose.insert("end", "Second line.")
            app.compose.event_generate("<Return>")
            yield wait_for(lambda: bob_events, 10)
            assert bob_events[0]["message"]["body"] == "Hi bob!\nSecond line."
            assert app.compose.get("1.0", "end-1c") == ""

            # A message refused here stays in the compose box, to cut down.
            app.compose.insert("end", "x" * 16385)
            app.compose.event_generate("<Return>")
            assert "too long" in model.error
            assert app.compose.get("1.0", "end-1c") == "x" * 16385
            app.compose.delete("1.0", "end")

            # bob answers: it shows up at once, aligned left with his name.
            yield bob.send_message("alice", "Hey alice, good to see you here. How is the failover testing going?")
            yield wait_for(lambda: any("failover" in t for t in canvas_texts(app.canvas)), 10)
            yield wait_for(lambda: not model.conversation("bob").unread_ids, 5)

            # A burst of messages is drawn in few redraws and the window keeps up.
            redraws = []
            original = app.redraw
            app.redraw = lambda parts: (redraws.append(parts), original(parts))
            app.coalescer.redraw = app.redraw
            burst = [bob.send_message("alice", f"burst {i}") for i in range(300)]
            yield defer.gatherResults(burst)
            yield wait_for(lambda: len(model.conversation("bob").messages) >= 302, 20)
            yield wait_for(lambda: "burst 299" in canvas_texts(app.canvas), 10)
            assert len(redraws) < 150, f"{len(redraws)} redraws for 300 messages"
            assert model.conversation("bob").unread == 0

            # Select a message and delete it.
            mine = [i for i, m in model.conversation("bob").messages.items() if m["from"] == "alice"][0]
            model.toggle_selected(mine)
            yield wait_for(lambda: app.delete_button.winfo_ismapped(), 5)
            app.delete_button.invoke()
            yield wait_for(lambda: app.confirm_delete_button.winfo_ismapped(), 5)
            app.confirm_delete_button.invoke()
            yield wait_for(lambda: mine not in model.conversation("bob").messages, 10)

            # What alice sends or deletes from another device shows here at once.
            phone = client_for(node)
            yield phone.login("alice", "alice-password")
            sent = yield phone.send_message("bob", "sent from my phone")
            yield wait_for(lambda: any("sent from my phone" in t for t in canvas_texts(app.canvas)), 10)
            yield phone.delete_messages([sent["message_id"]])
            yield wait_for(lambda: not any("sent from my phone" in t for t in canvas_texts(app.canvas)), 10)
            yield phone.close()

            # A friendly screen for the screenshot: the first exchange, at the bottom.
            yield bob.send_message("alice", "Great, all three nodes agree.\nShip it! 🚀".replace("🚀", ""))
            app.compose.insert("end", "Shipping it now. Thanks bob!")
            app.compose.event_generate("<Return>")
            yield wait_for(lambda: any("Shipping" in t for t in canvas_texts(app.canvas)), 10)
            yield wait_for(lambda: not model.conversation("bob").pending, 10)
            # Under it, "Sent"; "Read" as soon as bob has read it.
            receipt = lambda: [app.canvas.itemcget(i, "text") for i in app.canvas.find_withtag("receipt")]  # noqa: E731
            yield wait_for(lambda: receipt() == ["Sent"], 5)
            shipping = lambda: [e["message"]["id"] for e in bob_events  # noqa: E731
                                if e.get("message", {}).get("body", "").startswith("Shipping")]
            yield wait_for(shipping, 10)
            yield bob.mark_read(shipping())
            yield wait_for(lambda: receipt() == ["Read"], 10)
            if can_screenshot():
                # Every change drawn into the window, and the drawing on the screen.
                yield wait_for(lambda: not app.coalescer.pending, 5)
                on_screen(root)
                shot = tmp_path / "screenshot.png"
                image = x.screenshot(shot)
                assert shot.stat().st_size > 5000
                # It shows the window as it stands: alice's newest message is a blue bubble
                # where the conversation has it.
                [text] = [i for i in app.canvas.find_all() if app.canvas.type(i) == "text"
                          and app.canvas.itemcget(i, "text").startswith("Shipping")]
                bubble = [i for i in app.canvas.find_withtag(app.canvas.gettags(text)[1])
                          if app.canvas.type(i) == "polygon"][0]
                left, top, _, bottom = app.canvas.bbox(bubble)
                at = (app.canvas.winfo_rootx() + left - int(app.canvas.canvasx(0)) + 6,
                      app.canvas.winfo_rooty() + (top + bottom) // 2 - int(app.canvas.canvasy(0)))
                assert "#%02X%02X%02X" % pixel(image, *at) == COLORS["accent"]
                target = os.environ.get("PAXCHAT_SCREENSHOT")
                if target:
                    shutil.copy(shot, target)

            # A message bob deletes leaves alice's window too.
            oops = yield bob.send_message("alice", "oops, wrong window")
            yield wait_for(lambda: any("wrong window" in t for t in canvas_texts(app.canvas)), 10)
            yield bob.delete_messages([oops["message_id"]])
            yield wait_for(lambda: not any("wrong window" in t for t in canvas_texts(app.canvas)), 10)

            # Read receipts off from the Account menu: "Read" goes, on both sides.
            @defer.inlineCallbacks
            def bob_sees(read):
                """Poll until every message bob sent alice shows ``read`` to him."""
                deadline = reactor.seconds() + 10
                while True:
                    page = yield bob.history(peer="alice", limit=5)
                    flags = [m["read"] for m in page["messages"] if m["from"] == "bob"]
                    if flags and all(flag is read for flag in flags):
                        return
                    assert reactor.seconds() < deadline, f"bob sees {flags}"
                    yield task.deferLater(reactor, 0.05, lambda: None)
            yield wait_for(lambda: model.read_receipts is True, 10)
            assert app.read_receipts.get() is True
            yield bob_sees(True)                            # alice has read what bob sent
            # A new cluster takes settings once its leader has moved the apply
            # version (paxchat/upgrades.py: a check a second); until then the
            # window would say the upgrade is not done, and keep them on.
            yield settings_taken(bob)
            # Greyed out until the window draws the setting it loaded: Tk ignores
            # a click on a disabled entry, as a user's would do nothing.
            entry = app.account_menu.index("Read receipts")
            yield wait_for(lambda: app.account_menu.entrycget(entry, "state") == "normal", 5)
            shown = model.error
            app.account_menu.invoke(entry)
            # The setting, or what the window says went wrong instead.
            yield wait_for(lambda: model.read_receipts is False or model.error != shown, 10)
            assert model.read_receipts is False, f"read receipts stayed on: {model.error!r}"
            assert app.read_receipts.get() is False
            yield wait_for(lambda: receipt() == ["Sent"], 5)
            yield bob_sees(False)

            # A message the server refuses (its recipient was deleted) goes back into the compose box.
            carol = client_for(node)
            yield carol.create_account("carol", "carol-password")
            yield carol.login("carol", "carol-password")
            app.open_conversation("carol")
            yield carol.delete_account("carol-password")
            yield carol.close()
            app.compose.insert("end", "Are you there, carol?")
            app.compose.event_generate("<Return>")
            yield wait_for(lambda: model.error.startswith("Not sent"), 10)
            yield wait_for(lambda: app.compose.get("1.0", "end-1c") == "Are you there, carol?", 5)
            assert not model.conversation("carol").pending

            # Log out returns to the login screen.
            app.account_menu.invoke(0)
            yield wait_for(lambda: model.screen == "login", 10)

            # Closing the window (WM_DELETE_WINDOW) stops the client, then calls on_closed.
            yield app.close()
            assert closed == [1] and app.controller.client.status.state == "closed"
        finally:
            yield bob.close()
            if app is not None:
                yield app.close()
            tksupport.uninstall()
            root.destroy()


def fake_app(root):
    """The window driven by a fake client (tests/test_gui_model.py): layout only, no node."""
    from twisted.internet import reactor
    from paxchat.client.gui import ChatApp
    from .test_gui_model import FakeClient
    client = FakeClient()
    client.auto = {"close": None}
    return ChatApp(root, reactor, lambda on_event, on_status: client), client


@defer.inlineCallbacks
def with_fake_app(test):
    """Run ``test(root, app, client)`` (a generator of Deferreds) on a window of its own
    driven by a fake client; the window and the Tk loop go whatever happens."""
    import tkinter as tk
    from twisted.internet import tksupport
    from .xvfb import shared_xvfb

    with shared_xvfb(1000, 680) as x:
        root = tk.Tk(screenName=x.display, className="paxchat")
        tksupport.install(root)
        app = None
        try:
            app, client = fake_app(root)
            yield defer.inlineCallbacks(test)(root, app, client)
        finally:
            if app is not None:
                yield app.close()
            tksupport.uninstall()
            root.destroy()


@pytest_twisted.inlineCallbacks
def test_a_long_conversation_list_scrolls():
    from .test_gui_model import msg

    def test(root, app, client):
        app.model.signed_in("alice")
        app.model.add_messages([msg(i, f"peer{i:02}", "alice", read=True) for i in range(1, 21)])
        yield wait_for(lambda: len(app._list_rows) == 20 and app.list_scroll.winfo_ismapped(), 5)
        bar = app.list_scroll
        assert bar.winfo_width() >= 8 and bar.winfo_height() > 200
        # A click low in the trough pages the list down.
        assert app.list_canvas.yview()[0] == 0.0
        bar.event_generate("<Button-1>", x=bar.winfo_width() // 2, y=bar.winfo_height() - 30)
        bar.event_generate("<ButtonRelease-1>", x=bar.winfo_width() // 2, y=bar.winfo_height() - 30)
        yield wait_for(lambda: app.list_canvas.yview()[0] > 0.0, 5)
    yield with_fake_app(test)


@pytest_twisted.inlineCallbacks
def test_resizing_keeps_the_place_in_the_conversation():
    from .test_gui_model import msg

    def test(root, app, client):
        canvas = app.canvas
        client.auto["history"] = {"messages": [msg(i, "bob", "alice", f"message {i}", read=True)
                                               for i in range(50, 0, -1)], "more": False}
        app.model.signed_in("alice")
        # No conversation open: nothing to send to, so compose and Send are off.
        yield wait_for(lambda: app.compose.cget("state") == "disabled", 5)
        assert app.send_button.instate(["disabled"])
        app.open_conversation("bob")
        yield wait_for(settled(app, lambda: canvas.find_withtag("msg50") and canvas.yview()[1] >= 0.999), 5)
        assert app.compose.cget("state") == "normal" and not app.send_button.instate(["disabled"])

        # At the bottom, shrinking the window keeps the newest message in view.
        height = canvas.winfo_height()
        root.geometry("800x500")
        yield wait_for(lambda: canvas.winfo_height() < height and canvas.yview()[1] >= 0.999, 5)

        # Scrolled up, growing the window does not jump to the bottom.
        for _ in range(5):
            canvas.event_generate("<Button-4>")
        first = canvas.yview()[0]
        assert canvas.yview()[1] < 0.999
        height = canvas.winfo_height()
        redraws = []
        original = app.coalescer.redraw
        app.coalescer.redraw = lambda parts: (redraws.append(parts), original(parts))
        root.geometry("1000x600")
        yield wait_for(lambda: canvas.winfo_height() > height and any("conversation" in p for p in redraws), 5)
        assert canvas.yview()[1] < 0.999 and canvas.yview()[0] == first
    yield with_fake_app(test)


def settled(app, condition):
    """A ``wait_for`` condition: ``condition()`` holds once the window is laid out.

    Laid out: the conversation is taller than a stub (a 1-pixel canvas is
    "at the bottom" too), kept its size since the last poll, and no redraw
    is pending. On a busy machine the window settles over several turns.
    """
    last = []

    def check():
        size = (app.canvas.winfo_width(), app.canvas.winfo_height())
        stable, last[:] = last == [size], [size]
        return stable and size[1] > 100 and not app.coalescer.pending and bool(condition())
    return check


def open_long_conversation(app, client, more=False):
    """Sign in and open a 50-message conversation with bob, scrolled to its newest message."""
    client.auto["history"] = {"messages": [msg(i, "bob", "alice", f"message {i}", read=True)
                                           for i in range(50, 0, -1)], "more": more}
    app.model.signed_in("alice")
    app.open_conversation("bob")
    return wait_for(settled(app, lambda: app.canvas.find_withtag("msg50")
                            and app.canvas.yview()[1] >= 0.999), 5)


@pytest_twisted.inlineCallbacks
def test_selecting_a_message_does_not_move_the_conversation():
    def test(root, app, client):
        yield open_long_conversation(app, client)
        root.update()
        canvas = app.canvas
        before = (canvas.winfo_rooty(), canvas.winfo_height(), canvas.yview())
        app.model.toggle_selected(50)
        yield wait_for(lambda: app.delete_button.winfo_ismapped(), 5)
        root.update()
        assert (canvas.winfo_rooty(), canvas.winfo_height(), canvas.yview()) == before
        button, header = app.delete_button, app.delete_button.master
        assert 0 <= button.winfo_y() and button.winfo_y() + button.winfo_height() <= header.winfo_height()
    yield with_fake_app(test)


@pytest_twisted.inlineCallbacks
def test_keys_scroll_the_conversation():
    def test(root, app, client):
        yield open_long_conversation(app, client, more=True)
        del client.auto["history"]  # older pages wait for the test to answer them
        canvas = app.canvas

        def older_loads():
            return [c[3] for c in client.calls if c[0] == "history" and c[2].get("before") == 1]

        def key(name):
            root.focus_get().event_generate(name)
            root.update()

        # In the compose box the keys edit the text: the conversation stays put.
        app.compose.focus_force()
        root.update()
        key("<Prior>")
        assert canvas.yview()[1] >= 0.999
        # Clicked, the conversation takes the keys.
        canvas.event_generate("<Button-1>", x=5, y=5)
        root.update()
        assert root.focus_get() is canvas
        key("<Prior>")
        first = canvas.yview()[0]
        assert canvas.yview()[1] < 0.999 and not app._at_bottom
        key("<Prior>")
        assert canvas.yview()[0] < first
        key("<Next>")
        assert abs(canvas.yview()[0] - first) < 0.01
        # Home goes to the top, which loads older messages...
        key("<Home>")
        assert canvas.yview()[0] == 0.0 and len(older_loads()) == 1
        older_loads()[0].callback({"messages": [], "more": True})
        root.update()
        # ...and so does Page Up there.
        key("<Prior>")
        assert len(older_loads()) == 2
        older_loads()[1].callback({"messages": [], "more": True})
        # End goes to the newest message and follows new ones again.
        key("<End>")
        assert canvas.yview()[1] >= 0.999 and app._at_bottom
        app.model.add_messages([msg(51, "bob", "alice", "new one", read=True)])
        yield wait_for(lambda: canvas.find_withtag("msg51") and canvas.yview()[1] >= 0.999, 5)
    yield with_fake_app(test)


@pytest_twisted.inlineCallbacks
def test_the_delete_key_asks_then_deletes_the_selected_messages():
    def test(root, app, client):
        yield open_long_conversation(app, client)
        client.auto["delete_messages"] = {"deleted": 2}
        canvas = app.canvas
        root.update()
        top = canvas.winfo_rooty()

        def key(name):
            root.focus_get().event_generate(name)
            root.update()

        app.model.toggle_selected(49)
        app.model.toggle_selected(50)
        # In the compose box Delete edits the text.
        app.compose.focus_force()
        root.update()
        key("<Delete>")
        assert not app.model.confirming_delete
        # Elsewhere it asks, in the header, which keeps its height.
        canvas.event_generate("<Button-1>", x=5, y=5)
        root.update()
        key("<Delete>")
        yield wait_for(lambda: app.confirm_bar.winfo_ismapped() and not app.delete_button.winfo_ismapped(), 5)
        assert app.confirm_label.cget("text") == "Delete 2 messages for both of you? No undo."
        assert canvas.winfo_rooty() == top
        # Escape takes the question back; nothing is deleted.
        key("<Escape>")
        yield wait_for(lambda: app.delete_button.winfo_ismapped() and not app.confirm_bar.winfo_ismapped(), 5)
        assert not [c for c in client.calls if c[0] == "delete_messages"]
        key("<Delete>")
        yield wait_for(lambda: app.confirm_bar.winfo_ismapped(), 5)
        app.confirm_delete_button.invoke()
        yield wait_for(lambda: not canvas.find_withtag("msg50") and not app.confirm_bar.winfo_ismapped(), 5)
        assert client.last("delete_messages")[1] == ([49, 50],)
    yield with_fake_app(test)


@pytest_twisted.inlineCallbacks
def test_each_conversation_keeps_its_draft_and_alt_arrows_move_between_them():
    from paxchat.client.errors import ServerError
    from .test_gui_model import msg

    def test(root, app, client):
        client.auto["history"] = {"messages": [], "more": False}
        app.model.signed_in("alice")
        app.model.add_messages([msg(1, "bob", "alice", ts=30.0, read=True),
                                msg(2, "carol", "alice", ts=20.0, read=True)])
        app.open_conversation("bob")
        yield wait_for(lambda: app.compose.cget("state") == "normal", 5)

        def key(name):
            app.compose.focus_force()
            root.update()
            app.compose.event_generate(name)
            root.update()

        def typed():
            return app.compose.get("1.0", "end-1c")

        app.compose.insert("1.0", "half a thought for bob")
        key("<Alt-Down>")
        assert app.model.open_peer == "carol" and typed() == ""
        app.compose.insert("1.0", "for carol")
        key("<Alt-Down>")                      # the last row: stays
        assert app.model.open_peer == "carol" and typed() == "for carol"
        key("<Alt-Up>")
        assert app.model.open_peer == "bob" and typed() == "half a thought for bob"
        assert app.model.drafts == {"carol": "for carol"}

        # A send refused after its conversation was left becomes that conversation's draft.
        app.compose.delete("1.0", "end")
        app.compose.insert("1.0", "refused one")
        app.send_button.invoke()
        send = client.last("send_message")[3]
        assert typed() == ""
        key("<Alt-Down>")
        assert typed() == "for carol"
        send.errback(ServerError("rate_limited", "too many writes; slow down"))
        root.update()
        assert typed() == "for carol"          # what is being typed is not touched
        key("<Alt-Up>")
        assert typed() == "refused one"
    yield with_fake_app(test)


@pytest_twisted.inlineCallbacks
def test_deleting_the_account_asks_in_a_panel_that_holds_the_window():
    def test(root, app, client):
        yield open_long_conversation(app, client)
        app.compose.focus_force()        # the window has the focus, the user was typing
        app.compose.insert("1.0", "not meant to go")
        root.update()
        app.account_menu.invoke(app.account_menu.index("Delete account…"))
        yield wait_for(lambda: app.danger.winfo_ismapped(), 5)
        assert root.grab_current() is app.danger
        yield wait_for(lambda: root.focus_get() is app.danger_password, 5)
        # A click on Send behind the panel goes nowhere.
        button = app.send_button
        button.event_generate("<Enter>")
        button.event_generate("<Button-1>", x=5, y=5)
        button.event_generate("<ButtonRelease-1>", x=5, y=5)
        root.update()
        assert not [c for c in client.calls if c[0] == "send_message"]
        # Escape takes the question back and gives the window back.
        app.danger_password.insert(0, "secret-password")
        app.danger_password.event_generate("<Escape>")
        root.update()
        assert not app.danger.winfo_ismapped() and root.grab_current() is None
        assert not [c for c in client.calls if c[0] == "delete_account"]
        # A wrong password is said in the panel, which stays, its field emptied to type again.
        from paxchat.client.errors import ServerError
        client.auto["delete_account"] = ServerError("bad_credentials", "no")
        app.account_menu.invoke(app.account_menu.index("Delete account…"))
        yield wait_for(lambda: root.grab_current() is app.danger, 5)
        app.danger_password.insert(0, "wrong-password")
        app.danger_button.invoke()
        yield wait_for(lambda: root.update() or app.danger_error.winfo_ismapped(), 5)
        assert app.danger_error.cget("text") == "That password is wrong."
        assert app.danger_error.master is app.danger
        assert not app.error_row.winfo_ismapped() and app.danger.winfo_ismapped()
        assert root.grab_current() is app.danger
        yield wait_for(lambda: root.update() or root.focus_get() is app.danger_password, 5)
        assert app.danger_password.get() == ""
        # Wrong again: said again, and emptied again.
        app.danger_password.insert(0, "wrong-again")
        app.danger_password.event_generate("<Return>")
        yield wait_for(lambda: root.update() or app.danger_password.get() == "", 5)
        assert app.danger_error.cget("text") == "That password is wrong."
        assert len([c for c in client.calls if c[0] == "delete_account"]) == 2
        # Cancelled, the error goes with the panel; asked again, it starts clean.
        app.danger_password.event_generate("<Escape>")
        yield wait_for(lambda: root.update() or not app.danger.winfo_ismapped(), 5)
        assert app.model.error == "" and not app.error_row.winfo_ismapped()
        # Asked again and answered: the account goes, and so do the panel and its hold.
        client.auto["delete_account"] = {}
        app.account_menu.invoke(app.account_menu.index("Delete account…"))
        yield wait_for(lambda: root.grab_current() is app.danger, 5)
        assert app.danger_password.get() == "" and not app.danger_error.winfo_ismapped()
        app.danger_password.insert(0, "secret-password")
        app.danger_password.event_generate("<Return>")
        yield wait_for(lambda: app.model.screen == "login" and not app.danger.winfo_ismapped(), 5)
        assert root.grab_current() is None
        assert client.last("delete_account")[1] == ("secret-password",)
    yield with_fake_app(test)


@pytest_twisted.inlineCallbacks
def test_at_the_smallest_window_the_delete_account_dialog_is_outlined_and_clear_of_the_header():
    from tkinter import ttk
    from paxchat.client.gui import DIALOG_MARGIN, DIALOG_WIDTH, MIN_HEIGHT, MIN_WIDTH
    from paxchat.client.gui_theme import COLORS
    from .xvfb import can_screenshot, on_screen, pixel, shared_xvfb

    def test(root, app, client):
        yield open_long_conversation(app, client)
        root.geometry(f"{MIN_WIDTH}x{MIN_HEIGHT}")
        yield wait_for(lambda: root.update() or (root.winfo_width(), root.winfo_height()) == (MIN_WIDTH, MIN_HEIGHT), 5)
        app.account_menu.invoke(app.account_menu.index("Delete account…"))
        dialog, shadow, header = app.danger, app.danger_shadow, app.peer_label.master
        yield wait_for(lambda: root.update() or dialog.winfo_ismapped(), 5)

        def box(widget):
            x, y = widget.winfo_rootx(), widget.winfo_rooty()
            return x, y, x + widget.winfo_width(), y + widget.winfo_height()
        left, top, right, bottom = box(dialog)
        win_left, _, win_right, _ = box(root)
        # What it asks is as it was.
        assert app.danger_text.cget("text") == (
            "This removes alice and every message sent to it, on every server. "
            "It cannot be undone. Enter your password to confirm.")
        # Narrower than the conversation was wide, centred on the window with room either side.
        assert right - left <= DIALOG_WIDTH and abs((left - win_left) - (win_right - right)) <= 1
        assert left - win_left >= 100 and right - left < app.chat.winfo_width()
        for widget in (app.danger_password, app.danger_button, app.danger_text):
            assert left < widget.winfo_rootx() and widget.winfo_rootx() + widget.winfo_width() < right
        # Well under the conversation's header, and above the status bar.
        assert top >= box(header)[3] + DIALOG_MARGIN and bottom <= app.status_bar.winfo_rooty() - DIALOG_MARGIN
        # Outlined, in a grey that shows on the white sidebar and the grey conversation alike,
        # with a shadow below and to the right.
        style = ttk.Style(root)
        line = root.winfo_rgb(style.lookup(dialog.cget("style"), "bordercolor"))
        assert str(style.lookup(dialog.cget("style"), "relief")) == "solid"
        assert line not in {root.winfo_rgb(COLORS[c]) for c in ("panel", "bg", "line")}
        assert box(shadow)[:2] > box(dialog)[:2] and box(shadow)[2:] > box(dialog)[2:]
        if can_screenshot():
            with shared_xvfb() as x:
                on_screen(root)
                image = x.screenshot(os.devnull)           # its pixels only
            middle = (top + bottom) // 2
            assert "#%02X%02X%02X" % pixel(image, left, middle) == COLORS["dialog_line"]
            assert "#%02X%02X%02X" % pixel(image, left + 3, middle) == COLORS["panel"]
            assert "#%02X%02X%02X" % pixel(image, right + 1, middle) == COLORS["dialog_shadow"]
        # A wrong password: said inside, which grows downward, and all of it still fits.
        from paxchat.client.errors import ServerError
        client.auto["delete_account"] = ServerError("bad_credentials", "no")
        app.danger_password.insert(0, "wrong-password")
        app.danger_button.invoke()
        yield wait_for(lambda: root.update() or app.danger_error.winfo_ismapped(), 5)
        yield wait_for(lambda: root.update() or box(shadow)[3] == box(dialog)[3] + 4, 5)
        assert box(dialog)[:3] == (left, top, right) and box(dialog)[3] > bottom
        assert box(dialog)[3] <= app.status_bar.winfo_rooty() - DIALOG_MARGIN
        # On a wider window it is over the conversation, as before.
        root.geometry("1000x680")
        yield wait_for(lambda: root.update() or app.chat.winfo_width() > 600, 5)
        yield wait_for(lambda: root.update() or box(dialog)[0] > app.chat.winfo_rootx() + DIALOG_MARGIN, 5)
        assert box(dialog)[2] < app.chat.winfo_rootx() + app.chat.winfo_width() - DIALOG_MARGIN
        assert box(shadow)[:2] == (box(dialog)[0] + 4, box(dialog)[1] + 4)
        # Cancelled, it goes with its shadow.
        app.danger_password.event_generate("<Escape>")
        yield wait_for(lambda: root.update() or not dialog.winfo_ismapped(), 5)
        assert not shadow.winfo_ismapped()
    yield with_fake_app(test)


@pytest_twisted.inlineCallbacks
def test_on_a_narrow_window_the_delete_question_leaves_the_peer_name_visible():
    def test(root, app, client):
        peer = "bartholomew.the.third"
        client.auto["history"] = {"messages": [msg(i, peer, "alice", f"message {i}", read=True)
                                               for i in range(3, 0, -1)], "more": False}
        app.model.signed_in("alice")
        app.open_conversation(peer)
        yield wait_for(lambda: app.canvas.find_withtag("msg3"), 5)
        app.model.toggle_selected(3)
        app.model.toggle_selected(2)
        app.model.ask_delete()
        label, bar, header = app.peer_label, app.confirm_bar, app.peer_label.master

        def shows(width, questions):
            """Lay the window out ``width`` wide: the question is one of ``questions``
            (which one depends on the fonts), and nothing overlaps."""
            root.geometry(f"{width}x680")
            # Laid out at that width, and redrawn since.
            yield wait_for(lambda: root.update() or (root.winfo_width() == width
                                                      and not app.coalescer.pending), 5)
            yield wait_for(lambda: root.update() or (not app.coalescer.pending and bar.winfo_ismapped()
                                                      and app.confirm_label.cget("text") in questions), 5)
            root.update()
            assert label.winfo_x() + label.winfo_reqwidth() <= bar.winfo_x()
            cancel = app.confirm_cancel_button
            assert cancel.winfo_rootx() + cancel.winfo_width() <= header.winfo_rootx() + header.winfo_width()
            return label.cget("text")

        full, short, shortest = app.model.delete_questions
        assert "both" in full and "undo" in full and "both" in short and "both" in shortest
        # Wide: the whole question and the whole name.
        name = yield from shows(1400, (full,))
        assert name == peer
        # The window's default width: the short question if need be, to keep the whole name.
        name = yield from shows(1000, (full, short))
        assert name == peer
        # Its narrowest: a shorter question, never none, and as much of the name as is left.
        from paxchat.client.gui import MIN_WIDTH
        name = yield from shows(MIN_WIDTH, (short, shortest))
        assert name == peer or (name.endswith("…") and peer.startswith(name[:-1]) and len(name) > 4)
        if app.confirm_label.cget("text") == short:
            assert name == peer            # the question goes before the name is cut
        # In the list the name gives way to the time beside it, and the
        # conversation's first line stays inside its canvas.
        texts = {app.list_canvas.itemcget(i, "text"): i for i in app.list_canvas.find_all()
                 if app.list_canvas.type(i) == "text"}
        row = app.model.conversation_rows()[0]
        shown = next(t for t in texts if t.startswith("bart"))
        assert shown == peer or shown.endswith("…")
        assert app.list_canvas.bbox(texts[shown])[2] <= app.list_canvas.bbox(texts[row["time"]])[0]
        first = next(i for i in app.canvas.find_all() if app.canvas.type(i) == "text"
                     and app.canvas.itemcget(i, "text").startswith("This is the beginning"))
        left, _, right, _ = app.canvas.bbox(first)
        assert 0 <= left and right <= app.canvas.winfo_width()
        # The hint under the compose box wraps rather than being cut off.
        hint = app.compose_hint
        assert hint.winfo_reqwidth() <= hint.winfo_width()
        # Asked no more: the name makes room for "Delete 2 selected", then, with
        # nothing selected, is whole again.
        app.model.cancel_delete()
        button = app.delete_button
        yield wait_for(lambda: root.update() or button.winfo_ismapped(), 5)
        assert label.winfo_x() + label.winfo_reqwidth() <= button.winfo_x()
        app.model.toggle_selected(3)
        app.model.toggle_selected(2)
        yield wait_for(lambda: root.update() or label.cget("text") == peer, 5)
    yield with_fake_app(test)


@pytest_twisted.inlineCallbacks
def test_every_scrollbar_handle_stands_out_from_its_trough():
    from tkinter import ttk

    def test(root, app, client):
        style = ttk.Style(root)

        def bars(widget):
            for child in widget.winfo_children():
                if child.winfo_class() == "TScrollbar":
                    yield child
                yield from bars(child)
        found = list(bars(root))
        assert app.list_scroll in found and app.login_scroll in found and len(found) >= 3
        for bar in found:
            name = bar.cget("style") or "Vertical.TScrollbar"
            trough = root.winfo_rgb(style.lookup(name, "troughcolor"))
            handle = root.winfo_rgb(style.lookup(name, "background"))
            hover = root.winfo_rgb(style.lookup(name, "background", ["active"]))
            pressed = root.winfo_rgb(style.lookup(name, "background", ["pressed"]))
            assert len({trough, handle, hover, pressed}) == 4
            # Nothing to scroll: ttk disables the bar, and its full-length handle is not drawn.
            assert root.winfo_rgb(style.lookup(name, "background", ["disabled"])) == trough
            assert "arrow" not in str(style.layout(name))
        yield open_long_conversation(app, client)
        [chat] = [bar for bar in found if bar.master is app.canvas.master]
        assert not chat.instate(["disabled"]) and app.list_scroll.instate(["disabled"])
    yield with_fake_app(test)


@pytest_twisted.inlineCallbacks
def test_every_scrollbar_trough_stands_out_from_what_it_scrolls():
    from tkinter import ttk

    def test(root, app, client):
        style = ttk.Style(root)
        for canvas in (app.list_canvas, app.canvas, app.login_canvas):
            [bar] = [w for w in canvas.master.winfo_children() if w.winfo_class() == "TScrollbar"]
            trough = style.lookup(bar.cget("style") or "Vertical.TScrollbar", "troughcolor")
            # Else the bar's length does not show, only its handle.
            assert root.winfo_rgb(trough) != root.winfo_rgb(canvas.cget("background")), canvas
        yield None
    yield with_fake_app(test)


@pytest_twisted.inlineCallbacks
def test_a_greyed_out_button_has_no_coloured_outline_that_reads_as_the_keyboard_focus():
    from tkinter import ttk
    from paxchat.client.gui_theme import COLORS

    def test(root, app, client):
        style = ttk.Style(root)
        app.model.signed_in("alice")     # no conversation open: Send is greyed out
        yield wait_for(lambda: root.update() or app.send_button.instate(["disabled"]), 5)
        for button in (app.send_button, app.danger_button):
            name = button.cget("style")
            colours = {root.winfo_rgb(COLORS[c]) for c in ("accent", "accent_dark", "danger", "danger_dark")}
            for option in ("bordercolor", "lightcolor", "darkcolor"):
                assert root.winfo_rgb(style.lookup(name, option, ["disabled"])) not in colours, (name, option)
    yield with_fake_app(test)


@pytest_twisted.inlineCallbacks
def test_what_was_typed_goes_when_the_session_ends():
    def test(root, app, client):
        client.auto.update({"logout": {}, "delete_account": {}, "login": {"session": "t", "unread": 0},
                            "get_settings": {"read_receipts": True}})
        typed = lambda: app.compose.get("1.0", "end-1c")  # noqa: E731

        def type_drafts():
            """alice writes to carol (kept as a draft) and to bob (in the box), and searches."""
            app.open_conversation("carol")
            app.compose.insert("1.0", "draft for carol")
            app.open_conversation("bob")
            app.compose.insert("1.0", "half a thought for bob")
            app.search_entry.focus_force()
            root.update()
            app.search_entry.insert(0, "ca")

        def ends(end):
            yield open_long_conversation(app, client)
            type_drafts()
            end()
            yield wait_for(lambda: root.update() or app.login.winfo_ismapped(), 5)
            assert typed() == "" and app.model.drafts == {} and app.search_entry.get() == ""
            # The next user, in the same window, starts with an empty box.
            app.controller.log_in("dave", "dave-password")
            yield wait_for(lambda: root.update() or app.main.winfo_ismapped(), 5)
            app.open_conversation("carol")
            root.update()
            assert typed() == "" and app.compose.cget("state") == "normal"
            app.compose.event_generate("<<Undo>>")
            assert typed() == ""

        # Logging out, deleting the account, and a session ended elsewhere.
        yield from ends(app.controller.log_out)
        yield from ends(lambda: app.controller.delete_account("secret-password"))
        yield from ends(lambda: app.controller.on_event({"event": "session_ended", "reason": "logged_out"}))
    yield with_fake_app(test)


@pytest_twisted.inlineCallbacks
def test_sending_scrolls_to_the_new_message_and_receiving_does_not():
    def test(root, app, client):
        yield open_long_conversation(app, client)
        canvas = app.canvas
        for _ in range(5):
            canvas.event_generate("<Button-4>")
        top = canvas.canvasy(0)
        assert canvas.yview()[1] < 0.999
        # What bob sends leaves the reader where they are.
        app.model.add_messages([msg(51, "bob", "alice", "from bob", read=True)], live=True)
        yield wait_for(lambda: canvas.find_withtag("msg51") and not app.coalescer.pending, 5)
        assert canvas.canvasy(0) == top and canvas.yview()[1] < 0.999
        # What the reader sends is shown: the view goes down to it.
        app.compose.insert("1.0", "my answer")
        app.send_button.invoke()
        yield wait_for(lambda: canvas.find_withtag("pending") and not app.coalescer.pending, 5)
        assert canvas.yview()[1] >= 0.999 and app._at_bottom
        client.last("send_message")[3].callback({"message_id": 52, "ts": 2000.0})
        yield wait_for(lambda: canvas.find_withtag("msg52") and not app.coalescer.pending, 5)
        assert canvas.yview()[1] >= 0.999
    yield with_fake_app(test)


@pytest_twisted.inlineCallbacks
def test_messages_that_come_while_scrolled_up_are_read_once_scrolled_down():
    def test(root, app, client):
        yield open_long_conversation(app, client)
        canvas, cue = app.canvas, app.unseen_cue
        canvas.focus_force()
        yield wait_for(lambda: root.update() or app._window_seen(), 5)

        def marks():
            return [c[1][0] for c in client.calls if c[0] == "mark_read"]

        # At the bottom, in a window on screen with the focus: read at once.
        app.controller.on_event({"event": "message", "message": msg(51, "bob", "alice", "seen at once")})
        yield wait_for(lambda: [51] in marks(), 5)
        # Scrolled up: it waits, and a cue over the bottom says so.
        for _ in range(5):
            canvas.event_generate("<Button-4>")
        app.controller.on_event({"event": "message", "message": msg(52, "bob", "alice", "not seen yet")})
        app.controller.on_event({"event": "message", "message": msg(53, "bob", "alice", "nor this")})
        yield wait_for(lambda: root.update() or cue.winfo_ismapped(), 5)
        assert cue.cget("text") == "↓ 2 new messages" and canvas.yview()[1] < 0.999
        assert app.model.title == "(2) paxchat — alice"
        assert not [m for m in marks() if 52 in m]
        # A click on the cue goes down to them: read, and the cue goes.
        cue.event_generate("<Button-1>", x=5, y=5)
        yield wait_for(lambda: [52, 53] in marks(), 5)
        yield wait_for(lambda: root.update() or not cue.winfo_ismapped(), 5)
        assert canvas.yview()[1] >= 0.999 and app.model.title == "paxchat — alice"
        # Hidden at the bottom: nothing is read until the window is back. (Withdrawn,
        # not minimised: with no window manager on Xvfb, iconify does nothing.)
        root.withdraw()
        yield wait_for(lambda: root.update() or not app.model.newest_in_view, 5)
        app.controller.on_event({"event": "message", "message": msg(54, "bob", "alice", "while away")})
        yield wait_for(lambda: root.update() or app.model.unseen_below == 1 and not app.coalescer.pending, 5)
        assert not [m for m in marks() if 54 in m]
        root.deiconify()
        canvas.focus_force()
        yield wait_for(lambda: [54] in marks(), 5)
    yield with_fake_app(test)


@pytest_twisted.inlineCallbacks
def test_a_failed_send_keeps_its_banner_until_dismissed():
    from twisted.internet import reactor
    from paxchat.client import gui
    from paxchat.client.errors import ServerError

    def test(root, app, client):
        yield open_long_conversation(app, client)
        banner = app.error_row

        def expiries():
            return [c for c in reactor.getDelayedCalls() if c.func == app._expire_error and c.active()]

        # Other errors go by themselves.
        app.model.show_error("Cannot search for that.")
        yield wait_for(lambda: root.update() or banner.winfo_ismapped(), 5)
        yield wait_for(lambda: root.update() or not banner.winfo_ismapped(), 5)
        # A send's failure stays: no expiry is even set.
        app.compose.insert("1.0", "are you there?")
        app.send_button.invoke()
        client.last("send_message")[3].errback(ServerError("no_majority", "too few nodes"))
        yield wait_for(lambda: root.update() or banner.winfo_ismapped(), 5)
        assert app.error_banner.cget("text").startswith("Not sent") and not expiries()
        assert app.compose.get("1.0", "end-1c") == "are you there?"
        # Sending again takes it away.
        app.send_button.invoke()
        yield wait_for(lambda: root.update() or not banner.winfo_ismapped(), 5)
        client.last("send_message")[3].errback(ServerError("no_majority", "too few nodes"))
        yield wait_for(lambda: root.update() or banner.winfo_ismapped(), 5)
        # And so does its ✕.
        app.error_close.event_generate("<Button-1>", x=5, y=5)
        yield wait_for(lambda: root.update() or not banner.winfo_ismapped(), 5)
        assert app.model.error == ""

    seconds, gui.ERROR_SECONDS = gui.ERROR_SECONDS, 0.05
    try:
        yield with_fake_app(test)
    finally:
        gui.ERROR_SECONDS = seconds


@pytest_twisted.inlineCallbacks
def test_a_refused_name_keeps_the_password_and_a_fitting_message_clears_too_long():
    from paxchat.client.errors import ServerError

    def test(root, app, client):
        user, password = app.user_entry, app.password_entry
        user.insert(0, "al ice")
        password.insert(0, "alice-password")
        client.auto["create_account"] = ServerError("invalid_username", "no")
        app.create_button.invoke()
        app.repeat_entry.insert(0, "alice-password")
        app.create_button.invoke()
        yield wait_for(lambda: root.update() or app.login_error.cget("text"), 5)
        assert app.login_error.cget("text").startswith("That username is not allowed")
        yield wait_for(lambda: root.update() or root.focus_get() is user, 5)
        assert password.get() == "alice-password" and user.selection_present()
        # A wrong pair empties the password, to type again there.
        user.delete(0, "end")
        user.insert(0, "alice")
        client.auto["login"] = ServerError("bad_credentials", "no")
        app.login_button.invoke()
        yield wait_for(lambda: root.update() or root.focus_get() is password, 5)
        assert password.get() == "" and user.get() == "alice"
        # Logged in, the password field is emptied.
        password.insert(0, "alice-password")
        client.auto.update({"login": {"session": "t", "unread": 0}, "history": {"messages": [], "more": False},
                            "get_settings": {"read_receipts": True}})
        app.login_button.invoke()
        yield wait_for(lambda: root.update() or app.main.winfo_ismapped(), 5)
        assert password.get() == ""

        # Too long: the banner goes once the text is cut down to fit.
        from paxchat.client.gui_controller import MAX_BODY
        app.open_conversation("bob")
        app.compose.insert("1.0", "x" * (MAX_BODY + 5))
        app.send_button.invoke()
        yield wait_for(lambda: root.update() or app.error_row.winfo_ismapped(), 5)
        app.compose.delete("1.0", "1.3")
        root.update()
        assert app.error_row.winfo_ismapped()       # still 2 too many
        app.compose.delete("1.0", "1.2")
        yield wait_for(lambda: root.update() or not app.error_row.winfo_ismapped(), 5)
        assert len(app.compose.get("1.0", "end-1c")) == MAX_BODY
    yield with_fake_app(test)


@pytest_twisted.inlineCallbacks
def test_ctrl_c_and_the_bubble_menu_copy_the_selected_messages():
    def test(root, app, client):
        yield open_long_conversation(app, client)
        canvas = app.canvas
        root.clipboard_clear()
        app.model.toggle_selected(50)
        app.model.toggle_selected(48)
        # Typing, Ctrl+C copies the compose box's own selection.
        app.compose.insert("1.0", "typed text")
        app.compose.tag_add("sel", "1.0", "1.5")
        app.compose.focus_force()
        root.update()
        app.compose.event_generate("<Control-c>")
        assert root.clipboard_get() == "typed"
        # Elsewhere (the conversation clicked), the selected messages, oldest first.
        canvas.event_generate("<Button-1>", x=5, y=5)
        root.update()
        assert root.focus_get() is canvas
        canvas.event_generate("<Control-c>")
        assert root.clipboard_get() == "message 48\nmessage 50"
        # Right-click on a message: Copy.
        root.clipboard_clear()
        yield wait_for(lambda: root.update() or not app.coalescer.pending, 5)
        x0, y0, x1, y1 = canvas.bbox("msg49")
        top = canvas.canvasy(0)
        canvas.event_generate("<Motion>", x=(x0 + x1) // 2, y=int((y0 + y1) / 2 - top))
        canvas.event_generate("<Button-3>", x=(x0 + x1) // 2, y=int((y0 + y1) / 2 - top))
        root.update()
        assert app._menu_message == 49
        app.bubble_menu.unpost()
        app.bubble_menu.invoke(0)
        assert root.clipboard_get() == "message 49"
        assert "Ctrl+C: copy" in app.compose_hint.cget("text")
    yield with_fake_app(test)


@pytest_twisted.inlineCallbacks
def test_ctrl_a_selects_all_the_text_of_a_box():
    import tkinter as tk

    def test(root, app, client):
        def selects_all(box, text):
            box.focus_force()
            yield wait_for(lambda: root.update() or root.focus_get() is box, 5)
            box.insert("end", text)
            box.event_generate("<Control-a>")
            if isinstance(box, tk.Text):
                assert box.get("sel.first", "sel.last") == text + "\n"
            else:
                assert box.selection_present() and (box.index("sel.first"), box.index("sel.last")) == (0, len(text))
            # What is typed next replaces it all.
            box.event_generate("<Key-z>")
            assert (box.get("1.0", "end-1c") if isinstance(box, tk.Text) else box.get()) == "z"
        yield from selects_all(app.user_entry, "alice")
        yield from selects_all(app.password_entry, "secret-password")
        app.model.signed_in("alice")
        yield wait_for(lambda: root.update() or app.main.winfo_ismapped(), 5)
        yield from selects_all(app.search_entry, "bob")
        app.open_conversation("bob")
        yield from selects_all(app.compose, "two\nlines")
    yield with_fake_app(test)


@pytest_twisted.inlineCallbacks
def test_a_reused_names_new_account_is_marked_in_the_conversation():
    import time

    def test(root, app, client):
        now = time.time()
        old = [msg(i, "bob", "alice", f"old bob {i}", ts=now - 3600 + i, read=True) for i in (1, 2)]
        new = msg(3, "bob", "alice", "new bob here", ts=now - 60, read=True)
        client.auto["history"] = {"messages": [new, *old[::-1]], "more": False,
                                  "peer_created": now - 120}
        app.model.signed_in("alice")
        app.open_conversation("bob")
        yield wait_for(settled(app, lambda: app.canvas.find_withtag("msg3")), 5)
        [note] = [i for i in app.canvas.find_all() if app.canvas.type(i) == "text"
                  and app.canvas.itemcget(i, "text").startswith("bob is a new account since")]
        top = app.canvas.bbox(note)[1]
        assert app.canvas.bbox("msg2")[3] <= top and app.canvas.bbox(note)[3] <= app.canvas.bbox("msg3")[1]

    yield with_fake_app(test)


@pytest_twisted.inlineCallbacks
def test_a_message_with_tabs_keeps_its_time_clear_of_its_text():
    def test(root, app, client):
        bodies = {1: "name\tpassword\tnode", 2: "first line\nkey\tvalue", 3: "x\ty"}
        client.auto["history"] = {"messages": [msg(i, "alice" if i != 2 else "bob", "bob" if i != 2 else "alice",
                                                   body, read=True) for i, body in sorted(bodies.items())][::-1],
                                  "more": False}
        app.model.signed_in("alice")
        app.open_conversation("bob")
        canvas = app.canvas
        yield wait_for(settled(app, lambda: canvas.find_withtag("msg3")), 5)
        for i, body in bodies.items():
            texts = [t for t in canvas.find_withtag(f"msg{i}") if canvas.type(t) == "text"]
            [text] = [t for t in texts if canvas.itemcget(t, "text") == body]
            [time] = [t for t in texts if t != text]
            tx0, ty0, tx1, ty1 = canvas.bbox(text)
            mx0, my0, mx1, my1 = canvas.bbox(time)
            # Beside the last line, or under the text: never over it.
            assert mx0 >= tx1 or my0 >= ty1 - 2, (body, canvas.bbox(text), canvas.bbox(time))
    yield with_fake_app(test)


@pytest_twisted.inlineCallbacks
def test_creating_an_account_asks_for_the_password_twice():
    def test(root, app, client):
        user, password, repeat = app.user_entry, app.password_entry, app.repeat_entry
        root.update()
        assert not repeat.winfo_ismapped()
        # Enter in the password field logs in while logging in...
        user.insert(0, "alice")
        password.focus_force()
        password.insert(0, "good-password")
        yield wait_for(lambda: root.update() or root.focus_get() is password, 5)   # keys go to the focus
        password.event_generate("<Return>")
        assert client.last("login")[1] == ("alice", "good-password")
        # ...Create account shows a second field, under the first, and asks nothing yet.
        app.create_button.invoke()
        yield wait_for(lambda: root.update() or repeat.winfo_ismapped(), 5)
        assert repeat.winfo_rooty() > password.winfo_rooty()
        assert root.focus_get() is repeat and not [c for c in client.calls if c[0] == "create_account"]
        # Tab goes from the password to it, then to the buttons.
        assert password.tk_focusNext() is repeat and repeat.tk_focusNext() is app.login_button
        # Two passwords that differ are refused here, both emptied to type again.
        repeat.insert(0, "good-passwrod")
        repeat.event_generate("<Return>")
        yield wait_for(lambda: root.update() or app.login_error.cget("text"), 5)
        assert app.login_error.cget("text") == "The two passwords differ. Type the password again in both fields."
        assert not [c for c in client.calls if c[0] == "create_account"]
        yield wait_for(lambda: root.update() or root.focus_get() is password, 5)
        assert password.get() == "" and repeat.get() == "" and user.get() == "alice"
        # Refused again alike: emptied again.
        password.insert(0, "good-password")
        password.event_generate("<Return>")         # creating: Enter goes on to the repeat field
        yield wait_for(lambda: root.update() or root.focus_get() is repeat, 5)
        repeat.insert(0, "other-password")
        repeat.event_generate("<Return>")
        yield wait_for(lambda: root.update() or (password.get() == "" and root.focus_get() is password), 5)
        # Alike: Enter in the repeat field creates the account and logs in.
        client.auto.update({"create_account": {}, "login": {"session": "t", "unread": 0},
                            "history": {"messages": [], "more": False}, "get_settings": {"read_receipts": True}})
        password.insert(0, "good-password")
        password.event_generate("<Return>")
        yield wait_for(lambda: root.update() or root.focus_get() is repeat, 5)
        repeat.insert(0, "good-password")
        repeat.event_generate("<Return>")
        yield wait_for(lambda: root.update() or app.main.winfo_ismapped(), 5)
        assert client.last("create_account")[1] == ("alice", "good-password")
        assert password.get() == "" and repeat.get() == ""
        # Logged out, the login screen logs in again; Esc also leaves creating.
        app.model.signed_out("You are logged out.")
        yield wait_for(lambda: root.update() or app.login.winfo_ismapped(), 5)
        assert not repeat.winfo_ismapped()
        app.create_button.invoke()
        yield wait_for(lambda: root.update() or repeat.winfo_ismapped(), 5)
        repeat.insert(0, "half-typed")
        repeat.event_generate("<Escape>")
        yield wait_for(lambda: root.update() or not repeat.winfo_ismapped(), 5)
        assert repeat.get() == "" and root.focus_get() is password
    yield with_fake_app(test)


def logs_in(root, app, client):
    """Log in as alice from the login screen (Enter in the password field); wait for the chats."""
    client.auto.update({"login": {"session": "t", "unread": 0}, "history": {"messages": [], "more": False},
                        "get_settings": {"read_receipts": True}})
    app.user_entry.delete(0, "end")
    app.user_entry.insert(0, "alice")
    app.password_entry.insert(0, "good-password")
    app.password_entry.focus_force()
    yield wait_for(lambda: root.update() or root.focus_get() is app.password_entry, 5)
    app.password_entry.event_generate("<Return>")
    yield wait_for(lambda: root.update() or app.main.winfo_ismapped(), 5)


@pytest_twisted.inlineCallbacks
def test_once_logged_in_the_keys_go_to_find_people_then_to_the_open_conversation():
    def test(root, app, client):
        yield from logs_in(root, app, client)
        # No conversation is open yet: typing finds people.
        entry, hint = app.search_entry, app.search_hint
        yield wait_for(lambda: root.update() or root.focus_get() is entry, 5)
        # The box is empty, and says what it is for, with the cursor in it.
        assert entry.get() == "" and hint.winfo_viewable() and hint.cget("text").startswith("Find people")
        assert hint.winfo_rootx() >= entry.winfo_rootx() and hint.winfo_rooty() >= entry.winfo_rooty()
        assert hint.winfo_rootx() + hint.winfo_width() <= entry.winfo_rootx() + entry.winfo_width()
        # The first key takes the hint away; it is not part of the text.
        entry.event_generate("<Key-b>")
        root.update()
        assert entry.get() == "b" and not hint.winfo_ismapped()
        # Emptied, it is back, the cursor still in the box.
        entry.event_generate("<BackSpace>")
        root.update()
        assert entry.get() == "" and hint.winfo_ismapped() and root.focus_get() is entry
        # Enter with only the hint shown searches for everyone, not for the hint.
        client.auto["list_accounts"] = {"accounts": ["bob"], "more": False}
        entry.event_generate("<Return>")
        assert client.last("list_accounts")[1][0] == "*"
        # A click on the hint is a click in the box.
        app.list_canvas.focus_force()
        yield wait_for(lambda: root.update() or root.focus_get() is app.list_canvas, 5)
        hint.event_generate("<Button-1>", x=2, y=2)
        root.update()
        assert root.focus_get() is entry and hint.winfo_ismapped()
        # Enter again, with the results of that text shown, opens the first: no mouse needed.
        yield wait_for(lambda: any(t.startswith("Enter: open the first") for t in canvas_texts(app.list_canvas)), 5)
        entry.event_generate("<Return>")
        assert app.model.open_peer == "bob" and len([c for c in client.calls if c[0] == "list_accounts"]) == 1
        yield wait_for(lambda: root.update() or root.focus_get() is app.compose, 5)
        # A middle click on the hint pastes the X selection into the box, as on the box itself.
        assert entry.get() == "" and hint.winfo_ismapped()
        app.user_entry.delete(0, "end")
        app.user_entry.insert(0, "carol")
        app.user_entry.selection_range(0, "end")
        hint.event_generate("<ButtonRelease-2>", x=2, y=2)
        assert entry.get() == "carol" and not hint.winfo_ismapped() and root.focus_get() is entry
    yield with_fake_app(test)


def pressed(root, widget, name):
    """``name`` pressed with the keyboard focus in ``widget``: a generated key goes
    where the focus is, so first wait until the X server has put it there."""
    yield wait_for(lambda: root.update() or root.focus_get() is widget, 5)
    widget.event_generate(name)
    root.update()


@pytest_twisted.inlineCallbacks
def test_the_keys_walk_the_sidebar_list_from_find_people():
    from paxchat.client.gui_theme import COLORS

    def test(root, app, client):
        client.auto["history"] = {"messages": [], "more": False}
        app.model.signed_in("alice")
        # More conversations than the list shows: peer00 is the newest, at the top.
        app.model.add_messages([msg(i, f"peer{i:02}", "alice", ts=100.0 - i, read=True) for i in range(14)])
        entry, canvas, m = app.search_entry, app.list_canvas, app.model
        yield wait_for(lambda: root.update() or len(app._list_rows) == 14 and app.list_scroll.winfo_ismapped(), 5)
        entry.focus_force()

        def marked():
            """The rows drawn as the keys' (their outline), by name, and whether each is in view."""
            out = []
            for item in canvas.find_withtag("list_cursor"):
                top, bottom = canvas.coords(item)[1], canvas.coords(item)[3]
                [peer] = [p for t, b, p in app._list_rows if t <= top and bottom <= b]
                view = canvas.canvasy(0)
                out.append((peer, view <= top and bottom <= view + canvas.winfo_height()))
            return out

        def settled():
            return root.update() or not app.coalescer.pending

        # Tab from Find people does not stop in the list: it goes where it went.
        assert entry.tk_focusNext() is not canvas
        # Down moves into the list, onto its first row, marked.
        yield from pressed(root, entry, "<Down>")
        yield wait_for(lambda: settled() and root.focus_get() is canvas, 5)
        assert m.list_cursor == "peer00" and marked() == [("peer00", True)]
        # Down to the last row: the list scrolls to keep it in view.
        for _ in range(13):
            yield from pressed(root, canvas, "<Down>")
        yield wait_for(settled, 5)
        assert m.list_cursor == "peer13" and marked() == [("peer13", True)] and canvas.yview()[1] == 1.0
        yield from pressed(root, canvas, "<Down>")             # the last row: stays
        yield from pressed(root, canvas, "<Home>")
        yield wait_for(settled, 5)
        assert marked() == [("peer00", True)] and canvas.yview()[0] == 0.0
        yield from pressed(root, canvas, "<End>")
        yield from pressed(root, canvas, "<Prior>")           # a page up: still in the list
        yield wait_for(settled, 5)
        [(peer, seen)] = marked()
        assert seen and 0 < int(peer[4:]) < 13
        # Enter opens it, and the keys go to its compose box: no row is marked theirs.
        yield from pressed(root, canvas, "<Return>")
        assert m.open_peer == peer
        yield wait_for(lambda: settled() and root.focus_get() is app.compose, 5)
        assert m.list_cursor is None and marked() == []
        # The open row is filled, the keys' row outlined: told apart, on one row as on two.
        entry.focus_force()
        yield from pressed(root, entry, "<Down>")
        yield from pressed(root, canvas, "<End>")
        yield wait_for(settled, 5)
        filled = [i for i in canvas.find_all() if canvas.type(i) == "rectangle"
                  and canvas.itemcget(i, "fill") == COLORS["accent_soft"]]
        [cursor] = canvas.find_withtag("list_cursor")
        assert len(filled) == 1 and canvas.itemcget(filled[0], "outline") == ""
        assert canvas.itemcget(cursor, "fill") == "" and canvas.itemcget(cursor, "outline") == COLORS["accent"]
        assert canvas.coords(cursor)[1] > canvas.coords(filled[0])[3]
        # Up from the first row goes back to Find people, its text kept.
        yield from pressed(root, canvas, "<Home>")
        yield from pressed(root, canvas, "<Up>")
        yield wait_for(lambda: settled() and root.focus_get() is entry, 5)
        assert m.list_cursor is None and marked() == []
        # A search's results: Enter in the box still opens the first of them...
        client.auto["list_accounts"] = {"accounts": ["carl", "cora", "cyd"], "more": False}
        entry.insert(0, "c")
        yield from pressed(root, entry, "<Return>")
        assert m.search_results == ["carl", "cora", "cyd"]
        yield from pressed(root, entry, "<Return>")
        assert m.open_peer == "carl"
        yield wait_for(lambda: settled() and root.focus_get() is app.compose, 5)
        # ...and Down, Down, Enter opens the second.
        entry.focus_force()
        entry.insert(0, "c")
        yield from pressed(root, entry, "<Return>")
        yield from pressed(root, entry, "<Down>")
        yield from pressed(root, canvas, "<Down>")
        yield wait_for(settled, 5)
        assert marked() == [("cora", True)]
        assert "Enter: open   ·   Esc: close" in canvas_texts(canvas)          # no longer "the first"
        yield from pressed(root, canvas, "<Return>")
        assert m.open_peer == "cora" and m.search_pattern is None and entry.get() == ""
        yield wait_for(lambda: settled() and root.focus_get() is app.compose, 5)
        # Esc in the list closes the search, as Esc in the box does, and the keys are in Find people.
        entry.focus_force()
        entry.insert(0, "c")
        yield from pressed(root, entry, "<Return>")
        yield from pressed(root, entry, "<Down>")
        yield from pressed(root, canvas, "<Escape>")
        yield wait_for(lambda: settled() and root.focus_get() is entry, 5)
        assert m.search_pattern is None and entry.get() == "" and m.list_cursor is None and m.open_peer == "cora"
        assert not any("PEOPLE MATCHING" in t for t in canvas_texts(canvas))
        # Esc in the box too: it stays there.
        entry.insert(0, "c")
        yield from pressed(root, entry, "<Return>")
        yield from pressed(root, entry, "<Escape>")
        assert m.search_pattern is None and entry.get() == ""
        yield wait_for(lambda: settled() and root.focus_get() is entry, 5)
        # A letter typed in the list goes on into Find people.
        yield from pressed(root, entry, "<Down>")
        yield from pressed(root, canvas, "<Key-d>")
        assert entry.get() == "d" and m.list_cursor is None
        yield wait_for(lambda: root.update() or root.focus_get() is entry, 5)
        # Alt+Up/Down are still the window's, from the box and from the list: the conversation
        # above or below (cora, never written to, is the last row).
        entry.delete(0, "end")
        order = m.list_peers()
        assert order[-1] == "cora"
        yield from pressed(root, entry, "<Alt-Up>")
        assert m.open_peer == order[-2]
        yield wait_for(lambda: root.update() or root.focus_get() is app.compose, 5)
        entry.focus_force()
        yield from pressed(root, entry, "<Down>")
        yield from pressed(root, canvas, "<Alt-Down>")
        assert m.open_peer == "cora" and m.list_cursor is None
        # Leaving the list another way (a click elsewhere) takes the mark away too.
        entry.focus_force()
        yield from pressed(root, entry, "<Down>")
        assert m.list_cursor == order[0]
        app.compose.focus_force()
        yield wait_for(lambda: settled() and m.list_cursor is None and marked() == [], 5)
    yield with_fake_app(test)


@pytest_twisted.inlineCallbacks
def test_a_login_error_replaces_the_notice_of_why_the_login_screen_is_back():
    def test(root, app, client):
        app.model.signed_in("alice")
        app.model.signed_out("You are logged out.")
        yield wait_for(lambda: root.update() or app.login_notice.cget("text") == "You are logged out.", 5)
        assert app.login_notice.winfo_ismapped()
        app.user_entry.insert(0, "alice")
        app.login_button.invoke()           # no password: refused here, the server not asked
        yield wait_for(lambda: root.update() or app.login_error.cget("text"), 5)
        assert app.login_error.cget("text") == "Enter your username and password."
        assert app.login_notice.cget("text") == "" and not app.login_notice.winfo_ismapped()
    yield with_fake_app(test)


@pytest_twisted.inlineCallbacks
def test_the_login_card_stays_put_when_the_repeat_field_shows():
    def test(root, app, client):
        card, login = app.login_card, app.login

        def centred():
            """Logging in, the card is where it always was (once the window is laid out)."""
            middle = card.winfo_rooty() + card.winfo_height() / 2
            return login.winfo_height() > 100 and abs(middle - login.winfo_rooty() - 0.45 * login.winfo_height()) <= 1
        yield wait_for(lambda: root.update() or centred(), 5)
        top = card.winfo_rooty()
        app.create_button.invoke()
        yield wait_for(lambda: root.update() or app.repeat_entry.winfo_ismapped(), 5)
        assert card.winfo_rooty() == top
        app.repeat_entry.event_generate("<Escape>")
        yield wait_for(lambda: root.update() or not app.repeat_entry.winfo_ismapped(), 5)
        assert card.winfo_rooty() == top
    yield with_fake_app(test)


@pytest_twisted.inlineCallbacks
def test_at_the_smallest_window_creating_an_account_fits_and_a_long_error_scrolls():
    from paxchat.client.gui import MIN_HEIGHT, MIN_WIDTH

    def test(root, app, client):
        card, canvas = app.login_card, app.login_canvas
        assert root.minsize() == (MIN_WIDTH, MIN_HEIGHT)
        root.geometry(f"{MIN_WIDTH}x{MIN_HEIGHT}")
        yield wait_for(lambda: root.update() or (root.winfo_width(), root.winfo_height()) == (MIN_WIDTH, MIN_HEIGHT), 5)

        def inside():
            """The whole card is in view, above the status bar, and nothing scrolls."""
            root.update()
            return (canvas.winfo_rooty() <= card.winfo_rooty()
                    and card.winfo_rooty() + card.winfo_height() <= app.status_bar.winfo_rooty() - 1
                    and card.winfo_height() == card.winfo_reqheight()
                    and not app.login_scroll.winfo_ismapped())
        yield wait_for(inside, 5)
        top = card.winfo_rooty()
        # Creating an account: the repeat field, then a two-line error under it.
        app.create_button.invoke()
        yield wait_for(lambda: root.update() or app.repeat_entry.winfo_ismapped(), 5)
        assert inside() and card.winfo_rooty() == top
        app.user_entry.insert(0, "alice")
        app.password_entry.insert(0, "good-password")
        app.repeat_entry.insert(0, "other-password")
        app.create_button.invoke()
        yield wait_for(lambda: root.update() or app.login_error.cget("text"), 5)
        lines = app.login_error.winfo_reqheight() // app.fonts.small.metrics("linespace")
        assert lines == 2, app.login_error.cget("text")
        assert inside() and card.winfo_rooty() == top
        # A much longer error makes the card taller than the window: it scrolls,
        # and the buttons come into view when the cursor goes to them.
        app.model.show_error("Cannot reach any paxchat server. " * 8)
        yield wait_for(lambda: root.update() or app.login_scroll.winfo_ismapped(), 5)
        button = app.create_button
        assert button.winfo_rooty() + button.winfo_height() > canvas.winfo_rooty() + canvas.winfo_height()
        button.focus_force()
        yield wait_for(lambda: root.update() or (
            canvas.winfo_rooty() <= button.winfo_rooty()
            and button.winfo_rooty() + button.winfo_height() <= canvas.winfo_rooty() + canvas.winfo_height()), 5)
        # Once it fits again, nothing scrolls and the card is back where it was.
        app.model.clear_error()
        yield wait_for(lambda: root.update() or not app.login_scroll.winfo_ismapped(), 5)
        assert inside() and card.winfo_rooty() == top
    yield with_fake_app(test)


@pytest_twisted.inlineCallbacks
def test_find_people_says_what_is_wrong_under_the_box_and_drops_results_once_the_text_changes():
    def test(root, app, client):
        app.model.signed_in("alice")
        entry = app.search_entry
        entry.focus_force()
        yield wait_for(lambda: root.update() or root.focus_get() is entry, 5)
        # A pattern that cannot be searched: said under the box, not over the conversation.
        entry.insert(0, "bo b")
        entry.event_generate("<Return>")
        yield wait_for(lambda: root.update() or app.search_error.winfo_ismapped(), 5)
        assert app.search_error.cget("text").startswith("Cannot search for “bo b”")
        assert app.search_error.winfo_rooty() > entry.winfo_rooty()
        assert app.search_error.winfo_rootx() < app.canvas.winfo_rootx()     # in the sidebar
        assert not app.error_row.winfo_ismapped()
        assert not [c for c in client.calls if c[0] == "list_accounts"]
        # Mended: the error goes at once.
        entry.delete(2, 3)
        yield wait_for(lambda: root.update() or not app.search_error.winfo_ismapped(), 5)
        # Results, with a long name clipped with "…" inside the sidebar.
        long_name = "bartholomew.the.very.long.named." + "x" * 30
        client.auto["list_accounts"] = {"accounts": ["bob", long_name], "more": False}
        entry.delete(0, "end")
        entry.insert(0, "?ob")
        entry.event_generate("<Return>")
        yield wait_for(lambda: any(t.startswith("PEOPLE MATCHING ?ob") for t in canvas_texts(app.list_canvas)), 5)
        [clipped] = [i for i in app.list_canvas.find_all() if app.list_canvas.type(i) == "text"
                     and app.list_canvas.itemcget(i, "text").startswith("bartholomew")]
        assert app.list_canvas.itemcget(clipped, "text").endswith("…")
        assert app.list_canvas.bbox(clipped)[2] <= app.list_canvas.winfo_width()
        # Editing the text before Enter: no heading claims results for text not searched.
        entry.insert("end", "b")
        yield wait_for(lambda: not any("PEOPLE MATCHING" in t for t in canvas_texts(app.list_canvas)), 5)
        assert app.model.search_pattern is None and entry.get() == "?obb"
        # Leaving the box is no edit: results stay.
        entry.delete(0, "end")
        entry.event_generate("<Return>")
        yield wait_for(lambda: any("PEOPLE MATCHING *" in t for t in canvas_texts(app.list_canvas)), 5)
        app.list_canvas.focus_force()
        yield wait_for(lambda: root.update() or root.focus_get() is app.list_canvas, 5)
        yield wait_for(lambda: root.update() or not app.coalescer.pending, 5)
        assert app.model.search_pattern == "*"
        assert any("PEOPLE MATCHING *" in t for t in canvas_texts(app.list_canvas))
    yield with_fake_app(test)


@pytest_twisted.inlineCallbacks
def test_the_status_dot_is_amber_while_connected_without_a_leader():
    from paxchat.client.api import Status
    from paxchat.client.gui_theme import COLORS

    def test(root, app, client):
        def dot():
            return [app.status_dot.itemcget(i, "fill") for i in app.status_dot.find_all()]

        def shows(status, text):
            app.model.set_status(status)
            return wait_for(lambda: app.status_label.cget("text") == text, 5)
        yield shows(Status("connected", 5, 1), "Connected to node 5 · leader 1")
        assert dot() == [COLORS["ok"]]
        # A majority down: the node answers but nothing can be written, so not green.
        yield shows(Status("connected", 5, None), "Connected to node 5 · no leader yet")
        assert dot() == [COLORS["warn"]]
        yield shows(Status("reconnecting"), "Reconnecting…")
        assert dot() == [COLORS["warn"]]
        yield shows(Status("connected", 5, 2), "Connected to node 5 · leader 2")
        assert dot() == [COLORS["ok"]]
    yield with_fake_app(test)
