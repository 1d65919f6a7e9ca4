"""What the desktop app does when a person clicks: client calls in, model updates out.

Sits between the widgets and ``PaxchatClient`` and owns no widget, so the
whole app's behaviour (log in, open a conversation and mark it read, load
older messages on scroll, send, search, delete, log out) is tested without
a display. Every failure ends up as a sentence in the model, never raised.
"""

from __future__ import annotations

import itertools
from typing import Callable

from twisted.internet import defer, task
from twisted.logger import Logger

from paxchat.limits import MAX_BODY_CHARS as MAX_BODY

from .checks import check_pattern
from .errors import RequestTooLarge, ServerError
from .gui_model import PAGE_SIZE, ChatModel, search_pattern

__all__ = ["ChatController", "MAX_BODY"]

# Login and account creation errors about the name: the username field gets
# the cursor and the password is kept. Any other is taken to be about the password.
USERNAME_ERRORS = ("invalid_username", "username_taken", "no_such_user")
RECENT = 200            # messages per history page fetched at login to build the conversation list
RECENT_PAGES = 20       # at most this many such pages, even if unread messages remain older
RETRY_OFFLINE = 5.0     # seconds between reconnection campaigns when every node is down
# How often the status bar's leader is refreshed from a node of an earlier
# build, which tells a client only when asked: at 15 s the bar named a dead
# leader for that long. A node that pushes leader changes (the client's
# ``leader_pushed``) is not asked at all: its events say at once what a
# hello would, and an event is never lost on a connection that stays open
# (a client too slow for its events is dropped, and the next connection's
# hello says who leads). So a safety re-ask could only repeat them, at a
# cost of 5,000 apps / 30 s = ~170 hellos a second on the cluster.
LEADER_REFRESH = 3.0
FAILOVER_REFRESH = 1.0  # after a failover the leader is often being elected: ask again this often...
FAILOVER_REFRESHES = 5  # ...this many times
# What only a commit brings: pushed to this connection once a write commits,
# so proof that the cluster has a leader again (see ChatController._committed).
COMMIT_EVENTS = ("message", "sent", "read", "seen", "deleted", "settings")


class ChatController:
    """Drives one PaxchatClient for the app; ``make_client(on_event, on_status)`` builds it."""

    log = Logger()

    def __init__(self, reactor, model: ChatModel, make_client: Callable):
        self.reactor = reactor
        self.model = model
        self.client = None
        self._keys = itertools.count(1)
        self._to_mark: list[int] = []
        self._mark_call = None
        self._retry_call = None
        self._refresh = None
        self._soon_call = None
        self._failing_over = False
        self._no_leader = False    # the last status: connected, but the node named no leader
        self._asked_at = None      # when the leader was last asked for
        self._stopped = False
        self._search_seq = 0   # the latest search: answers to earlier ones are dropped
        try:
            self.client = make_client(self.on_event, self.on_status)
        except Exception as e:  # a broken config or missing certificates
            model.show_error(str(e))

    # -- connection --------------------------------------------------------------

    def start(self):
        """Connect in the background; keep the status bar's leader fresh."""
        if self.client is None:
            return
        self.client.connect().addErrback(self._quiet)
        self._refresh = task.LoopingCall(self._refresh_leader)
        self._refresh.clock = self.reactor
        self._refresh.start(LEADER_REFRESH, now=False)

    def _refresh_leader(self):
        if self.client is not None and self.client.connected and not self.client.leader_pushed:
            self._asked_at = self.reactor.seconds()
            self.client.hello().addErrback(self._quiet)

    def _committed(self):
        """A write just committed (a push that only a commit sends, or a send
        answered), so the cluster has a leader: if the status bar still says
        there is none, ask now rather than at the next refresh, so the dot
        turns green and "waiting…" turns "sending…" with the message that
        proved it. At most once a second, whatever a burst of pushes.

        Nothing of the kind tells of a leader that died: a node of an earlier
        build does not push leader changes, so that waits for the refresh.
        A node that does push them is asked nothing (``_refresh_leader``)."""
        if (self._no_leader and not self._stopped
                and (self._asked_at is None or self.reactor.seconds() - self._asked_at >= FAILOVER_REFRESH)):
            self._refresh_leader()

    def _quiet(self, failure):
        """Connection-level failures show in the status bar already."""
        return None

    def on_status(self, status):
        self.model.set_status(status)
        self._no_leader = status.state == "connected" and status.leader is None
        if status.state in ("reconnecting", "failed"):
            self._failing_over = True
        elif status.state == "connected" and self._failing_over:
            # The new node answered hello before it noticed the old leader died:
            # without this the status bar would name a dead leader for a while.
            self._failing_over = False
            self._refresh_soon(FAILOVER_REFRESHES)
            conv = self.model.conversation(self.model.open_peer) if self.model.open_peer else None
            if conv is not None and conv.loaded_once and self.model.me is not None:
                self._catch_up(self.model.open_peer, quiet=True)
        if status.state == "failed" and not self._stopped:
            if self._retry_call is None or not self._retry_call.active():
                self._retry_call = self.reactor.callLater(RETRY_OFFLINE, self._reconnect)

    def _refresh_soon(self, times):
        if self._soon_call is not None and self._soon_call.active():
            self._soon_call.cancel()
        self._soon_call = self.reactor.callLater(FAILOVER_REFRESH, self._refreshed_soon, times)

    def _refreshed_soon(self, times):
        self._soon_call = None
        self._refresh_leader()
        if times > 1 and not self._stopped:
            self._refresh_soon(times - 1)

    def _reconnect(self):
        if not self._stopped and self.client is not None:
            self.client.connect().addErrback(self._quiet)

    def stop(self) -> defer.Deferred:
        self._stopped = True
        for call in (self._retry_call, self._mark_call, self._soon_call):
            if call is not None and call.active():
                call.cancel()
        if self._refresh is not None and self._refresh.running:
            self._refresh.stop()
        return self.client.close() if self.client is not None else defer.succeed(None)

    # -- events --------------------------------------------------------------------

    def on_event(self, event: dict):
        kind = event.get("event")
        if kind in COMMIT_EVENTS:
            self._committed()
        if kind == "message" and isinstance(event.get("message"), dict):
            self._mark(self.model.add_messages([event["message"]], live=True))
        elif kind == "sent" and isinstance(event.get("message"), dict):
            self.model.add_messages([event["message"]])   # sent from another device: nothing to mark
        elif kind in ("read", "seen") and isinstance(event.get("ids"), list):
            ids = [i for i in event["ids"] if isinstance(i, int)]
            # Read on another device; read by the other party.
            {"read": self.model.read_elsewhere, "seen": self.model.seen}[kind](ids)
        elif kind == "deleted" and isinstance(event.get("ids"), list):
            # Deleted on another device, or by the other party.
            unread = event.get("unread")
            self.model.remove_messages([i for i in event["ids"] if isinstance(i, int)],
                                       unread if isinstance(unread, int) and not isinstance(unread, bool) else None)
        elif kind == "settings" and isinstance(event.get("settings"), dict) and self.model.me:
            # Changed on another device.
            self.model.set_read_receipts(bool(event["settings"].get("read_receipts", True)))
        elif kind == "session_ended" and self.model.me is not None:
            if event.get("reason") == "account_deleted":
                self.model.signed_out(f"The account {self.model.me} was deleted elsewhere, so you were logged out.")
            else:
                self.model.signed_out("Your session ended. Please log in again.")

    def _mark(self, ids):
        """Mark messages read in one request per reactor turn, however many arrive."""
        if not ids:
            return
        self._to_mark.extend(ids)
        if self._mark_call is None:
            self._mark_call = self.reactor.callLater(0, self._flush_marks)

    def _flush_marks(self):
        self._mark_call = None
        ids, self._to_mark = self._to_mark, []
        if ids and self.client is not None:
            self.client.mark_read(ids).addErrback(self._quiet)

    # -- account ---------------------------------------------------------------------

    def _guard(self, d: defer.Deferred) -> defer.Deferred:
        """Show failures as sentences; the returned Deferred never fails."""
        def failed(failure):
            self.model.show_error(failure)
            return None
        return d.addErrback(failed)

    def _busy(self, start: Callable[[], defer.Deferred]) -> defer.Deferred:
        """Run ``start()`` with the buttons disabled and the last error cleared first."""
        self.model.set_busy(True)
        self.model.clear_error()
        d = defer.maybeDeferred(start)

        def done(result):
            self.model.set_busy(False)
            return result
        return self._guard(d).addBoth(done)

    def _refused(self, failure):
        """A login or account creation refused: say which field is wrong (``ChatModel.error_about``)."""
        if isinstance(failure.value, ServerError):
            about = "username" if failure.value.code in USERNAME_ERRORS else "password"
        else:
            about = None   # the network: both fields are right as far as anyone knows
        self.model.show_error(failure, about=about)
        return None

    def log_in(self, username: str, password: str) -> defer.Deferred:
        username = username.strip()
        if not username or not password:
            self.model.show_error("Enter your username and password.", about="password" if username else "username")
            return defer.succeed(None)
        if self.client is None:
            return defer.succeed(None)

        @defer.inlineCallbacks
        def go():
            result = yield self.client.login(username, password)
            self.model.signed_in(username)
            self.load_settings()
            yield self.load_recent(result.get("unread", 0) if isinstance(result, dict) else 0)
            return result
        return self._busy(lambda: go().addErrback(self._refused))

    def create_account(self, username: str, password: str, repeat: str) -> defer.Deferred:
        """Create the account and log in; the password must be typed twice
        (``repeat``), alike: there is no reset, so a typo would lock one out."""
        username = username.strip()
        if not username or not password:
            self.model.show_error("Choose a username and a password (at least 8 characters).",
                                  about="password" if username else "username")
            return defer.succeed(None)
        if not repeat:
            self.model.show_error("Type the password again under Repeat password.", about="repeat")
            return defer.succeed(None)
        if repeat != password:
            self.model.show_error("The two passwords differ. Type the password again in both fields.",
                                  about="password")
            return defer.succeed(None)
        if self.client is None:
            return defer.succeed(None)

        @defer.inlineCallbacks
        def go():
            yield self.client.create_account(username, password)
            result = yield self.client.login(username, password)
            self.model.signed_in(username)
            self.load_settings()
            return result
        return self._busy(lambda: go().addErrback(self._refused))

    def load_recent(self, unread: int = 0) -> defer.Deferred:
        """Fill the conversation list from recent history (newest first on the server).

        Pages go back until they hold the ``unread`` messages the login
        counted, so every conversation with unread messages is listed, or
        until nothing older is left, or RECENT_PAGES pages; unread messages
        older still count in the window title (``ChatModel.older_unread``).
        """
        @defer.inlineCallbacks
        def go():
            me, found, before = self.model.me, 0, None
            for _ in range(RECENT_PAGES):
                result = yield self.client.history(limit=RECENT, before=before)
                messages = [m for m in result.get("messages", []) if isinstance(m, dict) and "id" in m]
                self.model.add_history_page(None, messages, RECENT, older=before is not None)
                # Counted as the server counts unread (a note to oneself too), so paging
                # stops once the login's count is covered.
                found += sum(1 for m in messages if m.get("to") == me and not m.get("read", False))
                if found >= unread or not messages or not result.get("more", len(messages) >= RECENT):
                    return
                before = min(m["id"] for m in messages)
            self.model.set_older_unread(unread - found, before)
        return self._guard(go())

    def load_settings(self) -> defer.Deferred:
        """The account's settings, for the Account menu. A server without them
        (an older build) leaves them unknown: the menu's choice stays greyed out."""
        me = self.model.me

        def loaded(result):
            if self.model.me == me and isinstance(result, dict):
                self.model.set_read_receipts(bool(result.get("read_receipts", True)))
        return self.client.get_settings().addCallbacks(loaded, lambda failure: None)

    def set_read_receipts(self, on: bool) -> defer.Deferred:
        """Turn read receipts on or off; on failure the menu shows the setting as it was."""
        before, me = self.model.read_receipts, self.model.me

        def done(result):
            if self.model.me == me:
                self.model.set_read_receipts(bool(result.get("read_receipts", on)))

        def failed(failure):
            if self.model.me == me:
                self.model.set_read_receipts(before)
            return failure
        return self._guard(self.client.set_settings(on).addCallbacks(done, failed))

    def log_out(self) -> defer.Deferred:
        d = self.client.logout()
        d.addCallback(lambda _: self.model.signed_out("You are logged out."))
        return self._guard(d)

    def delete_account(self, password: str) -> defer.Deferred:
        """Every refusal is shown in the dialog that asked for the password
        (``error_about`` "delete_account"), where the user is looking."""
        if not password:
            self.model.show_error("Enter your password to delete the account.", about="delete_account")
            return defer.succeed(None)
        name = self.model.me

        def refused(failure):
            # The dialog asks only for the password: "username or password" would mislead.
            if isinstance(failure.value, ServerError) and failure.value.code == "bad_credentials":
                self.model.show_error("That password is wrong.", about="delete_account")
            else:
                self.model.show_error(failure, about="delete_account")
            return None

        def start():
            d = self.client.delete_account(password)
            return d.addCallbacks(lambda _: self.model.signed_out(f"The account {name} was deleted."), refused)
        return self._busy(start)

    # -- conversations -----------------------------------------------------------------

    def open(self, peer: str) -> defer.Deferred:
        self._mark(self.model.open(peer))
        conv = self.model.conversation(peer)
        if conv.loaded_once:
            return self._catch_up(peer)
        return self._load(peer, before=None)

    def _catch_up(self, peer, quiet=False) -> defer.Deferred:
        """Merge the newest page of a conversation already shown.

        What came while the app was reconnecting (pushes are best effort:
        ``message`` and, for what this account sent from another device,
        ``sent``) shows up this way, when the conversation is opened again
        or the connection is back. The pages already loaded stay as they are.
        """
        d = self.client.history(peer=peer, limit=PAGE_SIZE)

        def merge(result):
            self._note_created(peer, result)
            messages = [m for m in result.get("messages", []) if isinstance(m, dict) and "id" in m]
            conv = self.model.conversation(peer)
            if result.get("more") and messages and not any(m["id"] in conv.messages for m in messages):
                # More came meanwhile than a page holds: a gap would sit under this
                # page, never loaded. Start the conversation over from this page.
                self.model.remove_messages(list(conv.messages))
                self._mark(self.model.add_history_page(peer, messages, PAGE_SIZE, older=False, more=True))
            else:
                # New ones, at the bottom: read only if the reader has the bottom in view.
                self._mark(self.model.add_messages(messages, live=True))
        d.addCallback(merge)
        return d.addErrback(self._quiet) if quiet else self._guard(d)

    def newest_in_view(self, in_view: bool):
        """The view says whether the open conversation's newest messages are seen:
        what came while they were not is marked read once they are."""
        self._mark(self.model.set_newest_in_view(in_view))

    def load_older(self) -> defer.Deferred:
        """Scrolled to the top: fetch the page before the oldest message shown."""
        peer = self.model.open_peer
        if peer is None:
            return defer.succeed(None)
        conv = self.model.conversation(peer)
        if not conv.more_before or conv.loading_older or conv.oldest_id is None:
            return defer.succeed(None)
        conv.loading_older = True
        return self._load(peer, before=conv.oldest_id)

    def _note_created(self, peer, result):
        """A history answer's ``peer_created`` (servers of earlier builds leave it out)."""
        created = result.get("peer_created", False)
        if created is None or (isinstance(created, (int, float)) and not isinstance(created, bool)):
            self.model.set_peer_created(peer, created)

    def _load(self, peer, before):
        d = self.client.history(peer=peer, before=before, limit=PAGE_SIZE)

        def loaded(result):
            self._note_created(peer, result)
            self._mark(self.model.add_history_page(peer, result.get("messages", []), PAGE_SIZE,
                                                   older=before is not None, more=result.get("more")))

        def failed(failure):
            self.model.conversation(peer).loading_older = False
            return failure
        d.addCallbacks(loaded, failed)
        return self._guard(d)

    def send(self, text: str) -> defer.Deferred:
        """Send to the open conversation; the bubble shows 'sending…' until the answer.

        The Deferred fires with ``None`` once sent, or with the text that was
        not sent (refused here or by the server) so it can go back into the
        compose box; it never fails.
        """
        peer = self.model.open_peer
        body = text.strip("\n")
        if peer is None or not body.strip():
            return defer.succeed(None)
        if len(body) > MAX_BODY:
            self.model.show_error(f"That message is too long ({len(body):,} characters; at most {MAX_BODY:,}).",
                                  about="compose")
            return defer.succeed(body)
        if self.model.error_sticky:
            self.model.clear_error()   # the last send's failure: this one is tried now
        key, session = next(self._keys), self.model.session
        self.model.sending(peer, key, body)
        d = self.client.send_message(peer, body)

        def sent(result):
            self._committed()
            if self.model.session == session:
                self.model.sent(peer, key, result["message_id"], result.get("ts", 0.0))

        def failed(failure):
            if self.model.session != session:
                # Its writer logged out meanwhile: neither the error nor the text
                # is for whoever uses the window now.
                return None
            # Kept until dismissed: the text back in the compose box alone would
            # not tell someone who looked away that it did not go.
            self.model.show_error("Not sent: " + _sentence(failure), sticky=True)
            if isinstance(failure.value, ServerError) and failure.value.code == "no_such_user":
                self.model.set_peer_created(peer, None)     # the conversation says so too
            return self.model.not_sent(peer, key)

        def bug(failure):
            # The server said it was sent, but its answer could not be shown: a
            # bug worth a log line, not a resend (that would send it twice).
            self.log.failure("showing a sent message failed", failure)
            return None
        return d.addCallbacks(sent, failed).addErrback(bug)

    def compose_changed(self, text: str):
        """The compose box changed: a "too long" error goes once its text fits (or is gone)."""
        if self.model.error_about == "compose" and len(text.strip("\n")) <= MAX_BODY:
            self.model.clear_error()

    def search(self, text: str) -> defer.Deferred:
        """Find accounts; a pattern the server would refuse is explained here, not sent.

        Errors are about the search box (``error_about`` "search"): shown
        under it. Results of an earlier search go away when this one fails."""
        self._search_seq += 1
        seq = self._search_seq
        if self.model.error_about == "search":
            self.model.clear_error()
        try:
            pattern = check_pattern(search_pattern(text))
        except ValueError:
            self.model.clear_search()
            self.model.show_error(f"Cannot search for “{text.strip()}”: use up to 64 letters, digits, "
                                  "_ . - and the wildcards * (any characters) and ? (one character).",
                                  about="search")
            return defer.succeed(None)
        d = self.client.list_accounts(pattern, limit=50)

        def found(result):
            if seq == self._search_seq:
                self.model.set_search(pattern, result.get("accounts", []), result.get("more", False))

        def failed(failure):
            if seq == self._search_seq:
                self.model.clear_search()
                self.model.show_error(failure, about="search")
        return self._guard(d.addCallbacks(found, failed))

    def search_edited(self):
        """The search box's text changed: results (and an error) of what it held
        before no longer answer it, nor does a search still on its way."""
        self._search_seq += 1
        if self.model.search_pattern is not None:
            self.model.clear_search()
        if self.model.error_about == "search":
            self.model.clear_error()

    def delete_selected(self) -> defer.Deferred:
        """Delete the selected messages: the answer to ``ChatModel.ask_delete``'s question."""
        self.model.cancel_delete()
        ids = sorted(self.model.selected)
        if not ids:
            return defer.succeed(None)
        d = self.client.delete_messages(ids)
        d.addCallback(lambda _: self.model.remove_messages(ids))
        return self._guard(d)


def _sentence(failure):
    from .explain import explain
    text = explain(failure)
    return text[0].lower() + text[1:] if isinstance(failure.value, (ServerError, RequestTooLarge)) else text
