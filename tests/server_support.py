"""Test doubles for the client server: an in-memory ChatState and StringTransport clients.

``FakeChatState`` follows the ChatState API of docs/internals.md closely
enough for the server's tests; the integration tests use the real one.
"""

import fnmatch
import itertools
import json

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from paxchat.locallog import LocalLog
from paxchat.server import ChatServerFactory, RateLimit, ServerSettings
from paxchat.server.passwords import InlineBcrypt


def _ok(result):
    return {"ok": True, "result": result}


def _effect(response, ids=None, others=None, senders=None, unread=None):
    """``response`` with the effect ChatState reports beside it (what connections are told of)."""
    effect = {key: value for key, value in (("ids", ids), ("others", others), ("senders", senders))
              if value}
    if effect and unread is not None:
        effect["unread"] = unread
    if effect:
        response["effect"] = effect
    return response


def _err(code, message=""):
    return {"ok": False, "error": {"code": code, "message": message or code}}


class FakeChatState:
    def __init__(self):
        self.index = 0
        self.accounts = {}  # name -> pw_hash
        self.created = {}   # name -> the ts of its create_account
        self.sessions = {}  # hash -> (username, expires)
        self.messages = {}  # id -> dict
        self.unread = {}  # name -> set of ids
        self.sent = {}  # (from, client_msg_id) -> result
        self.next_id = itertools.count(1)
        self.applied = []  # every command, in order

    def applied_index(self):
        return self.index

    def apply_entries(self, entries, grouped=False):
        out = []
        for index, commands in entries:
            if index <= self.index:
                out.append(None)
                continue
            out.append([self._apply(c) for c in commands])
            self.index = index
        return out

    def commit_applied(self):
        pass

    def _apply(self, c):
        self.applied.append(c)
        op = c["op"]
        user = None
        if "session" in c and op != "login":
            found = self.sessions.get(c["session"])
            if op == "send_message" and (c["from"], c.get("client_msg_id")) in self.sent:
                return _ok(self.sent[c["from"], c["client_msg_id"]])
            if found is None:
                return _err("bad_session")
            user = found[0]
        if op == "create_account":
            if c["username"] in self.accounts:
                return _err("username_taken")
            self.accounts[c["username"]] = c["pw_hash"]
            self.created[c["username"]] = c["ts"]
            self.unread[c["username"]] = set()
            return _ok({"username": c["username"]})
        if op == "login":
            if self.accounts.get(c["username"]) != c["pw_hash"]:
                return _err("bad_credentials")
            self.sessions[c["session"]] = (c["username"], c["expires"])
            return _ok({"unread": len(self.unread[c["username"]])})
        if op == "logout":
            del self.sessions[c["session"]]
            return _ok({})
        if op == "send_message":
            if c["to"] not in self.accounts:
                return _err("no_such_user")
            mid = next(self.next_id)
            self.messages[mid] = {"id": mid, "from": c["from"], "to": c["to"], "body": c["body"],
                                  "ts": c["ts"], "read": False}
            self.unread[c["to"]].add(mid)
            result = {"message_id": mid, "ts": c["ts"]}
            if c.get("client_msg_id") is not None:
                self.sent[c["from"], c["client_msg_id"]] = result
            return _ok(result)
        if op == "read_messages":
            ids = sorted(self.unread[user])[:c["limit"]]
            for i in ids:
                self.unread[user].discard(i)
                self.messages[i]["read"] = True
            return _effect(_ok({"messages": [dict(self.messages[i]) for i in ids],
                                "unread": len(self.unread[user])}), ids, senders=self._senders(ids, user))
        if op == "mark_read":
            marked = [i for i in dict.fromkeys(c["ids"]) if i in self.unread[user]]
            for i in marked:
                self.unread[user].discard(i)
                self.messages[i]["read"] = True
            return _effect(_ok({"marked": len(marked)}), marked, senders=self._senders(marked, user))
        if op == "delete_messages":
            gone = [i for i in dict.fromkeys(c["ids"]) if i in self.messages
                    and user in (self.messages[i]["from"], self.messages[i]["to"])]
            others = {}
            for i in gone:
                m = self.messages.pop(i)
                self.unread.get(m["to"], set()).discard(i)
                for party in {m["from"], m["to"]} - {user}:
                    others.setdefault(party, []).append(i)
            return _effect(_ok({"deleted": len(gone)}), gone, others,
                           unread={u: len(self.unread.get(u, ())) for u in [user, *others]})
        if op == "delete_account":
            if self.accounts.get(user) != c["pw_hash"]:
                return _err("bad_credentials")
            del self.accounts[user]
            del self.created[user]
            del self.unread[user]
            self.sessions = {h: s for h, s in self.sessions.items() if s[0] != user}
            others = {}
            for i, m in list(self.messages.items()):
                if m["to"] == user:
                    del self.messages[i]
                    if m["from"] != user:
                        others.setdefault(m["from"], []).append(i)
            return _effect(_ok({}), others=others,
                           unread={u: len(self.unread.get(u, ())) for u in others})
        return _err("unknown_op")

    def _senders(self, ids, reader):
        senders = {}
        for i in ids:
            if self.messages[i]["from"] != reader:
                senders.setdefault(self.messages[i]["from"], []).append(i)
        return senders

    def account(self, username):
        if username not in self.accounts:
            return None
        return {"username": username, "pw_hash": self.accounts[username]}

    def session(self, session_hash):
        found = self.sessions.get(session_hash)
        return None if found is None else {"username": found[0], "expires": found[1]}

    def sessions_of(self, username):
        return [h for h, s in self.sessions.items() if s[0] == username]

    def unread_count(self, username):
        return len(self.unread.get(username, ()))

    def list_accounts(self, pattern="*", limit=100, after=""):
        names = [n for n in sorted(self.accounts) if n > after and fnmatch.fnmatchcase(n, pattern)]
        return names[:limit], len(names) > limit

    def history(self, username, peer=None, before=None, limit=50):
        out = []
        for i in sorted(self.messages, reverse=True):
            m = self.messages[i]
            if username not in (m["from"], m["to"]):
                continue
            if peer is not None and peer not in (m["from"], m["to"]):
                continue
            if before is not None and i >= before:
                continue
            out.append(dict(m))
        return out[:limit]

    def history_page(self, username, peer=None, before=None, limit=50):
        messages = self.history(username, peer, before, limit + 1)
        page = {"messages": messages[:limit], "more": len(messages) > limit}
        if peer is not None:
            page["peer_created"] = self.created.get(peer)
        return page


class SyncWorker:
    """A StateWorker that runs each call at once on the calling thread."""

    def __init__(self, state):
        self.state = state

    def call(self, name, *args):
        return defer.maybeDeferred(getattr(self.state, name), *args)

    def read(self, reader, owner, name, *args):
        return self.call(name, *args)

    def drop_reads(self, owner):
        pass


class HeldWorker(SyncWorker):
    """Holds each call until the test releases it, to keep requests in flight."""

    def __init__(self, state):
        super().__init__(state)
        self.held = []

    def call(self, name, *args):
        return self._hold(name, args)

    def read(self, reader, owner, name, *args):
        return self._hold(name, args, reader, owner)

    def _hold(self, name, args, reader=None, owner=None):
        d = defer.Deferred()
        self.held.append((d, name, args, reader, owner))
        return d

    def drop_reads(self, reader):
        dropped = [h for h in self.held if h[3] is reader]
        self.held = [h for h in self.held if h[3] is not reader]
        for d, *_ in dropped:
            d.errback(defer.CancelledError("the reader left"))

    def release_first(self):
        """Run the call held longest, and answer it."""
        d, name, args, *_ = self.held.pop(0)
        d.callback(getattr(self.state, name)(*args))

    def release_all(self):
        while self.held:
            held, self.held = self.held, []
            for d, name, args, *_ in held:
                d.callback(getattr(self.state, name)(*args))


class HeldBcrypt(InlineBcrypt):
    """A bcrypt backend whose answers wait in ``held`` until the test releases them."""

    def __init__(self):
        self.held = []       # [(Deferred, the inline answer)]
        self.cancelled = 0

    def _hold(self, answer):
        d = defer.Deferred(self._cancelled)
        self.held.append((d, answer))
        return d

    def _cancelled(self, d):
        self.cancelled += 1
        self.held = [h for h in self.held if h[0] is not d]

    def hashpw(self, secret, cost):
        return self._hold(super().hashpw(secret, cost))

    def checkpw(self, secret, hashed):
        return self._hold(super().checkpw(secret, hashed))

    def release_all(self):
        while self.held:
            d, answer = self.held.pop(0)
            answer.chainDeferred(d)


def logged_in(server, name, password="password-1"):
    """A client logged in as ``name`` on a Server whose worker is a HeldWorker."""
    client = server.connect()
    client.send(op="create_account", username=name, password=password)
    server.worker.release_all()
    client.send(op="login", username=name, password=password)
    server.worker.release_all()
    assert all(m["ok"] for m in client.received()), client.inbox
    return client


def test_settings(**overrides):
    values = dict(
        node_id=1, nodes=({"id": 1, "client": "127.0.0.1:7101"}, {"id": 2, "client": "127.0.0.1:7102"}),
        bcrypt_cost=4, session_ttl=3600.0,
        login_per_connection=RateLimit(rate=100.0, burst=1000),
        login_per_account=RateLimit(rate=100.0, burst=1000),
        writes_per_connection=RateLimit(rate=1000.0, burst=10000),
        writes_per_account=RateLimit(rate=1000.0, burst=10000),
    )
    values.update(overrides)
    return ServerSettings(**values)


test_settings.__test__ = False


class Server:
    """A ChatServerFactory over LocalLog and a fake state, on a Clock."""

    def __init__(self, settings=None, worker_class=SyncWorker, state=None, bcrypt=None,
                 log_class=LocalLog):
        self.clock = Clock()
        self.state = state or FakeChatState()
        self.worker = worker_class(self.state)
        self.log = log_class(self.clock, self.worker, node_id=1)
        self.settings = settings or test_settings()
        self.factory = ChatServerFactory(self.clock, self.log, self.worker, self.settings,
                                         bcrypt=bcrypt or InlineBcrypt())

    def connect(self):
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return Client(proto, transport)


class Client:
    def __init__(self, proto, transport):
        self.proto = proto
        self.transport = transport
        self._ids = itertools.count(1)
        self._seen = 0
        self.inbox = []

    def send_line(self, data: bytes):
        self.proto.dataReceived(data)

    def send(self, **request):
        request.setdefault("id", next(self._ids))
        try:
            line = json.dumps(request, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: send them as JSON escapes
            line = json.dumps(request).encode("ascii")
        self.send_line(line + b"\n")
        return request["id"]

    def received(self):
        """Every message written to us so far, decoded (answers and events)."""
        data = self.transport.value()
        lines = data[self._seen:].split(b"\n")
        self._seen = len(data) - len(lines[-1])
        self.inbox.extend(json.loads(line) for line in lines[:-1])
        return self.inbox

    def answer(self, request_id):
        for message in self.received():
            if message.get("id") == request_id and "event" not in message:
                return message
        raise AssertionError(f"no answer to {request_id!r}; got {self.inbox!r}")

    def call(self, op, **args):
        return self.answer(self.send(op=op, **args))

    def ok(self, op, **args):
        answer = self.call(op, **args)
        assert answer["ok"] is True, answer
        return answer["result"]

    def error(self, op, **args):
        answer = self.call(op, **args)
        assert answer["ok"] is False, answer
        return answer["error"]["code"]

    def events(self):
        return [m for m in self.received() if "event" in m]
