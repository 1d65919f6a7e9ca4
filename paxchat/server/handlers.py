"""What each op of the protocol does, given a connection and a checked request.

Handlers validate every argument before anything happens, check rate limits
before anything is proposed, run bcrypt off the reactor thread, turn the
request into a command for the log, and shape the state's answer into the
contract's result. They raise ``ProtocolError`` for every answer that is not
``ok``. Validation and the rate-limit check happen before the first
``await``, so pipelined writes of one connection reach the log in the order
they were sent.

A write carries its session's hash, so the state rejects it with
``bad_session`` if that session ended meanwhile on any node; the connection
is then logged out and the client hears ``not_logged_in`` (the contract
lists ``bad_session`` only for ``resume``).

Reads of the local state take turns by account (a connection not logged
in is its own turn; see ``StateWorker``), so an account that scans on many
connections gets no more turns than one that reads on one.

Every write may carry a ``client_msg_id``; it goes into the command as
``dedup``, so a client that resends a write whose answer it lost (after a
failover) gets the first answer again instead of a second effect
(``send_message`` keeps its own per-message dedup).
"""

from dataclasses import replace

from twisted.internet import defer

from paxchat.clocks import wall_clock
from paxchat.interfaces import Unavailable

from . import validation as V
from .errors import (
    BAD_CREDENTIALS, BAD_SESSION, BODY_TOO_LARGE, INVALID_PASSWORD, INVALID_USERNAME,
    NO_SUCH_USER, NOT_LOGGED_IN, RATE_LIMITED, UNAVAILABLE, UNKNOWN_OP, UPGRADE_IN_PROGRESS,
    USERNAME_TAKEN, ProtocolError,
)
from .sessions import Session, new_token, token_hash

PROTOCOL_VERSION = 1

# Ops that change which session a connection is in: later requests of the
# same connection wait for them (see ChatProtocol).
SESSION_OPS = frozenset({"login", "resume", "logout", "delete_account"})


class Handlers:
    def __init__(self, reactor, log, worker, settings, hasher, registry,
                 login_per_account, writes_per_account, leader_events=None):
        self._wall = wall_clock(reactor)
        self._log = log
        self._worker = worker
        self._settings = settings
        self._hasher = hasher
        self._registry = registry
        self._login_per_account = login_per_account
        self._writes_per_account = writes_per_account
        self._leader_events = leader_events   # a push.LeaderEvents, or None (no such events)
        # conn -> its bcrypt work in progress. Kept here, not on the connection:
        # one more attribute there costs every connection ~1.5 KiB (its
        # __dict__ stops sharing its keys with the other connections').
        self._hashing = {}
        self._ops = {
            "hello": self.hello,
            "create_account": self.create_account,
            "login": self.login,
            "resume": self.resume,
            "logout": self.logout,
            "list_accounts": self.list_accounts,
            "send_message": self.send_message,
            "read_messages": self.read_messages,
            "mark_read": self.mark_read,
            "history": self.history,
            "delete_messages": self.delete_messages,
            "delete_account": self.delete_account,
            "get_settings": self.get_settings,
            "set_settings": self.set_settings,
        }

    def use_nodes(self, nodes):
        """The cluster's client addresses as ``hello`` lists them, after a reload."""
        self._settings = replace(self._settings, nodes=tuple(nodes))

    def dispatch(self, conn, op, request):
        """Deferred[result dict] for ``request``, or failing with ProtocolError."""
        handler = self._ops.get(op)
        if handler is None:
            raise ProtocolError(UNKNOWN_OP, f"no such op {op!r}"[:200])
        return defer.ensureDeferred(handler(conn, request))

    # Helpers

    def _now(self):
        """The time of day, stored with messages and accounts and compared
        with sessions' expiry by every node."""
        return self._wall.seconds()

    def _session(self, conn):
        session = conn.session
        if session is None:
            raise ProtocolError(NOT_LOGGED_IN, "log in or resume a session first")
        if self._now() >= session.expires:
            self._registry.detach(conn)
            raise ProtocolError(NOT_LOGGED_IN, "the session expired; log in again")
        return session

    def _limit_login(self, conn, username=None):
        if not conn.login_bucket.allow() or (
                username is not None and not self._login_per_account.allow(username)):
            raise ProtocolError(RATE_LIMITED, "too many password attempts; wait a little")

    def _limit_write(self, conn, username):
        if not conn.write_bucket.allow() or not self._writes_per_account.allow(username):
            raise ProtocolError(RATE_LIMITED, "too many writes; slow down")

    async def _submit(self, command):
        try:
            return await self._log.submit(command)
        except Unavailable:
            raise ProtocolError(UNAVAILABLE, "the cluster could not commit this in time; retry") from None

    def _result(self, conn, response, session=None):
        if response.get("ok"):
            return response["result"]
        error = response.get("error") or {}
        code = error.get("code", "internal")
        if code == UNKNOWN_OP:
            # The client port knows the op, so the state does too: it applies it only
            # once every node runs a build that knows it (state/chat.py, apply versions).
            raise ProtocolError(UPGRADE_IN_PROGRESS, "not every node of the cluster runs a build"
                                " that can do this yet; try again once the upgrade is done")
        if code == BAD_SESSION:
            if session is not None and conn.session == session:
                self._registry.detach(conn)
            raise ProtocolError(NOT_LOGGED_IN, "the session ended; log in again")
        raise ProtocolError(code, error.get("message", code))

    def _read(self, conn, fn, *args):
        """Read the state in the turn of the account ``conn`` is logged in as, else of ``conn``.

        Reads take turns (see ``StateWorker``): by account, one user's many
        connections get one turn per round between other users' reads.
        """
        if not conn.connected:
            # Closed while it waited (for the read barrier): its reads were dropped then.
            return defer.fail(defer.CancelledError())
        session = conn.session
        return self._worker.read(conn, conn if session is None else session.username, fn, *args)

    def _with_dedup(self, command, client_msg_id):
        if client_msg_id is not None:
            command["dedup"] = client_msg_id
            # The state keeps the answer for a while after this time.
            command.setdefault("ts", self._now())
        return command

    def _bcrypt(self, conn, d):
        """``d``, a hash or a check, cancelled if ``conn`` closes first: a client
        gone (one that gave up and asks another node) is not hashed for."""
        if not conn.connected:
            d.cancel()
            return d
        self._hashing.setdefault(conn, set()).add(d)

        def done(result):
            hashing = self._hashing.get(conn)
            if hashing is not None:
                hashing.discard(d)
                if not hashing:
                    del self._hashing[conn]
            return result
        return d.addBoth(done)

    def left(self, conn):
        """``conn`` closed: its bcrypt work not done yet is cancelled
        (a hash no one waits for is not worth its 0.3 s of CPU)."""
        for d in self._hashing.pop(conn, ()):
            d.cancel()

    async def _write(self, conn, session, command):
        return self._result(conn, await self._submit(command), session)

    async def _read_barrier(self, conn=None):
        """Wait until local state holds every acknowledged write; re-check the session."""
        try:
            await self._log.read_barrier()
        except Unavailable:
            raise ProtocolError(UNAVAILABLE, "the cluster could not confirm a read in time; retry") from None
        if conn is not None:
            return self._session(conn)

    # Ops without a session

    async def hello(self, conn, request):
        """Who this node is and who leads; ``leader_events`` true or false
        starts or stops the ``leader`` events of this connection (absent or
        null leaves them as they were), and the answer then says which."""
        follow = V.optional_boolean(request, "leader_events")
        leader = self._log.leader_id()
        answer = {
            "node": self._settings.node_id,
            "leader": leader,
            "nodes": [dict(node) for node in self._settings.nodes],
            "protocol": PROTOCOL_VERSION,
        }
        events = self._leader_events
        if follow is not None and events is not None:
            # Noted with the leader answered: an event comes only once it changes.
            if follow and conn.connected:
                events.follow(conn, leader)
            else:
                events.forget(conn)
            answer["leader_events"] = conn in events
        return answer

    async def create_account(self, conn, request):
        username = V.username(request, "username", INVALID_USERNAME)
        password = V.password(request, "password", INVALID_PASSWORD)
        client_msg_id = V.client_msg_id(request)
        self._limit_login(conn)
        await self._read_barrier()
        # Saves a bcrypt round for a name already taken; apply checks again.
        account = await self._read(conn, "account", username)
        if account is not None:
            # A resend of our own create that committed has the same password:
            # propose it again with its key so the state answers the first
            # result. The hash checked here is one of the caller's password,
            # so even if the name is freed meanwhile nothing foreign is stored.
            ours = client_msg_id is not None and await self._bcrypt(
                conn, self._hasher.check(password, account["pw_hash"]))
            if not ours:
                raise ProtocolError(USERNAME_TAKEN, f"{username!r} is taken")
            pw_hash = account["pw_hash"]
        else:
            pw_hash = await self._bcrypt(conn, self._hasher.hash(password))
        command = {"op": "create_account", "username": username, "pw_hash": pw_hash, "ts": self._now()}
        return self._result(conn, await self._submit(self._with_dedup(command, client_msg_id)))

    async def login(self, conn, request):
        username = V.username(request, "username", BAD_CREDENTIALS)
        password = V.password(request, "password", BAD_CREDENTIALS)
        self._limit_login(conn, username)
        await self._read_barrier()
        account = await self._read(conn, "account", username)
        pw_hash = account["pw_hash"] if account else None
        if not await self._bcrypt(conn, self._hasher.check(password, pw_hash)):
            raise ProtocolError(BAD_CREDENTIALS, "wrong username or password")
        token = new_token()
        now = self._now()
        session = Session(username, token_hash(token), now + self._settings.session_ttl)
        result = self._result(conn, await self._submit({
            "op": "login", "username": username, "pw_hash": pw_hash,
            "session": session.session_hash, "ts": now, "expires": session.expires,
        }))
        if conn.connected:
            self._registry.attach(conn, session)
        return {"session": token, "unread": result["unread"]}

    async def resume(self, conn, request):
        token = V.any_string(request, "session")
        self._limit_login(conn)
        if not token or len(token) > V.MAX_SESSION_TOKEN_CHARS or not V.is_text(token):
            raise ProtocolError(BAD_SESSION, "no such session")
        await self._read_barrier()
        session_hash = token_hash(token)
        found = await self._read(conn, "session", session_hash)
        if found is None or found["expires"] <= self._now():
            raise ProtocolError(BAD_SESSION, "no such session, or it ended")
        unread = await self._read(conn, "unread_count", found["username"])
        if conn.connected:
            self._registry.attach(conn, Session(found["username"], session_hash, found["expires"]))
        return {"username": found["username"], "unread": unread}

    # Ops of a logged-in connection

    async def logout(self, conn, request):
        session = self._session(conn)
        client_msg_id = V.client_msg_id(request)
        self._limit_write(conn, session.username)
        conn.ending_session = session.session_hash
        try:
            response = await self._submit(self._with_dedup(
                {"op": "logout", "session": session.session_hash, "username": session.username},
                client_msg_id))
        finally:
            conn.ending_session = None
        error = response.get("error") or {}
        if response.get("ok") or error.get("code") == BAD_SESSION:
            # Ended here or already ended elsewhere: either way it is over.
            if conn.session == session:
                self._registry.detach(conn)
            return {}
        return self._result(conn, response, session)

    async def list_accounts(self, conn, request):
        self._session(conn)
        pattern = V.glob_pattern(request)
        limit = V.limit(request, 100)
        after = V.string(request, "after", "", max_chars=64)
        await self._read_barrier(conn)
        names, more = await self._read(conn, "list_accounts", pattern, limit, after)
        return {"accounts": list(names), "more": bool(more)}

    async def send_message(self, conn, request):
        session = self._session(conn)
        to = V.username(request, "to", NO_SUCH_USER)
        body = V.string(request, "body")
        if len(body) > V.MAX_BODY_CHARS:
            raise ProtocolError(BODY_TOO_LARGE, f"a body holds at most {V.MAX_BODY_CHARS} characters")
        if not body:
            raise V.invalid("'body' must not be empty")
        client_msg_id = V.optional_string(request, "client_msg_id", V.MAX_CLIENT_MSG_ID_CHARS)
        self._limit_write(conn, session.username)
        return await self._write(conn, session, {
            "op": "send_message", "session": session.session_hash, "from": session.username,
            "to": to, "body": body, "ts": self._now(), "client_msg_id": client_msg_id,
        })

    async def read_messages(self, conn, request):
        session = self._session(conn)
        limit = V.limit(request, 10)
        client_msg_id = V.client_msg_id(request)
        self._limit_write(conn, session.username)
        return await self._write(conn, session, self._with_dedup({
            "op": "read_messages", "session": session.session_hash,
            "username": session.username, "limit": limit,
        }, client_msg_id))

    async def mark_read(self, conn, request):
        return await self._ids_write(conn, request, "mark_read")

    async def delete_messages(self, conn, request):
        return await self._ids_write(conn, request, "delete_messages")

    async def _ids_write(self, conn, request, op):
        session = self._session(conn)
        ids = V.message_ids(request)
        client_msg_id = V.client_msg_id(request)
        self._limit_write(conn, session.username)
        return await self._write(conn, session, self._with_dedup({
            "op": op, "session": session.session_hash, "username": session.username, "ids": ids,
        }, client_msg_id))

    async def history(self, conn, request):
        self._session(conn)
        peer = request.get("peer")
        if peer is not None:
            peer = V.string(request, "peer")
            if not V.is_username(peer):
                raise V.invalid("'peer' is not a username")
        before = V.optional_integer(request, "before", 1, V.MAX_MESSAGE_ID)
        limit = V.limit(request, 50)
        session = await self._read_barrier(conn)
        page = await self._read(conn, "history_page", session.username, peer, before, limit)
        answer = {"messages": list(page["messages"]), "more": page["more"]}
        if peer is not None:
            answer["peer_created"] = page["peer_created"]
        return answer

    async def get_settings(self, conn, request):
        self._session(conn)
        session = await self._read_barrier(conn)
        return dict(await self._read(conn, "settings", session.username))

    async def set_settings(self, conn, request):
        session = self._session(conn)
        read_receipts = V.boolean(request, "read_receipts")
        client_msg_id = V.client_msg_id(request)
        self._limit_write(conn, session.username)
        return await self._write(conn, session, self._with_dedup({
            "op": "set_settings", "session": session.session_hash,
            "username": session.username, "read_receipts": read_receipts,
        }, client_msg_id))

    async def delete_account(self, conn, request):
        session = self._session(conn)
        password = V.password(request, "password", BAD_CREDENTIALS)
        client_msg_id = V.client_msg_id(request)
        self._limit_login(conn, session.username)
        session = await self._read_barrier(conn)
        account = await self._read(conn, "account", session.username)
        pw_hash = account["pw_hash"] if account else None
        if account is None and client_msg_id is not None:
            # Perhaps our own delete, resent: the state answers its first
            # result for the key, or fails (the account is gone) changing nothing.
            pw_hash = ""
        elif not await self._bcrypt(conn, self._hasher.check(password, pw_hash)):
            raise ProtocolError(BAD_CREDENTIALS, "wrong password")
        conn.ending_session = session.session_hash
        try:
            response = await self._submit(self._with_dedup({
                "op": "delete_account", "session": session.session_hash,
                "username": session.username, "pw_hash": pw_hash,
            }, client_msg_id))
        finally:
            conn.ending_session = None
        self._result(conn, response, session)
        if conn.session == session:
            self._registry.detach(conn)
        return {}
