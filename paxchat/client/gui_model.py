"""What the desktop app shows, as plain data: screens, conversations, badges, status.

No Tk here. The widgets in ``gui.py`` only draw this model and forward
clicks to the controller, so everything a person sees (which conversation
has how many unread messages, what the status bar says, which sentence an
error becomes) is decided here and tested without a display.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .errors import UntrustedNodes
from .explain import explain

__all__ = ["ChatModel", "Conversation", "Coalescer", "status_text", "status_level", "PAGE_SIZE"]

PAGE_SIZE = 50  # messages per history page when scrolling back
RUN_GAP = 300.0  # seconds: closer messages from one sender are drawn as one run
UNTOLD = object()  # a Conversation's peer_created before any history answer said it


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def status_text(status) -> str:
    """The status bar sentence for a client ``Status``."""
    if status is None:
        return ""
    if status.state == "connected":
        leader = f"leader {status.leader}" if status.leader is not None else "no leader yet"
        return f"Connected to node {status.node} · {leader}"
    if status.state == "reconnecting":
        # e.g. "node 2 is stopping": say why, when the server told us.
        return f"Reconnecting ({status.detail})…" if status.detail else "Reconnecting…"
    if status.state == "connecting":
        return f"Connecting ({status.detail})…" if status.detail else "Connecting…"
    if status.state == "failed":
        if isinstance(status.error, UntrustedNodes):
            # Not "cannot reach": the servers answer, with certificates the app's ca.pem does not sign.
            return f"Offline: TLS refused the servers' certificates ({status.error.problem}). Retrying…"
        if status.no_majority:
            return "Offline: servers answer, but too few are up to agree. Retrying…"
        return "Offline: cannot reach any server. Retrying…"
    if status.state == "closed":
        return "Disconnected"
    return ""


def status_level(status) -> str:
    """The status bar dot's colour, a ``COLORS`` key: "ok" only while writes can
    succeed (connected, with a leader); "danger" offline; else "warn"
    (connecting, reconnecting, or connected while no leader is elected)."""
    if status is None:
        return "warn"
    if status.state == "connected":
        return "ok" if status.leader is not None else "warn"
    return "danger" if status.state == "failed" else "warn"


def time_label(ts, now: float | None = None, localtime=time.localtime) -> str:
    """``14:05`` today, ``Mon 14:05`` this week, else ``2026-11-02``."""
    try:
        ts = float(ts)
        now = time.time() if now is None else now
        t, n = localtime(ts), localtime(now)
    except (TypeError, ValueError, OverflowError, OSError):
        return ""
    if (t.tm_year, t.tm_yday) == (n.tm_year, n.tm_yday):
        return time.strftime("%H:%M", t)
    if 0 <= now - ts < 6 * 86400:
        return time.strftime("%a %H:%M", t)
    return time.strftime("%Y-%m-%d", t)


@dataclass
class Conversation:
    """The messages exchanged with one peer that are loaded so far, oldest first."""

    peer: str
    messages: dict = field(default_factory=dict)   # id -> message
    unread_ids: set = field(default_factory=set)
    more_before: bool = True        # older history may exist on the server
    loading_older: bool = False
    loaded_once: bool = False       # the newest page was fetched
    pending: dict = field(default_factory=dict)    # local key -> message being sent
    # When the account now named ``peer`` was created (history's ``peer_created``):
    # older messages were with an earlier account of the name. None: no account
    # has the name; UNTOLD: the server has not said (an earlier build).
    peer_created: float | None | object = UNTOLD

    @property
    def unread(self) -> int:
        return len(self.unread_ids)

    def ordered(self) -> list[dict]:
        return [self.messages[i] for i in sorted(self.messages)]

    @property
    def last(self) -> dict | None:
        if self.pending:
            return list(self.pending.values())[-1]
        return self.messages[max(self.messages)] if self.messages else None

    @property
    def oldest_id(self) -> int | None:
        return min(self.messages) if self.messages else None

    @property
    def last_ts(self) -> float:
        last = self.last
        return float(last.get("ts", 0)) if last else 0.0


class ChatModel:
    """Screens and conversations of one signed-in user; tells a listener what changed.

    ``on_change(parts)`` receives a set naming what to redraw: ``screen``,
    ``status``, ``list``, ``conversation``, ``error``, ``search``, ``settings``.
    """

    def __init__(self, on_change: Callable[[set], None] | None = None):
        self.on_change = on_change
        self.screen = "login"
        self.me: str | None = None
        self.status = ""
        self.status_level = status_level(None)   # the status bar dot's colour: see status_level
        # The client holds sends for want of a node with a leader (reconnecting,
        # offline, no leader elected): pending messages say "waiting…", not "sending…".
        self.sends_wait = False
        self.error = ""
        # A send that failed: its error stays until dismissed or replaced (the
        # next send, another error), where others go by themselves.
        self.error_sticky = False
        # What the error is about, where the view can tell: "username",
        # "password" or "repeat" (the password typed again, creating an
        # account) on the login screen (that field gets the cursor),
        # "compose" (a message too long, gone once it fits),
        # "delete_account" (shown in the dialog asking for the password), or
        # "search" (shown under the search box, gone once its text changes).
        self.error_about: str | None = None
        # Why the login screen is back ("You are logged out."): until an error
        # or a new attempt to log in replaces it.
        self.notice = ""
        # The login screen creates an account: a second password field shows,
        # to type it again (there is no reset, so a typo would lock one out).
        self.creating_account = False
        self.conversations: dict[str, Conversation] = {}
        self.open_peer: str | None = None
        self.selected: set[int] = set()
        self.confirming_delete = False   # "Delete N messages?" is asked in the header
        self.search_pattern: str | None = None
        self.search_results: list[str] = []
        self.search_more = False
        # The sidebar row the keyboard is on (Down from Find people), by name,
        # so it stays on its person when a new message reorders the list; None
        # while the keys are not in the list.
        self.list_cursor: str | None = None
        self.busy = False
        # Unread messages older than the history loaded at login (more than it
        # could page through): counted in the title until they are loaded.
        self.older_unread = 0
        self.older_than: int | None = None
        # What was typed but not sent in conversations not open: peer -> text.
        self.drafts: dict[str, str] = {}
        # The account's read receipts setting; None until the server said (or if it
        # has no settings): shown as on, which is the server's default.
        self.read_receipts: bool | None = None
        # Counts sign-ins and sign-outs: an answer that comes back once the
        # account it was asked for is gone (a send still in flight at logout)
        # must not show up for the next one. The view empties the compose box
        # when it changes.
        self.session = 0
        # Whether the reader has the open conversation's newest messages in
        # view (the view says: scrolled to the bottom, window not minimised
        # or in the background). If not, what arrives there stays unread.
        self.newest_in_view = True

    def _changed(self, *parts):
        if self.on_change is not None:
            self.on_change(set(parts))

    # -- connection and screens ----------------------------------------------------

    def set_status(self, status):
        self.status = status_text(status)
        self.status_level = status_level(status)
        was, self.sends_wait = self.sends_wait, status is not None and self.status_level != "ok"
        pending = self.open_peer is not None and self.conversation(self.open_peer).pending
        self._changed(*(("status", "conversation") if pending and was != self.sends_wait else ("status",)))

    def show_error(self, reason, sticky: bool = False, about: str | None = None):
        """Show a failure (Failure, exception or sentence) as one readable sentence;
        ``sticky``: until dismissed, not for a few seconds; ``about``: see ``error_about``."""
        self.error = reason if isinstance(reason, str) else explain(reason)
        self.error_sticky, self.error_about = sticky, about
        self.notice = ""    # old news: under the error, "You are logged out." would read as its cause
        self._changed("error")

    def clear_error(self):
        self.error_sticky, self.error_about = False, None
        if self.error:
            self.error = ""
            self._changed("error")

    def set_creating(self, creating: bool):
        """Switch the login screen between logging in and creating an account."""
        if creating != self.creating_account:
            self.creating_account = creating
            if creating and self.notice:
                # On to something else: what the login screen said is old news.
                self.notice = ""
                self._changed("error")
            self._changed("screen")

    def set_busy(self, busy: bool):
        """A request is on its way (log in, create or delete the account): its buttons wait."""
        self.busy = busy
        if busy:
            self.notice = ""    # a new attempt: what the login screen said before is old news
        self._changed("screen")

    def signed_in(self, username: str):
        self.me = username
        self.screen = "chats"
        self._forget_account()

    def signed_out(self, notice: str = ""):
        self.me = None
        self.screen = "login"
        self.notice = notice
        self._forget_account()  # an error from the chats is over too: the login screen starts clean

    def _forget_account(self):
        """What was shown and typed for the account before: gone, on either screen change."""
        self.session += 1
        self.error, self.error_sticky, self.error_about = "", False, None
        self.creating_account = False   # the login screen comes back to logging in
        self.conversations.clear()
        self.open_peer = None
        self.selected.clear()
        self.confirming_delete = False
        self.search_pattern = None
        self.list_cursor = None
        self.older_unread, self.older_than = 0, None
        self.read_receipts = None
        self.drafts.clear()
        self._changed("screen", "list", "conversation", "error")

    # -- messages ------------------------------------------------------------------

    def peer_of(self, message: dict) -> str:
        return message.get("to") if message.get("from") == self.me else message.get("from")

    def conversation(self, peer: str) -> Conversation:
        conv = self.conversations.get(peer)
        if conv is None:
            conv = self.conversations[peer] = Conversation(peer)
        return conv

    def add_messages(self, messages: Iterable[dict], live: bool = False) -> list[int]:
        """Merge messages (pushed or from history); returns ids to mark read now.

        A received, unread message counts towards its conversation's badge
        unless that conversation is open, in which case it is read at once;
        unless it is ``live`` (new, at the bottom: pushed, or caught up
        after a failover) while the reader does not have the newest
        messages in view: it stays unread until they do (``set_newest_in_view``).
        """
        to_mark, touched = [], set()
        for message in messages:
            if not isinstance(message, dict) or "id" not in message or self.me is None:
                continue
            peer = self.peer_of(message)
            if not peer:
                continue
            conv = self.conversation(peer)
            new = message["id"] not in conv.messages
            conv.messages[message["id"]] = message
            if live and new and conv.peer_created is None:
                # Only an account that exists sends or is sent to: the name was
                # taken again, no later than this message.
                conv.peer_created = _float(message.get("ts"))
            touched.add(peer)
            incoming = message.get("to") == self.me and message.get("from") != self.me
            if incoming and not message.get("read", False):
                if new and self.older_than is not None and message["id"] < self.older_than and self.older_unread:
                    self.older_unread -= 1  # counted by its conversation from now on
                if peer == self.open_peer and (self.newest_in_view or not live):
                    to_mark.append(message["id"])
                    message["read"] = True
                else:
                    conv.unread_ids.add(message["id"])
        if touched:
            parts = {"list"}
            if self.open_peer in touched:
                parts.add("conversation")
            self._changed(*parts)
        return to_mark

    def add_history_page(self, peer: str | None, messages: list[dict], limit: int, older: bool,
                         more: bool | None = None) -> list[int]:
        """A page of ``history`` (newest first from the server); notes whether more remain.

        ``more`` is the answer's own word on it; a server that does not
        give it ends a page early only at the end of the history.
        """
        ids = self.add_messages(messages)
        if peer is not None:
            conv = self.conversation(peer)
            conv.loading_older = False
            conv.loaded_once = True
            if more is not None:
                conv.more_before = more
            elif older or len(messages) < limit:
                conv.more_before = len(messages) >= limit
            self._changed("conversation", "list")
        return ids

    def set_peer_created(self, peer: str, created):
        """History's ``peer_created`` for ``peer``: a time, or None (no such account now)."""
        conv = self.conversation(peer)
        conv.peer_created = None if created is None else _float(created)
        if peer == self.open_peer:
            self._changed("conversation")

    def account_notes(self) -> tuple[int | None, str | None]:
        """Where the open conversation changes accounts: ``(id, text)`` to draw the text
        above the message ``id`` (None: below the last one), or ``(None, None)``."""
        conv = self.conversation(self.open_peer) if self.open_peer is not None else None
        if conv is None or not conv.messages or conv.peer_created is UNTOLD:
            return None, None
        created = conv.peer_created
        if created is None:
            return None, f"{conv.peer}'s account was deleted."
        ordered = conv.ordered()
        if _float(ordered[0].get("ts")) >= created:
            return None, None
        later = [m["id"] for m in ordered if _float(m.get("ts")) >= created]
        text = (f"{conv.peer} is a new account since {time_label(created)}: "
                "the messages above were with an earlier account of that name.")
        return (later[0] if later else None), text

    def set_older_unread(self, count: int, older_than: int | None):
        """``count`` unread messages, all with ids below ``older_than``, are not loaded yet."""
        self.older_unread, self.older_than = max(0, count), older_than
        self._changed("list")

    def remove_messages(self, ids: Iterable[int], unread: int | None = None):
        """Deleted messages go. ``unread``, the account's count after the delete
        (a ``deleted`` event carries it), lowers ``older_unread`` when one of
        them was an unread message never loaded: the ids alone cannot say."""
        ids = set(ids)
        for conv in self.conversations.values():
            for i in ids & set(conv.messages):
                del conv.messages[i]
                conv.unread_ids.discard(i)
        if unread is not None and self.older_unread:
            # Only ever lowered: a message read here whose mark is still on its
            # way counts as unread on the server a moment longer.
            self.older_unread = min(self.older_unread, max(0, unread - self.total_unread))
        self.selected -= ids
        self.confirming_delete = self.confirming_delete and bool(self.selected)
        self._changed("conversation", "list")

    def read_elsewhere(self, ids: Iterable[int]):
        """Messages another session of this account read: no longer unread here.

        Those older than what was loaded at login (``older_than``) count in
        ``older_unread``; the ones named leave that count too (the other
        session reads only unread ones, so the count stays near the truth,
        and the next login sets it right).
        """
        ids, touched, changed = set(ids), set(), False
        for conv in self.conversations.values():
            held = ids & set(conv.messages)
            ids -= held
            for i in held:
                message = conv.messages[i]
                if message.get("to") == self.me and not message.get("read", False):
                    message["read"] = True
                    conv.unread_ids.discard(i)
                    touched.add(conv.peer)
        older = sum(1 for i in ids if self.older_than is not None and i < self.older_than)
        if older and self.older_unread:
            self.older_unread = max(0, self.older_unread - older)
            changed = True
        if touched or changed:
            self._changed("list", *(["conversation"] if self.open_peer in touched else []))

    def set_read_receipts(self, on: bool | None):
        """The account's setting as the server has it. Off: no "Read" under your
        messages, as the server then shows none (it keeps the fact)."""
        self.read_receipts = on
        self._changed("settings", "conversation")

    def seen(self, ids: Iterable[int]):
        """Messages this account sent that their recipient has read: "Read" under the newest."""
        ids, touched = set(ids), set()
        for conv in self.conversations.values():
            for i in ids & set(conv.messages):
                message = conv.messages[i]
                if message.get("from") == self.me and not message.get("read", False):
                    message["read"] = True
                    touched.add(conv.peer)
        if self.open_peer in touched:
            self._changed("conversation")

    def open(self, peer: str) -> list[int]:
        """Open a conversation; returns the ids its badge counted, to mark read."""
        conv = self.conversation(peer)
        self.open_peer = peer
        self.selected.clear()
        self.confirming_delete = False
        ids = sorted(conv.unread_ids)
        for i in ids:
            conv.messages[i]["read"] = True
        conv.unread_ids.clear()
        self.search_pattern = None
        self.list_cursor = None     # the keys go on to the compose box
        self._changed("list", "conversation", "search")
        return ids

    def set_newest_in_view(self, in_view: bool) -> list[int]:
        """The reader has (or no longer has) the open conversation's newest
        messages in view; returns the ids that came meanwhile, to mark read now."""
        self.newest_in_view = in_view
        conv = self.conversations.get(self.open_peer) if self.open_peer is not None else None
        if not in_view or conv is None or not conv.unread_ids:
            return []
        ids = sorted(conv.unread_ids)
        for i in ids:
            conv.messages[i]["read"] = True
        conv.unread_ids.clear()
        self._changed("list", "conversation")
        return ids

    @property
    def unseen_below(self) -> int:
        """Messages in the open conversation that came while it was scrolled up (or
        the window was away): "N new messages" below, until they are in view."""
        conv = self.conversations.get(self.open_peer) if self.open_peer is not None else None
        return conv.unread if conv is not None else 0

    @property
    def unseen_cue(self) -> str:
        n = self.unseen_below
        return f"↓ {n:,} new message{'' if n == 1 else 's'}" if n else ""

    def keep_draft(self, peer: str, text: str):
        """Keep what was typed to ``peer`` (nothing if it is blank) for when its conversation opens again."""
        if text.strip():
            self.drafts[peer] = text
        else:
            self.drafts.pop(peer, None)

    def take_draft(self, peer: str) -> str:
        return self.drafts.pop(peer, "")

    def neighbour(self, step: int) -> str | None:
        """The conversation ``step`` rows below the open one in the sidebar (above if negative).

        Stops at either end; with none open, the first (or last) row.
        """
        peers = [conv.peer for conv in self._in_sidebar_order()]
        if not peers:
            return None
        if self.open_peer not in peers:
            return peers[0] if step > 0 else peers[-1]
        at = peers.index(self.open_peer) + step
        return peers[min(max(at, 0), len(peers) - 1)]

    # -- the sidebar from the keyboard ------------------------------------------------

    def list_peers(self) -> list[str]:
        """The sidebar's rows, top to bottom: the search results while they are
        shown, else the conversations."""
        if self.search_pattern is not None:
            return list(self.search_results)
        return [conv.peer for conv in self._in_sidebar_order()]

    def enter_list(self) -> bool:
        """Down from Find people: the keys go to the sidebar's first row.
        False (and nothing changes) when the list has no row to go to."""
        peers = self.list_peers()
        if not peers:
            return False
        self._set_list_cursor(peers[0])
        return True

    def move_list_cursor(self, step: int, leave: bool = True) -> bool:
        """Up or Down (``step`` rows; a page with Page Up/Down) in the sidebar.

        Stops at the last row, and at the first, except that with ``leave``
        (Up, not Page Up) a step up from the first row leaves the list, for
        Find people just above it: False then, as when there is no row at
        all. A cursor not (or no longer) in the list starts at the first row."""
        peers = self.list_peers()
        if not peers:
            self.leave_list()
            return False
        if self.list_cursor not in peers:
            self._set_list_cursor(peers[0])
            return True
        at = peers.index(self.list_cursor)
        if at == 0 and step < 0 and leave:
            self.leave_list()
            return False
        self._set_list_cursor(peers[min(max(at + step, 0), len(peers) - 1)])
        return True

    def list_cursor_to_end(self, last: bool):
        """Home or End in the sidebar: its first or last row."""
        peers = self.list_peers()
        if peers:
            self._set_list_cursor(peers[-1] if last else peers[0])

    def leave_list(self):
        """The keys left the sidebar: no row is marked as theirs."""
        self._set_list_cursor(None)

    def _set_list_cursor(self, peer: str | None):
        if peer != self.list_cursor:
            self.list_cursor = peer
            self._changed("list")

    def toggle_selected(self, message_id: int):
        if message_id in self.selected:
            self.selected.discard(message_id)
        else:
            self.selected.add(message_id)
        self.confirming_delete = False  # asked about other messages
        self._changed("conversation")

    def selected_text(self, message_id: int | None = None) -> str:
        """The bodies of the selected messages, oldest first, one after another on
        lines of their own: what Copy puts on the clipboard. With ``message_id``
        not among them (a right-click elsewhere), that message's alone."""
        if self.open_peer is None:
            return ""
        conv = self.conversation(self.open_peer)
        ids = self.selected if message_id is None or message_id in self.selected else {message_id}
        return "\n".join(str(conv.messages[i].get("body", "")) for i in sorted(ids) if i in conv.messages)

    def ask_delete(self):
        """Deleting cannot be undone: ask first (``delete_question``) when messages are selected."""
        if self.selected and not self.confirming_delete:
            self.confirming_delete = True
            self._changed("conversation")

    def cancel_delete(self):
        if self.confirming_delete:
            self.confirming_delete = False
            self._changed("conversation")

    @property
    def delete_question(self) -> str:
        """Deleting removes the messages for the other person too, for good: say both."""
        n = len(self.selected)
        return f"Delete {n} message{'' if n == 1 else 's'} for both of you? No undo."

    @property
    def delete_question_short(self) -> str:
        """The question where the whole one would not fit beside the peer's name."""
        return f"Delete {len(self.selected)} for both of you?"

    @property
    def delete_questions(self) -> tuple[str, str, str]:
        """Longest first; the last, for the narrowest window, still warns that both lose them."""
        return (self.delete_question, self.delete_question_short, "For both?")

    # -- what to draw ----------------------------------------------------------------

    def conversation_rows(self) -> list[dict]:
        """The sidebar: most recent conversation first, with preview, time and unread badge."""
        rows = []
        for conv in self._in_sidebar_order():
            last = conv.last
            preview = ""
            if last is not None:
                body = " ".join(str(last.get("body", "")).split())
                preview = ("You: " if last.get("from") == self.me else "") + body
                if len(preview) > 60:
                    preview = preview[:59] + "…"
            rows.append({"peer": conv.peer, "preview": preview, "unread": conv.unread,
                         "time": time_label(conv.last_ts) if last else "", "open": conv.peer == self.open_peer,
                         "cursor": conv.peer == self.list_cursor})
        return rows

    def _in_sidebar_order(self) -> list[Conversation]:
        return sorted(self.conversations.values(), key=lambda c: (-c.last_ts, c.peer))

    @property
    def total_unread(self) -> int:
        return sum(c.unread for c in self.conversations.values())

    def bubbles(self) -> list[dict]:
        """The open conversation, oldest at the top, newest at the bottom, one dict per bubble."""
        if self.open_peer is None:
            return []
        conv = self.conversation(self.open_peer)
        out = []
        previous = None
        newest_mine = None
        new_account_at, _ = self.account_notes()
        for m in conv.ordered():
            mine = m.get("from") == self.me
            ts = _float(m.get("ts"))
            # Messages from one sender within a few minutes form a run: one name on
            # top. A new account of the peer's name starts one too, under its note.
            first = (previous is None or previous[0] != mine or ts - previous[1] > RUN_GAP
                     or m["id"] == new_account_at)
            out.append({"id": m["id"], "mine": mine, "sender": "You" if mine else m.get("from", "?"),
                        "body": str(m.get("body", "")), "time": time_label(ts),
                        "selected": m["id"] in self.selected, "first_in_run": first, "receipt": None})
            previous = (mine, ts)
            if mine:
                newest_mine = (out[-1], m)
        if newest_mine is not None and self.open_peer != self.me:
            # Under the newest message sent here: whether its recipient has read it.
            bubble, message = newest_mine
            read = message.get("read", False) and self.read_receipts is not False
            bubble["receipt"] = "Read" if read else "Sent"
        for key, m in conv.pending.items():
            out.append({"id": None, "key": key, "mine": True, "sender": "You", "body": m["body"],
                        "time": "waiting…" if self.sends_wait else "sending…", "selected": False,
                        "first_in_run": previous is None or not previous[0], "receipt": None})
            previous = (True, m["ts"])
        return out

    def sending(self, peer: str, key, body: str):
        """Show a message as being sent until the server answers."""
        self.conversation(peer).pending[key] = {"body": body, "ts": time.time(), "from": self.me, "to": peer}
        self._changed("conversation", "list")

    def sent(self, peer: str, key, message_id: int, ts: float):
        conv = self.conversation(peer)
        pending = conv.pending.pop(key, None)
        if pending is not None:
            # Read at once only if it is to oneself; else when the recipient reads it (``seen``).
            conv.messages[message_id] = {"id": message_id, "from": self.me, "to": peer,
                                         "body": pending["body"], "ts": ts, "read": peer == self.me}
        self._changed("conversation", "list")

    def not_sent(self, peer: str, key) -> str | None:
        """Drop a failed send; returns its text so it can go back into the compose box."""
        pending = self.conversation(peer).pending.pop(key, None)
        self._changed("conversation", "list")
        return pending["body"] if pending else None

    def set_search(self, pattern: str, accounts: list[str], more: bool):
        self.search_pattern = pattern
        self.search_results = [a for a in accounts if a != self.me]
        self.search_more = more
        self.list_cursor = None     # another list: the keys start again from Find people
        self._changed("search")

    def clear_search(self):
        self.search_pattern = None
        self.search_results = []
        self.search_more = False
        self.list_cursor = None
        self._changed("search")

    @property
    def title(self) -> str:
        unread = self.total_unread + self.older_unread
        base = f"paxchat — {self.me}" if self.me else "paxchat"
        return f"({unread}) {base}" if unread else base


def search_pattern(text: str) -> str:
    """What the user typed -> a list_accounts pattern: wildcards as given, else a prefix search."""
    text = text.strip()
    if not text:
        return "*"
    if "*" in text or "?" in text or len(text) >= 64:   # no room for the star: as typed
        return text
    return text + "*"


class Coalescer:
    """Collect change notices and redraw once per reactor turn, however many arrived.

    A burst of a thousand pushed messages becomes one redraw instead of a
    thousand: ``notify(parts)`` only schedules ``redraw(all parts)`` with
    ``call_later(0, ...)`` if one is not pending already.
    """

    def __init__(self, call_later: Callable, redraw: Callable[[set], None]):
        self.call_later = call_later
        self.redraw = redraw
        self.dirty: set = set()
        self._pending = None

    def notify(self, parts: set):
        self.dirty |= parts
        if self._pending is None:
            self._pending = self.call_later(0, self._flush)

    def _flush(self):
        self._pending = None
        dirty, self.dirty = self.dirty, set()
        if dirty:
            self.redraw(dirty)

    @property
    def pending(self) -> bool:
        """Whether a redraw is scheduled and has not run yet."""
        return self._pending is not None

    def cancel(self):
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
