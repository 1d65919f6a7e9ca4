"""Login sessions as this node sees them: tokens, and which connections use which session.

A session token is shown to its client once and never stored or logged:
the replicated state and every command only hold ``sha256(token)``.
The registry maps usernames and session hashes to this node's connections
so applied commands can be pushed to them.
"""

import hashlib
import secrets
from dataclasses import dataclass


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Session:
    username: str
    session_hash: str
    expires: float


class ConnectionRegistry:
    """The connections of this node that are logged in, by user and by session.

    A connection is any object with a ``session`` attribute, which the
    registry keeps in step (``None`` when not logged in). A key with one
    connection (the usual case) maps to it directly, a set only when there
    are more: each idle client costs a dict entry, not a set.
    """

    def __init__(self):
        self._by_user = {}
        self._by_session = {}

    def attach(self, conn, session):
        self.detach(conn)
        conn.session = session
        _add(self._by_user, session.username, conn)
        _add(self._by_session, session.session_hash, conn)

    def detach(self, conn):
        session = conn.session
        if session is None:
            return
        conn.session = None
        _remove(self._by_user, session.username, conn)
        _remove(self._by_session, session.session_hash, conn)

    def of_user(self, username):
        return _members(self._by_user.get(username))

    def of_session(self, session_hash):
        return _members(self._by_session.get(session_hash))

    def __len__(self):
        return sum(len(entry) if type(entry) is set else 1 for entry in self._by_user.values())


def _add(table, key, conn):
    entry = table.get(key)
    if entry is None:
        table[key] = conn
    elif type(entry) is set:
        entry.add(conn)
    elif entry is not conn:
        table[key] = {entry, conn}


def _remove(table, key, conn):
    entry = table.get(key)
    if entry is conn:
        del table[key]
    elif type(entry) is set:
        entry.discard(conn)
        if len(entry) == 1:
            table[key] = next(iter(entry))


def _members(entry):
    if entry is None:
        return []
    return list(entry) if type(entry) is set else [entry]
