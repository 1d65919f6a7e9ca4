"""The chat state machine: deterministic apply of replicated commands over kv.

Every node applies the same commands in the same order and must reach the
same bytes, so apply uses only what the command carries (timestamps,
hashes) and the current state: no clock, no randomness, no dict-order
surprises. A rejected command leaves no trace but still consumes its log
index: each log entry runs in a savepoint inside the batch's transaction,
and an entry one of whose commands fails after writing runs again with a
savepoint per command.

Key layout (every read is one prefix range scan; ``<id>`` is a message id
as 16 lowercase hex digits so key order is id order)::

    #msgid                    last message id given out
    a/<user>                  account: [pw_hash, created_ts]
    n/<user>                  unread count (decimal), absent = 0
    s/<session_hash>          session: [user, expires]
    su/<user>/<session_hash>  sessions of a user
    m/<id>                    message: [from, to, body, ts, read(0/1)]
    h/<user>/<id>             history of a user: messages sent or received
    p/<user>/<peer>/<id>      the same, per peer (history with a peer filter)
    u/<user>/<id>             unread messages addressed to a user
    d/<user>/m/<client_msg>   send dedup: [message_id, ts]
    d/<user>/g/<dedup>        generic dedup: the first response
    x/<ms>/<user>/<m|g>/<key> when a dedup entry was made (ms: 12 hex digits)
    r/<user>                  the account turned read receipts off (absent: on)
    #version                  the cluster's apply version (decimal), absent = 0

Dedup entries are kept for ``DEDUP_WINDOW_SECONDS`` after the write that
made them (by the command's ``ts``): each keyed write removes a few of
those older than its own ``ts`` minus the window, so they cannot pile up.
A command without a ``ts`` makes an entry that is never expired.

Ownership of a message is the presence of its id in the owner's ``h/``
index, not the name inside it: an account that is deleted loses its index,
so a new account with the same name never sees the old one's messages.

A response may carry an ``effect`` beside its result: what the command
changed that the node tells connections of (the messages ``mark_read`` or
``read_messages`` marked read and who sent them, those ``delete_messages``
or ``delete_account`` removed, whose they were and the unread counts
of those accounts after it). It is neither stored
nor answered, so the state's bytes and a resent write's stored answer stay
what they were; a resent write that finds its answer has no effect.

**Apply versions.** Nodes of two builds apply the same log during a
rolling upgrade, so a build that changes what a command does must not do
so until every node runs it: else the nodes' states part for good. Each
build knows apply versions up to ``APPLY_VERSION``. The cluster's apply
version (``#version``) is raised, never lowered, by ``set_apply_version``,
which the leader proposes once every node's build knows the new one
(``paxchat/upgrades.py``). A change to apply raises ``APPLY_VERSION``
and does the new thing only where ``self.version()`` has reached it, so
every node switches at the same log index. A node whose state went past
its build's version (a downgrade after the cluster moved on) stops with
L{NewerThanThisBuild} rather than apply commands it would misread.
"""

import contextlib
import json
import math
import re
import sqlite3
import time

from twisted.logger import Logger

from paxchat.limits import MAX_ANSWER_MESSAGE_BYTES, MAX_BODY_CHARS, USERNAME
from paxchat.state.kv import KVStore

log = Logger()

MAX_MESSAGE_ID = 2 ** 63 - 1
_PAGE = 1000
# After a command fails with a bug, the file is checked for damage; a check
# that found it whole stands this long, so a bug hit over and over does not
# have every node read its whole file each time.
WHOLE_FOR = 60.0
# A resend is recognized this long after the first write (clients resend
# within seconds or minutes: after a failover, or a laptop waking up).
DEDUP_WINDOW_SECONDS = 24 * 3600
# Expired dedup entries one keyed write removes at most: more than it adds.
_EXPIRE_BATCH = 16
_MAX_MS = 16 ** 12 - 1
# An answer that lists messages stops adding them once they weigh
# MAX_ANSWER_MESSAGE_BYTES (paxchat.limits) as the client protocol writes
# them (escaped to ASCII: up to 12 bytes a character): each message counts
# its body so escaped, plus this much for its other fields (ids, names,
# time, flags) at most. Without the bound one read of 1,000 long bodies
# built an answer of ~200 MB on the node. At least one message is always
# listed, so a client paging through them always moves on.
_MESSAGE_FIELDS_BYTES = 160
# The apply versions this build knows (see "Apply versions" above). 1:
# set_apply_version; set_settings (an account's read receipts).
APPLY_VERSION = 1
_MAX_VERSION = 2 ** 31 - 1


def valid_username(name):
    return isinstance(name, str) and USERNAME.fullmatch(name) is not None


def ok(result):
    return {"ok": True, "result": result}


def error(code, message):
    return {"ok": False, "error": {"code": code, "message": message}}


class NewerThanThisBuild(RuntimeError):
    """The cluster's apply version is past this build's: stop rather than misapply.

    Raised out of apply, never turned into an answer: the batch rolls back
    and the node stops, to start again with a build that knows the version.
    """

    def __init__(self, version):
        super().__init__(
            f"the cluster's apply version is {version} and this build knows versions up to"
            f" {APPLY_VERSION}: a node of the cluster ran a newer build; start this node with"
            " a build at least as new (docs/deploy.md, Upgrading)")
        self.version = version


class Rejected(Exception):
    """A command that fails with a protocol error; its writes are rolled back."""

    def __init__(self, code, message):
        super().__init__(code, message)
        self.code = code
        self.message = message


_json_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_json_decode = json.JSONDecoder().decode


def _decode(raw):
    # Stored values and commands are UTF-8 JSON (objects or arrays): decoding
    # them here skips json.loads' guessing of the encoding of bytes.
    return _json_decode(raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw)


def _encode(value):
    return _json_encode(value).encode("utf-8")


_ascii_json = json.JSONEncoder().encode


def _answer_bytes(body):
    """What a message of ``body`` weighs in an answer (deterministic: part of applying)."""
    return len(_ascii_json(body)) + _MESSAGE_FIELDS_BYTES


def _mid(message_id):
    return "%016x" % message_id


def sqlite_glob(pattern):
    """A glob where only ``*`` and ``?`` are special, as SQLite's ``GLOB`` reads it.

    SQLite also reads ``[...]`` as a set; ``[[]`` is a set holding only
    ``[``. (Names cannot hold ``[``, and the server refuses patterns with
    it, but the state answers any pattern literally.) SQLite matches a star
    without trying every split of what follows when the rest cannot match,
    so ``*a*a*a*a*a*a*a*a*b`` against 32 ``a`` answers at once.
    """
    return pattern.replace("[", "[[]")


def glob_literal_prefix(pattern):
    """The part of a glob before its first wildcard: every match starts with it."""
    match = re.match(r"[^*?]*", pattern)
    return match.group(0)


# -- command validation ------------------------------------------------------

def _is_text(v):
    if not isinstance(v, str):
        return False
    if v.isascii():
        return True
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _is_count(v):
    return _is_int(v) and v >= 0


def _is_ids(v):
    return isinstance(v, list) and all(_is_int(i) for i in v)


def _is_opt_text(v):
    return v is None or _is_text(v)


def _is_bool(v):
    return isinstance(v, bool)


_TYPE_NAMES = {
    _is_text: "a string", _is_number: "a number", _is_count: "a non-negative integer",
    _is_ids: "a list of integers", _is_opt_text: "a string or null", _is_bool: "true or false",
}

# op -> {field: check}; fields listed with a default may be omitted.
COMMANDS = {
    "create_account": {"username": _is_text, "pw_hash": _is_text, "ts": _is_number},
    "login": {"username": _is_text, "pw_hash": _is_text, "session": _is_text,
              "ts": _is_number, "expires": _is_number},
    "logout": {"session": _is_text, "username": _is_opt_text},
    "send_message": {"session": _is_text, "from": _is_text, "to": _is_text,
                     "body": _is_text, "ts": _is_number, "client_msg_id": _is_opt_text},
    "read_messages": {"session": _is_text, "username": _is_text, "limit": _is_count},
    "mark_read": {"session": _is_text, "username": _is_text, "ids": _is_ids},
    "delete_messages": {"session": _is_text, "username": _is_text, "ids": _is_ids},
    "delete_account": {"session": _is_text, "username": _is_text, "pw_hash": _is_text},
    "set_settings": {"session": _is_text, "username": _is_text, "read_receipts": _is_bool},
    # Proposed by a leader, never by a client (the client port has no such op).
    "set_apply_version": {"version": _is_count},
}
# Ops added after version 0, and the cluster's apply version they need: below
# it they answer as a build without them does.
_SINCE = {"set_settings": 1}
_OPTIONAL = {("logout", "username"), ("send_message", "client_msg_id")}


def validate(command, version=lambda: APPLY_VERSION):
    """Raise L{Rejected} unless ``command`` is well-formed; returns its op.

    ``version()``: the cluster's apply version; an op that needs a later one
    is unknown, as to a build without it."""
    if not isinstance(command, dict):
        raise Rejected("invalid_request", "a command must be an object")
    op = command.get("op")
    if not isinstance(op, str):
        raise Rejected("invalid_request", "missing or mistyped field 'op'")
    fields = COMMANDS.get(op)
    if fields is None or (op in _SINCE and _SINCE[op] > version()):
        raise Rejected("unknown_op", f"no such op: {op[:64]!r}")
    for name, check in fields.items():
        if name not in command:
            if (op, name) in _OPTIONAL:
                continue
            raise Rejected("invalid_request", f"{op}: missing field '{name}'")
        if not check(command[name]):
            raise Rejected("invalid_request", f"{op}: field '{name}' must be {_TYPE_NAMES[check]}")
    if "dedup" in command and not _is_text(command["dedup"]):
        raise Rejected("invalid_request", f"{op}: field 'dedup' must be a string")
    return op


class _WroteThenFailed(Exception):
    """A command failed after writing, outside a savepoint of its own: undo its entry."""


_NO_SAVEPOINT = contextlib.nullcontext()


class ChatState:
    """Accounts, sessions and messages, changed only by replicated commands.

    Not thread-safe: use it from one thread (the StateWorker's).
    """

    def __init__(self, kv, clock=time.monotonic):
        self.kv = kv
        self._clock = clock
        self._whole_at = None        # when a check last found the file whole
        # Read by every write: the writer's session, the recipient's account, the id counter.
        kv.cache_keys(("s/", "a/", "#msgid", "#version"))
        self._handlers = {op: getattr(self, "_op_" + op) for op in COMMANDS}
        self._effect = None          # set by a handler: see "effect" above

    @classmethod
    def open(cls, path, check=False, durable=True):
        """Open (or create) the state database at ``path``; see L{KVStore.open}."""
        return cls(KVStore.open(path, check=check, durable=durable))

    def sync(self):
        """Make everything applied so far durable (before the log is compacted past it).

        Returns the applied index that is now durable.
        """
        self.kv.sync()
        return self.kv.applied_index()

    def close(self):
        self.kv.close()

    def applied_index(self):
        return self.kv.applied_index()

    def version(self):
        """The cluster's apply version as this state has it (0 before any was agreed)."""
        raw = self.kv.get("#version")
        return 0 if raw is None else int(raw)

    def check_version(self):
        """Raise L{NewerThanThisBuild} if this build cannot apply to this state."""
        version = self.version()
        if version > APPLY_VERSION:
            raise NewerThanThisBuild(version)

    # -- applying --------------------------------------------------------

    def apply_entries(self, entries, grouped=False):
        """Apply ``[(index, [command, ...]), ...]`` in one transaction.

        A command is a dict, or its JSON encoding as bytes (as the log
        carries it). Returns one list of responses per entry, or None for an
        entry whose index is not above the applied index (already applied:
        skipped).
        A SQLite failure rolls the whole batch back and raises L{StoreError}.
        ``grouped``: the batch joins the store's group transaction
        (L{KVStore.group}; see ``commit_applied``), for a state fed from a
        durable log: a failure then rolls back the whole group, back to
        the last commit, and the caller must stop and replay from its log.
        """
        kv = self.kv
        results = []
        try:
            with (kv.group(len(entries)) if grouped else kv.transaction()):
                self.check_version()        # a snapshot of a newer cluster may have come
                applied = start = kv.applied_index()
                for index, commands in entries:
                    if index <= applied:
                        results.append(None)
                        continue
                    results.append(self._apply_entry(commands))
                    applied = index
                if applied != start:
                    kv.set_applied_index(applied)
        except sqlite3.Error as e:
            raise kv.error(e) from e
        return results

    def commit_applied(self):
        """Commit what grouped applies left open (the log is idle, or about to stop)."""
        try:
            self.kv.commit_group()
        except sqlite3.Error as e:
            raise self.kv.error(e) from e

    def apply(self, command):
        """Apply one command as the next log index; returns its response."""
        return self.apply_entries([(self.applied_index() + 1, [command])])[0][0]

    def _apply_entry(self, commands):
        """Apply one log entry's commands: one savepoint for all of them.

        A command that fails must leave no trace. Most fail before they
        write (a bad session, an unknown recipient), so the entry runs in
        one savepoint and a failure costs nothing to undo. Only when a
        command fails after writing is the entry undone and applied again
        with a savepoint per command. A savepoint per command, always,
        cost a fifth of a ``send_message``'s apply: SQLite copies every page
        a savepoint changes first, and consecutive commands change the same
        pages (counters, the newest ids' index pages).
        """
        try:
            with self.kv.savepoint():
                return [self._apply_one(command, savepoint=False) for command in commands]
        except _WroteThenFailed:
            return [self._apply_one(command) for command in commands]

    def _apply_one(self, command, savepoint=True):
        self._effect = None
        if isinstance(command, (bytes, bytearray)):
            try:
                command = _decode(command)
            except (ValueError, RecursionError):
                return error("invalid_request", "a command must be a JSON object")
        kv = self.kv
        writes = kv.writes
        try:
            with kv.savepoint() if savepoint else _NO_SAVEPOINT:
                response = ok(self._dispatch(command))
            if self._effect is not None:
                response["effect"] = self._effect
            return response
        except (sqlite3.Error, NewerThanThisBuild):
            raise
        except Exception as e:
            if not savepoint and kv.writes != writes:
                raise _WroteThenFailed() from e
            if isinstance(e, Rejected):
                return error(e.code, e.message)
            op = command.get("op") if isinstance(command, dict) else None
            log.failure("applying a {op!r} command failed", op=op)
            # A bug, but a deterministic one: every node answers the same.
            # Unless this node's file is damaged: then it alone fails, and
            # going on would have it drift from the others, so it stops.
            self._check_whole()
            return error("internal", "internal error while applying the command")

    def _check_whole(self):
        """Raise L{CorruptStore} if the file is damaged; a check that found it whole
        stands for L{WHOLE_FOR} seconds (it reads the whole file)."""
        now = self._clock()
        if self._whole_at is not None and now - self._whole_at < WHOLE_FOR:
            return
        self.kv.check()
        self._whole_at = now

    def _dispatch(self, command):
        op = validate(command, self.version)
        dedup = command.get("dedup")
        dedup_key = None
        if dedup is not None:
            owner = command.get("username") or command.get("from")
            if owner is None:
                owner = self._session_record(command["session"])[0]
            if valid_username(owner):
                dedup_key = f"d/{owner}/g/{dedup}"
                stored = self.kv.get(dedup_key)
                if stored is not None:
                    first = _decode(stored)
                    # Entries written before the op was kept have none.
                    if first.get("op", op) != op:
                        raise Rejected("invalid_request",
                                       f"this client_msg_id was used by a {first['op']} write:"
                                       " use a fresh one for each write")
                    return first["result"]
        result = self._handlers[op](command)
        if dedup_key is not None:
            self._remember(dedup_key, _encode({"op": op, "result": result}), command.get("ts"))
        return result

    def _remember(self, dedup_key, value, ts, rows=()):
        """Store a dedup entry (with ``rows`` of the command, in one statement),
        and expire some entries older than the window before ``ts``."""
        kv = self.kv
        rows = [*rows, (dedup_key, value)]
        if not _is_number(ts):
            kv.put_many(rows)
            return
        ms = min(max(int(ts * 1000), 0), _MAX_MS)
        rows.append((f"x/{ms:012x}/{dedup_key[2:]}", b""))
        kv.put_many(rows)
        cutoff = ms - DEDUP_WINDOW_SECONDS * 1000
        if cutoff <= 0:
            return
        for key, _ in kv.scan("x/", before=f"x/{cutoff:012x}", limit=_EXPIRE_BATCH):
            kv.delete("d/" + key[15:])
            kv.delete(key)

    # -- helpers ---------------------------------------------------------

    def _account_record(self, username):
        if not valid_username(username):
            return None
        raw = self.kv.get("a/" + username)
        return None if raw is None else _decode(raw)

    def _has_account(self, username):
        return valid_username(username) and self.kv.get("a/" + username) is not None

    def _session_record(self, session_hash):
        raw = self.kv.get("s/" + session_hash)
        if raw is None:
            raise Rejected("bad_session", "the session has ended")
        return _decode(raw)

    def _check_session(self, command, user_field):
        user, _expires = self._session_record(command["session"])
        claimed = command.get(user_field)
        if claimed is not None and claimed != user:
            raise Rejected("bad_session", "the session belongs to another account")
        return user

    def _add_unread(self, username, delta):
        if delta == 0:
            return
        key = "n/" + username
        if delta > 0:
            self.kv.add_count(key, delta)       # one statement; never reaches 0
            return
        raw = self.kv.get(key)
        count = (int(raw) if raw is not None else 0) + delta
        if count:
            self.kv.put(key, str(count).encode())
        else:
            self.kv.delete(key)

    def _next_message_id(self):
        """The id the next message gets; the caller stores it back under ``#msgid``
        with the message's rows, in one statement."""
        raw = self.kv.get("#msgid")
        return (int(raw) if raw is not None else 0) + 1

    def _message_record(self, message_id):
        raw = self.kv.get("m/" + _mid(message_id))
        return None if raw is None else _decode(raw)

    @staticmethod
    def _message(message_id, record):
        sender, recipient, body, ts, read = record
        return {"id": message_id, "from": sender, "to": recipient, "body": body,
                "ts": ts, "read": bool(read)}

    def _mark_read(self, message_id, record=None):
        key = "m/" + _mid(message_id)
        if record is None:
            record = _decode(self.kv.get(key))
        record[4] = 1
        self.kv.put(key, _encode(record))
        return record

    def _unlink(self, message_id, record):
        """Remove a message and every index entry that points at it.

        Returns the accounts that held it (a deleted account's namesake does not).
        """
        sender, recipient, _body, _ts, read = record
        mid = _mid(message_id)
        kv = self.kv
        kv.delete("m/" + mid)
        holders = []
        for user, peer in ((sender, recipient), (recipient, sender)):
            if kv.delete(f"h/{user}/{mid}"):
                holders.append(user)
            kv.delete(f"p/{user}/{peer}/{mid}")
        if not read and kv.delete(f"u/{recipient}/{mid}"):
            self._add_unread(recipient, -1)
        return holders

    def _unlink_noting(self, user, message_id, record, others):
        """``_unlink`` for ``user``, noting the message under each other account that held it."""
        for holder in self._unlink(message_id, record):
            if holder != user:
                others.setdefault(holder, []).append(message_id)

    def _unread_of(self, users):
        """Each account's unread count now: a ``deleted`` event carries it, as a
        client holding only the newest messages cannot tell whether the
        ones it never loaded were unread."""
        return {user: self.unread_count(user) for user in users}

    @staticmethod
    def _unique_ids(ids):
        seen = set()
        for i in ids:
            if 0 < i <= MAX_MESSAGE_ID and i not in seen:
                seen.add(i)
                yield i

    # -- commands --------------------------------------------------------

    def _op_create_account(self, c):
        username = c["username"]
        if not valid_username(username):
            raise Rejected("invalid_username",
                           "usernames are 1 to 32 characters of A-Z a-z 0-9 _ . -")
        if self.kv.get("a/" + username) is not None:
            raise Rejected("username_taken", f"the name {username} is taken")
        self.kv.put("a/" + username, _encode([c["pw_hash"], c["ts"]]))
        return {"username": username}

    def _op_login(self, c):
        username, session = c["username"], c["session"]
        account = self._account_record(username)
        if account is None or account[0] != c["pw_hash"]:
            raise Rejected("bad_credentials", "wrong username or password")
        kv = self.kv
        # Sessions expired by this login's clock go: bounded per account.
        for key, _ in kv.scan(f"su/{username}/"):
            other = key[len(f"su/{username}/"):]
            raw = kv.get("s/" + other)
            if raw is None or _decode(raw)[1] <= c["ts"]:
                kv.delete("s/" + other)
                kv.delete(key)
        raw = kv.get("s/" + session)
        if raw is not None:
            kv.delete(f"su/{_decode(raw)[0]}/{session}")
        kv.put("s/" + session, _encode([username, c["expires"]]))
        kv.put(f"su/{username}/{session}", b"")
        return {"unread": self.unread_count(username)}

    def _op_logout(self, c):
        user = self._check_session(c, "username")
        self.kv.delete("s/" + c["session"])
        self.kv.delete(f"su/{user}/{c['session']}")
        return {}

    def _op_send_message(self, c):
        sender, recipient, body, ts = c["from"], c["to"], c["body"], c["ts"]
        cmid = c.get("client_msg_id")
        kv = self.kv
        dedup_key = f"d/{sender}/m/{cmid}" if cmid is not None and valid_username(sender) else None
        if dedup_key is not None:
            stored = kv.get(dedup_key)
            if stored is not None:
                message_id, first_ts = _decode(stored)
                return {"message_id": message_id, "ts": first_ts}
        self._check_session(c, "from")
        if not self._has_account(recipient):
            raise Rejected("no_such_user", f"no account named {recipient[:64]}")
        if not body:
            raise Rejected("invalid_request", "send_message: empty body")
        if len(body) > MAX_BODY_CHARS:
            raise Rejected("body_too_large", f"bodies are at most {MAX_BODY_CHARS} characters")
        message_id = self._next_message_id()
        mid = _mid(message_id)
        rows = [("#msgid", str(message_id).encode()),
                ("m/" + mid, _encode([sender, recipient, body, ts, 0])),
                (f"h/{sender}/{mid}", b""), (f"p/{sender}/{recipient}/{mid}", b""),
                (f"u/{recipient}/{mid}", b"")]
        if recipient != sender:
            rows += [(f"h/{recipient}/{mid}", b""), (f"p/{recipient}/{sender}/{mid}", b"")]
        if dedup_key is not None:
            self._remember(dedup_key, _encode([message_id, ts]), ts, rows)
        else:
            kv.put_many(rows)
        self._add_unread(recipient, 1)
        return {"message_id": message_id, "ts": ts}

    def _op_read_messages(self, c):
        user = self._check_session(c, "username")
        prefix = f"u/{user}/"
        rows = self.kv.scan(prefix, limit=c["limit"]) if c["limit"] else []
        messages, read = [], []
        weight = 0
        for key, _ in rows:
            message_id = int(key[len(prefix):], 16)
            record = self._message_record(message_id)
            weight += _answer_bytes(record[2])
            if messages and weight > MAX_ANSWER_MESSAGE_BYTES:
                break               # left unread: ``unread`` says so
            self._mark_read(message_id, record)
            self.kv.delete(key)
            messages.append(self._message(message_id, record))
            read.append((message_id, record[0]))
        self._add_unread(user, -len(messages))
        self._read_effect(user, read)
        return {"messages": messages, "unread": self.unread_count(user)}

    def _op_mark_read(self, c):
        user = self._check_session(c, "username")
        marked = []
        for message_id in self._unique_ids(c["ids"]):
            if self.kv.delete(f"u/{user}/{_mid(message_id)}"):
                marked.append((message_id, self._mark_read(message_id)[0]))
        self._add_unread(user, -len(marked))
        self._read_effect(user, marked)
        return {"marked": len(marked)}

    def _read_effect(self, user, read):
        """``read``: ``(message_id, sender)`` of what ``user`` just read. Its
        other sessions are told the ids, and each sender that still holds
        the message, which of its messages were read, if both have read
        receipts on."""
        if not read:
            return
        senders = {}
        receipts = self._receipts()
        if receipts(user):
            for message_id, sender in read:
                if sender == user or self.kv.get(f"h/{sender}/{_mid(message_id)}") is None:
                    continue
                if receipts(sender):
                    senders.setdefault(sender, []).append(message_id)
        self._effect = {"ids": [message_id for message_id, _ in read], "senders": senders}

    def _sends_receipts(self, user):
        """Whether ``user`` has read receipts on: its reads are told to their senders, and
        it is told of its messages read (both parties must have them on)."""
        return self.kv.get("r/" + user) is None

    def _receipts(self):
        """L{_sends_receipts}, reading each account once: for one command or one page."""
        known = {}

        def receipts(user):
            if user not in known:
                known[user] = self._sends_receipts(user)
            return known[user]
        return receipts

    def _op_delete_messages(self, c):
        user = self._check_session(c, "username")
        deleted, others = [], {}
        for message_id in self._unique_ids(c["ids"]):
            if self.kv.get(f"h/{user}/{_mid(message_id)}") is None:
                continue
            record = self._message_record(message_id)
            if record is not None:
                self._unlink_noting(user, message_id, record, others)
                deleted.append(message_id)
        if deleted:
            # The other party of each message loses it too.
            self._effect = {"ids": deleted, "others": others, "unread": self._unread_of([user, *others])}
        return {"deleted": len(deleted)}

    def _op_delete_account(self, c):
        user = self._check_session(c, "username")
        account = self._account_record(user)
        if account is None or account[0] != c["pw_hash"]:
            raise Rejected("bad_credentials", "wrong password")
        kv = self.kv
        prefix = f"h/{user}/"
        after = None
        others = {}
        while True:
            rows = kv.scan(prefix, after=after, limit=_PAGE)
            if not rows:
                break
            after = rows[-1][0]
            for key, _ in rows:
                message_id = int(key[len(prefix):], 16)
                record = self._message_record(message_id)
                if record is not None and record[1] == user:
                    self._unlink_noting(user, message_id, record, others)
        for key, _ in kv.scan(f"su/{user}/"):
            kv.delete("s/" + key[len(f"su/{user}/"):])
        for p in (prefix, f"p/{user}/", f"u/{user}/", f"d/{user}/", f"su/{user}/"):
            kv.delete_prefix(p)
        kv.delete("a/" + user)
        kv.delete("n/" + user)
        kv.delete("r/" + user)
        if others:
            # Its senders lose what they sent it.
            self._effect = {"others": others, "unread": self._unread_of(others)}
        return {}

    def _op_set_settings(self, c):
        user = self._check_session(c, "username")
        if c["read_receipts"]:
            self.kv.delete("r/" + user)
        else:
            self.kv.put("r/" + user, b"")
        return self.settings(user)

    def _op_set_apply_version(self, c):
        """Raise the cluster's apply version (a leader proposes it once every node's build
        knows ``version``); a lower one changes nothing."""
        if c["version"] > _MAX_VERSION:
            raise Rejected("invalid_request", f"set_apply_version: at most {_MAX_VERSION}")
        version = self.version()
        if c["version"] > version:
            version = c["version"]
            self.kv.put("#version", str(version).encode("ascii"))
        if version > APPLY_VERSION:
            raise NewerThanThisBuild(version)
        return {"version": version}

    # -- reads -----------------------------------------------------------

    def account(self, username):
        """``{"username", "pw_hash", "created"}`` or None."""
        record = self._account_record(username)
        if record is None:
            return None
        return {"username": username, "pw_hash": record[0], "created": record[1]}

    def session(self, session_hash):
        """``{"username", "expires"}`` or None. Expiry is the caller's to check."""
        if not _is_text(session_hash):
            return None
        raw = self.kv.get("s/" + session_hash)
        if raw is None:
            return None
        username, expires = _decode(raw)
        return {"username": username, "expires": expires}

    def sessions_of(self, username):
        if not valid_username(username):
            return []
        prefix = f"su/{username}/"
        return [key[len(prefix):] for key, _ in self.kv.scan(prefix)]

    def unread_count(self, username):
        if not valid_username(username):
            return 0
        raw = self.kv.get("n/" + username)
        return int(raw) if raw is not None else 0

    def message(self, message_id):
        """One message as a protocol dict, or None."""
        if not _is_int(message_id) or not 0 < message_id <= MAX_MESSAGE_ID:
            return None
        record = self._message_record(message_id)
        return None if record is None else self._message(message_id, record)

    def list_accounts(self, pattern="*", limit=100, after=""):
        """``(names, more)``: sorted names matching the glob, after ``after``."""
        keys = self.kv.scan_keys_glob("a/" + glob_literal_prefix(pattern), "a/" + sqlite_glob(pattern),
                                      after=("a/" + after) if after else None, limit=limit + 1)
        return [key[2:] for key in keys[:limit]], len(keys) > limit

    def settings(self, username):
        """``{"read_receipts": bool}``: an account's settings (the defaults for no account)."""
        return {"read_receipts": not valid_username(username) or self._sends_receipts(username)}

    def history(self, username, peer=None, before=None, limit=50):
        """Messages ``username`` sent or received, newest first (see L{history_page})."""
        return self.history_page(username, peer, before, limit)["messages"]

    def history_page(self, username, peer=None, before=None, limit=50):
        """``{"messages", "more"}``: up to ``limit`` messages ``username`` sent
        or received, newest first, and whether older ones are left.

        ``peer`` keeps only those exchanged with that name, and adds
        ``peer_created``: when the account now of that name was created (None
        if there is none), read with the page, so that messages with an
        earlier account of the name can be told apart. ``before`` keeps
        ids below it. A page also ends early once its messages weigh
        ``MAX_ANSWER_MESSAGE_BYTES``. A message ``username`` sent to another
        shows ``read`` only while both have read receipts on.
        """
        page = self._history_page(username, peer, before, limit)
        if peer is not None:
            account = self._account_record(peer)
            page["peer_created"] = None if account is None else account[1]
        return page

    def _history_page(self, username, peer, before, limit):
        done = {"messages": [], "more": False}
        if not valid_username(username) or (peer is not None and not valid_username(peer)):
            return done
        prefix = f"h/{username}/" if peer is None else f"p/{username}/{peer}/"
        bound = None
        if before is not None:
            if before <= 1:
                return done
            bound = prefix + _mid(min(before, MAX_MESSAGE_ID + 1))
        messages = []
        weight = 0
        receipts = self._receipts()
        rows = self.kv.scan(prefix, before=bound, limit=limit + 1, reverse=True)
        for key, _ in rows[:limit]:
            message_id = int(key[len(prefix):], 16)
            record = self._message_record(message_id)
            if record is None:
                continue
            weight += _answer_bytes(record[2])
            if messages and weight > MAX_ANSWER_MESSAGE_BYTES:
                return {"messages": messages, "more": True}
            message = self._message(message_id, record)
            if message["read"] and record[0] == username != record[1]:
                message["read"] = receipts(username) and receipts(record[1])
            messages.append(message)
        return {"messages": messages, "more": len(rows) > limit}

    # -- whole-state operations -----------------------------------------

    def dump(self):
        """``(applied_index, [(key, value), ...])`` for comparing replicas."""
        return self.kv.dump()

    def digest(self):
        """A hash of the applied index and the whole state."""
        return self.kv.digest()

    def snapshot(self):
        """``(applied_index, iterator of bytes chunks)``; see L{KVStore.snapshot}."""
        return self.kv.snapshot()

    def snapshot_bytes(self):
        """About what a snapshot of the state weighs now; see L{KVStore.snapshot_bytes}."""
        return self.kv.snapshot_bytes()

    def restore(self, applied_index, chunks):
        """Replace the whole state by a snapshot, atomically."""
        self.kv.restore(applied_index, chunks)

    def receive_snapshot_part(self, offset, data):
        """Store a part of a snapshot being received; see L{KVStore.receive_snapshot_part}."""
        self.kv.receive_snapshot_part(offset, data)

    def restore_received(self, applied_index):
        """Replace the whole state by the snapshot received, atomically."""
        self.kv.restore_received(applied_index)
