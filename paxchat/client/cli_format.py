"""How the command-line client prints things: messages, lists, results.

Plain text meant for a terminal and for grep: one header line per message
with its id (needed by ``delete``), then the body indented so multi-line
bodies stay readable. What other accounts wrote is shown, never obeyed:
control characters are printed as escapes (see ``visible``).
"""

from __future__ import annotations

import re
import time
from typing import Callable, Iterable

__all__ = ["format_message", "format_messages", "format_accounts", "format_time", "visible", "HELP",
           "HISTORY_LIMIT", "READ_LIMIT", "not_accepting", "older_hint", "sent"]

# How many messages `read` and `history` show by default, one-shot and at the prompt.
READ_LIMIT = 10
HISTORY_LIMIT = 20

# C0 but tab and newline, DEL, C1; the line and paragraph separators; and the
# bidirectional marks, embeddings, overrides and isolates, which reorder text.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029"
                      r"\u202a-\u202e\u2066-\u2069]")


def visible(text: str) -> str:
    """``text`` with control characters written as ``\\x1b``-style escapes.

    Bodies come from other accounts: an ESC sequence, BEL or CR sent raw to
    the reader's terminal could recolour or clear it, or return to the start
    of the line and print a fake ``#id alice -> bob`` header over it; a
    bidirectional override could make the text read other than it is. Tab is
    kept (it only moves right). Newline is kept too, so multi-line messages
    stay readable: ``format_message`` indents every body line, so none can
    pass for a header.
    """
    return _CONTROL.sub(_escape, text)


def _escape(match):
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def format_time(ts, localtime: Callable = time.localtime) -> str:
    """``2026-11-22 14:05`` in local time."""
    try:
        return time.strftime("%Y-%m-%d %H:%M", localtime(float(ts)))
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"


def format_message(message: dict, me: str | None = None, localtime: Callable = time.localtime) -> str:
    """``#12 2026-11-22 14:05  bob -> alice`` then the body, indented.

    ``(new)`` marks a message to ``me`` not read yet; ``(read)`` one ``me``
    sent that its recipient has read.
    """
    sender = visible(str(message.get("from", "?")))
    to = message.get("to", "?")
    mark = ""
    if me is not None and to == me and not message.get("read", True):
        mark = "  (new)"
    elif me is not None and message.get("from") == me and to != me and message.get("read") is True:
        mark = "  (read)"
    head = (f"#{visible(str(message.get('id', '?')))} {format_time(message.get('ts'), localtime)}"
            f"  {sender} -> {visible(str(to))}{mark}")
    body = visible(str(message.get("body", "")))
    lines = body.split("\n") or [""]
    return "\n".join([head] + ["    " + line for line in lines])


def format_messages(messages: Iterable[dict], me: str | None = None,
                    localtime: Callable = time.localtime) -> str:
    """Messages one after another, or a note that there are none."""
    blocks = [format_message(m, me, localtime) for m in messages]
    return "\n".join(blocks) if blocks else "(no messages)"


def format_history(result: dict, me: str | None = None, peer: str | None = None,
                   localtime: Callable = time.localtime) -> str:
    """A ``history`` page, oldest first. With a ``peer``, a line marks where the account
    now of that name begins, after messages with an earlier account of the name (the
    answer's ``peer_created``), and one says when no account has the name any more."""
    messages = list(reversed(result.get("messages", [])))
    blocks = [format_message(m, me, localtime) for m in messages] or ["(no messages)"]
    if peer is not None and messages and "peer_created" in result:  # earlier builds leave it out
        created, name = result["peer_created"], visible(peer)
        if created is None:
            blocks.append(f"(no account is named {name} now: it was deleted)")
        else:
            earlier = [i for i, m in enumerate(messages) if _before(m.get("ts"), created)]
            if earlier:
                blocks.insert(earlier[-1] + 1, (
                    f"--- {name} is a new account since {format_time(created, localtime)}: "
                    "the messages above were with an earlier account of that name ---"))
    return "\n".join(blocks)


def _before(ts, created) -> bool:
    try:
        return float(ts) < float(created)
    except (TypeError, ValueError):
        return False


def format_read(result: dict, me: str | None = None, localtime: Callable = time.localtime) -> str:
    """What ``read`` shows: the messages it marked read and how many are left, or one line
    when there was nothing to read."""
    messages = result.get("messages", [])
    if not messages and not result.get("unread", 0):
        return "(no unread messages)"
    return f"{format_messages(messages, me, localtime)}\n({result.get('unread', 0)} unread left)"


def format_accounts(accounts: list[str], more: bool) -> str:
    lines = [visible(str(name)) for name in accounts] or ["(no matching accounts)"]
    if more and accounts:
        lines.append(f"(more; continue with --after {lines[-1]})")
    return "\n".join(lines)


def older_hint(result: dict) -> str | None:
    """Under a ``history`` page with older messages left: how to see them."""
    messages = result.get("messages", [])
    if result.get("more") and messages:
        return f"(older messages: add --before {messages[-1].get('id')})"
    return None


def format_settings(result: dict) -> str:
    """An account's settings, as ``settings`` shows them."""
    receipts = "on" if result.get("read_receipts", True) else "off"
    return f"read receipts: {receipts}"


def sent(result: dict, to: str) -> str:
    """What a send says, one-shot and at the prompt."""
    return f"Sent #{result.get('message_id')} to {to}."


def not_accepting(status) -> str:
    """The line for a ``Status`` whose round found no node accepting a connection.

    Said once, while the client waits on (the nodes of a cluster restarting
    under systemd come back), so that a command does not sit silent for its
    whole --timeout: the addresses grouped by what each said, and how long
    it keeps trying.
    """
    groups: dict[str, list[str]] = {}
    for label, why in status.not_accepted:
        groups.setdefault(why, []).append(label)
    listed = "; ".join(f"{', '.join(labels)}: {why}" for why, labels in groups.items())
    wait = ""
    if status.retry_for is not None:
        left = round(status.retry_for) if status.retry_for >= 1 else round(status.retry_for, 1)
        wait = f" for up to {left:g} s"
    return f"no server is accepting connections ({listed}); still trying{wait}"


HELP = f"""\
Commands:
  register USER             create an account (asks for a password)
  login USER                log in (asks for the password)
  send USER MESSAGE...      send a message
  read [N]                  show up to N unread messages (default {READ_LIMIT}) and mark them read
  history [PEER] [N]        the last N messages (default {HISTORY_LIMIT}), with PEER or with everyone
  list [PATTERN]            accounts matching a pattern with * and ? (default *)
  delete ID...              delete messages by id
  receipts [on|off]         show or set read receipts (off: nobody is told you read
                            their messages, and you are not told of yours)
  delete-account            delete your account (asks for the password again)
  logout                    end the session
  help                      this text
  quit                      leave (also Ctrl-D)
Messages sent to you are shown as they arrive.
Passwords come from $PAXCHAT_PASSWORD when it is set (not asked twice then)."""
