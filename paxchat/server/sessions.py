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


@dataclass(frozen=True)
class Session:
    username: str
    session_hash: str
    expires: float


class ConnectionRegistry:
    """The connections of this node that are logged in, by user and by session.

    A connection is any object with a ``session`` attribute, which the
    registry keeps in step (``None`` when not logged in).
    """

    def __init__(self):
        self._by_user = {}
        self._by_session = {}

    def attach(self, conn, session):
        self.detach(conn)
        conn.session = session
        self._by_user.setdefault(session.username, set()).add(conn)
        self._by_session.setdefault(session.session_hash, set()).add(conn)

    def detach(self, conn):
        session = conn.session
        if session is None:
            return
        conn.session = None
        for table, key in ((self._by_user, session.username), (self._by_session, session.session_hash)):
            conns = table.get(key)
            if conns is not None:
                conns.discard(conn)
                if not conns:
                    del table[key]

    def of_user(self, username):
        return list(self._by_user.get(username, ()))

    def of_session(self, session_hash):
        return list(self._by_session.get(session_hash, ()))

    def __len__(self):
        return sum(len(conns) for conns in self._by_user.values())
