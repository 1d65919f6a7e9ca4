"""``PaxchatClient``: the paxchat protocol as Deferred-returning methods, with failover.

One object stands for "my connection to the cluster", not to one node. It
knows every node; when its connection drops (a node crashed, a network cut,
a node gone silent) it connects to another node, re-attaches its session
with ``resume`` and sends again every request that had no answer yet. Every
write carries a ``client_msg_id`` that stays the same across retries, so the
server applies it once however often it is sent and answers a resend as it
answered the first (a retried ``read_messages`` gets the messages the lost
answer held); ``unavailable`` answers
(no quorum in time) are retried the same way for a bounded time, on another
node: the one that answered may be cut off from the majority, and its
clients would wait there for as long as the cut lasts. Callers see
one answer per call, or ``ServerError`` / ``Unreachable`` (``NoMajority``
when nodes answered but none could confirm with a majority: a node
answering ``unavailable`` to ``resume`` is passed over like one that is
down, and the status says why). A node that is
stopping says so (``node_stopping``): the client leaves it at once, trying
it last, as it would after a drop. A node whose certificate TLS refuses
is passed over like one that is down; when a whole round over the nodes
finds only such nodes (and ones not accepting a connection), calls fail
at once with ``UntrustedNodes``, naming them and the CA file, since a
wrong ca.pem does not mend by waiting. A round in which no node accepts
a connection at all is said once (``Status.not_accepted``) while the
client waits on. A request too large for the server's
line limit fails at once with ``RequestTooLarge`` and is never sent (the
server would close the connection, and a resend would fail the same way).
With a ``call_timeout`` in the policy, a call that has no final answer that
long after it was made fails, however its retries stand: with the last
``unavailable`` answer, ``Unreachable`` if no node was reached, else
``TimedOut``.
"""

from __future__ import annotations

import random as _random
import uuid
from dataclasses import dataclass, field
from typing import Callable, Sequence

from twisted.internet import defer
from twisted.internet import error as net_error
from twisted.logger import Logger
from twisted.python.failure import Failure

from paxchat.tls import CertificateFilesError

from .connection import ChatClientFactory, check_size, encode_request
from .errors import (
    CertificateRefused, ClientError, ClosedUnanswered, ConnectionDropped, NoMajority, RequestTooLarge,
    ServerError, TimedOut, Unreachable, UntrustedNodes,
)
from .failover import ANSWERED, NOT_ACCEPTED, UNTRUSTED, Attempt, FailoverPolicy, Rotation
from .targets import NodeTarget, targets_from_addresses, targets_from_config

__all__ = ["PaxchatClient", "Status", "RETRY_ON_UNAVAILABLE", "WRITE_OPS"]

# Writes: each call gets one client_msg_id, kept across every resend, so a
# write that committed but whose answer was lost is not applied twice.
WRITE_OPS = frozenset({
    "create_account", "logout", "send_message", "read_messages", "mark_read",
    "delete_messages", "delete_account", "set_settings",
})

# Ops that change nothing a user would ask about: a call of one that times
# out is not said to have perhaps been made (a login's session aside, which
# the next login replaces).
ASKS_ONLY = frozenset({"hello", "login", "resume", "list_accounts", "history", "get_settings"})

# Ops whose `unavailable` answer is retried automatically: every op, since
# reads are harmless to repeat and writes carry their client_msg_id (a late
# commit of the first try answers the retry with the first result).
RETRY_ON_UNAVAILABLE = WRITE_OPS | ASKS_ONLY


@dataclass(frozen=True)
class Status:
    """Where the client stands: ``state`` is connecting, connected, reconnecting, failed or closed.

    ``no_majority``: nodes answer, but none could confirm anything with a
    majority (while reconnecting, and when it fails so).
    ``not_accepted``: a whole round over the nodes found none accepting a
    connection (a stopped cluster, or one restarting); (address, why) for
    each node, said once per campaign, with ``retry_for``, the seconds
    the client goes on trying before it gives up.
    ``error``: with ``failed``, what the calls waiting on a node fail
    with (an ``Unreachable``), for a sentence that says why.
    """

    state: str
    node: int | None = None
    leader: int | None = None
    detail: str = ""
    no_majority: bool = False
    not_accepted: tuple = ()
    retry_for: float | None = None
    error: Exception | None = field(default=None, compare=False)


class _Request:
    """One call the user is waiting on, kept until it has a final answer."""

    __slots__ = ("op", "args", "deferred", "sent_on", "sends", "retry_until", "watchdog", "waiting",
                 "deadline", "last_error")

    def __init__(self, op, args, deferred):
        self.op = op
        self.args = args
        self.deferred = deferred
        self.sent_on = None      # the ChatClient it is in flight on, if any
        self.sends = 0
        self.retry_until = None  # deadline for `unavailable` retries
        self.watchdog = None     # fires if the node stays silent
        self.waiting = None      # a pending `unavailable` retry
        self.deadline = None     # fails the call after the policy's call_timeout
        self.last_error = None   # the last `unavailable` answer, said if the deadline passes


class PaxchatClient:
    """A cluster connection with failover. Every op method returns a Deferred.

    ``targets`` are ``NodeTarget``s (see ``from_config`` / ``from_addresses``)
    or plain client endpoints, numbered from 1.

    ``on_event(event)`` gets pushed events (``message``, ``sent``, ``read``,
    ``deleted``, ``session_ended``, ``node_stopping``, ``leader``); ``on_status(Status)`` hears about
    connecting/connected/reconnecting/failed (a ``reconnecting`` whose
    ``detail`` names the node when it left one that is stopping), and a
    ``connected`` one again whenever its node names another leader.

    Every connection's ``hello`` asks for ``leader`` events; a node that
    pushes them says so (``leader_pushed``), and needs no more ``hello``
    to keep ``leader`` right. A node of an earlier build ignores the ask.
    """

    log = Logger()

    def __init__(self, reactor, targets: Sequence, *,
                 on_event: Callable[[dict], None] | None = None,
                 on_status: Callable[[Status], None] | None = None,
                 policy: FailoverPolicy | None = None,
                 prefer_node: int | None = None,
                 random: Callable[[], float] = _random.random):
        if not targets:
            raise ValueError("a PaxchatClient needs at least one node")
        self.reactor = reactor
        # Plain endpoints are numbered from 1 in the order given.
        targets = [t if isinstance(t, NodeTarget) else NodeTarget(i, t, repr(t)) for i, t in enumerate(targets, 1)]
        self.targets = {t.node_id: t for t in targets}
        self.on_event = on_event
        self.on_status = on_status
        self.policy = policy or FailoverPolicy()
        self.prefer_node = prefer_node
        self._random = random
        self.username: str | None = None
        self.session: str | None = None
        self.node: int | None = None
        self.leader: int | None = None
        self.status = Status("idle")
        self._proto = None
        self._proto_node = None
        self._ready = False
        self._rotation: Rotation | None = None
        self._attempt_call = None
        self._handshake_watchdog = None
        self._outstanding: list[_Request] = []
        self._connect_waiters: list[defer.Deferred] = []
        self._closed = False
        self._close_waiters: list[defer.Deferred] = []
        self._hello: dict | None = None
        self._leader_pushed = False  # the node we are connected to pushes leader changes
        self._ever_connected = False
        self._leaving = ""  # why the client left its node on purpose, for the next status
        self._no_majority = False  # a node of the current rotation answered, without a majority
        self._closed_unanswered = False  # a node of the current rotation closed without a word
        self._untrusted: dict[int, tuple] = {}  # nodes whose certificates TLS refused, this rotation
        self._said_not_accepted = False  # this rotation said that no node accepts connections

    # -- construction helpers -------------------------------------------------

    @classmethod
    def from_config(cls, reactor, config, *, prefer_node=None, **kwargs) -> "PaxchatClient":
        """A client for every node of a ``ClusterConfig`` (TLS as ``client_tls`` says)."""
        policy = kwargs.get("policy") or FailoverPolicy()
        targets = targets_from_config(reactor, config, timeout=policy.connect_timeout)
        return cls(reactor, targets, prefer_node=prefer_node, **kwargs)

    @classmethod
    def from_addresses(cls, reactor, addresses, *, tls=None, ca_path=None, **kwargs) -> "PaxchatClient":
        """A client for ``{node_id: (host, port)}`` or a list of (host, port).

        TLS: ``ca_path`` (the cluster CA; node certificates are checked against
        each host) or ``tls(host)`` returning a client connection creator.
        """
        policy = kwargs.get("policy") or FailoverPolicy()
        return cls(reactor, targets_from_addresses(reactor, addresses, tls=tls, ca_path=ca_path,
                                                   timeout=policy.connect_timeout), **kwargs)

    # -- the protocol's operations ---------------------------------------------

    def hello(self):
        return self._call("hello", {})

    def create_account(self, username: str, password: str, client_msg_id: str | None = None):
        return self._call("create_account", {"username": username, "password": password},
                          client_msg_id)

    def login(self, username: str, password: str):
        return self._call("login", {"username": username, "password": password})

    def resume(self, session: str):
        return self._call("resume", {"session": session})

    def logout(self, client_msg_id: str | None = None):
        return self._call("logout", {}, client_msg_id)

    def list_accounts(self, pattern: str = "*", limit: int = 100, after: str = ""):
        return self._call("list_accounts", {"pattern": pattern, "limit": limit, "after": after})

    def send_message(self, to: str, body: str, client_msg_id: str | None = None):
        """Send; the same ``client_msg_id`` is used for every retry so it is stored once."""
        return self._call("send_message", {"to": to, "body": body}, client_msg_id)

    def read_messages(self, limit: int = 10, client_msg_id: str | None = None):
        return self._call("read_messages", {"limit": limit}, client_msg_id)

    def mark_read(self, ids, client_msg_id: str | None = None):
        return self._call("mark_read", {"ids": list(ids)}, client_msg_id)

    def history(self, peer: str | None = None, before: int | None = None, limit: int = 50):
        args = {"limit": limit}
        if peer is not None:
            args["peer"] = peer
        if before is not None:
            args["before"] = before
        return self._call("history", args)

    def delete_messages(self, ids, client_msg_id: str | None = None):
        return self._call("delete_messages", {"ids": list(ids)}, client_msg_id)

    def delete_account(self, password: str, client_msg_id: str | None = None):
        return self._call("delete_account", {"password": password}, client_msg_id)

    def get_settings(self):
        return self._call("get_settings", {})

    def set_settings(self, read_receipts: bool, client_msg_id: str | None = None):
        return self._call("set_settings", {"read_receipts": read_receipts}, client_msg_id)

    # -- connection lifecycle --------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._ready

    @property
    def leader_pushed(self) -> bool:
        """Whether the node connected to tells this client each change of its leader
        (``leader`` events): then ``leader`` and the status stay right without asking
        ``hello``. False while not connected, and with nodes of earlier builds."""
        return self._ready and self._leader_pushed

    def connect(self) -> defer.Deferred:
        """Fires with the ``hello`` result once connected (and resumed), or fails with Unreachable."""
        if self._closed:
            return defer.fail(ClientError("the client is closed"))
        if self._ready:
            return defer.succeed(dict(self._hello or {}))
        d = defer.Deferred()
        self._connect_waiters.append(d)
        self._ensure_connecting()
        return d

    def close(self) -> defer.Deferred:
        """Stop for good: fail what is outstanding, close the connection, never reconnect."""
        if self._closed:
            return defer.succeed(None)
        self._closed = True
        self._rotation = None
        for call in (self._attempt_call, self._handshake_watchdog):
            if call is not None and call.active():
                call.cancel()
        outstanding, self._outstanding = self._outstanding, []
        for req in outstanding:
            self._stop_timers(req)
            req.deferred.errback(ClientError("the client was closed before the answer came"))
        self._fail_connect_waiters(ClientError("the client was closed"))
        self._set_status(Status("closed"))
        proto = self._proto
        if proto is None or proto.lost:
            return defer.succeed(None)
        d = defer.Deferred()
        self._close_waiters.append(d)
        proto.close()
        return d

    # -- requests ---------------------------------------------------------------

    def _call(self, op, args, client_msg_id=None) -> defer.Deferred:
        if self._closed:
            return defer.fail(ClientError("the client is closed"))
        if op in WRITE_OPS:
            # Chosen once per call: every resend of this request carries it.
            args = dict(args, client_msg_id=uuid.uuid4().hex if client_msg_id is None else client_msg_id)
        try:
            check_size(op, encode_request(0, op, args))  # the connection checks again with the real id
        except RequestTooLarge:
            return defer.fail()
        req = _Request(op, args, None)
        req.deferred = defer.Deferred(lambda d: self._forget(req))
        self._outstanding.append(req)
        if self.policy.call_timeout is not None:
            req.deadline = self.reactor.callLater(self.policy.call_timeout, self._expire, req)
        if self._ready:
            self._send(req)
        else:
            self._ensure_connecting()
        return req.deferred

    def _forget(self, req):
        """The caller cancelled: stop retrying (an answer already in flight is ignored)."""
        self._stop_timers(req)
        if req in self._outstanding:
            self._outstanding.remove(req)

    def _send(self, req):
        proto = self._proto
        req.sent_on = proto
        req.sends += 1
        d = proto.request(req.op, **req.args)
        req.watchdog = self.reactor.callLater(self.policy.answer_timeout, self._silent, proto, req.op)
        d.addCallbacks(self._answered, self._refused, callbackArgs=(req,), errbackArgs=(req,))

    def _expire(self, req):
        """No final answer within ``call_timeout``: fail the call; a late answer is ignored.

        With the reason the caller can best act on: the last ``unavailable``
        answer, else that no node was reached, else plain silence.
        """
        req.deadline = None
        if req not in self._outstanding:
            return
        self._outstanding.remove(req)
        self._stop_timers(req)
        if req.last_error is not None:
            error = req.last_error
        elif req.sends == 0 and not self._ready:
            error = self._unreachable()
        else:
            error = TimedOut(self.policy.call_timeout, change=req.op not in ASKS_ONLY)
        req.deferred.errback(error)

    def _stop_timers(self, req):
        for name in ("watchdog", "waiting", "deadline"):
            call = getattr(req, name)
            if call is not None and call.active():
                call.cancel()
            setattr(req, name, None)

    def _answered(self, result, req):
        if req.watchdog is not None and req.watchdog.active():
            req.watchdog.cancel()
        req.watchdog = None
        if req not in self._outstanding:
            return  # cancelled, expired or closed meanwhile
        self._outstanding.remove(req)
        self._stop_timers(req)
        self._learn(req, result)
        req.deferred.callback(result)

    def _refused(self, failure, req):
        if req.watchdog is not None and req.watchdog.active():
            req.watchdog.cancel()
        req.watchdog = None
        if req not in self._outstanding:
            return None
        answered_on, req.sent_on = req.sent_on, None
        if failure.check(ConnectionDropped):
            return None  # sent again once reconnected
        if (failure.check(ServerError) and failure.value.code == "unavailable"
                and req.op in RETRY_ON_UNAVAILABLE):
            now = self.reactor.seconds()
            if req.retry_until is None:
                req.retry_until = now + self.policy.unavailable_window
            if now < req.retry_until:
                req.last_error = failure.value
                self.log.info("{op} answered unavailable; retrying on another node", op=req.op)
                req.waiting = self.reactor.callLater(self.policy.unavailable_delay, self._retry, req)
                self._leave_node(answered_on, "could not reach a majority",
                                 "node {node} could not reach a majority")
                return None
        self._outstanding.remove(req)
        self._stop_timers(req)
        req.deferred.errback(failure)
        return None

    def _retry(self, req):
        req.waiting = None
        if req in self._outstanding and self._ready and req.sent_on is None:
            self._send(req)

    def _flush(self):
        for req in list(self._outstanding):
            if req.sent_on is None and req.waiting is None and self._ready:
                self._send(req)

    def _learn(self, req, result):
        """Keep the session state in step with what the server said."""
        if req.op == "login":
            self.session = result.get("session")
            self.username = req.args["username"]
        elif req.op == "resume":
            self.session = req.args["session"]
            self.username = result.get("username")
        elif req.op in ("logout", "delete_account"):
            self.session = None
            self.username = None
        elif req.op == "hello":
            self._hello = dict(result)
            if result.get("leader") != self.leader:
                self.leader = result.get("leader")
                if self._ready:
                    self._set_status(Status("connected", self.node, self.leader))

    def _silent(self, proto, op):
        self.log.warn("node {node} did not answer {op} in time; trying another node",
                      node=self._proto_node, op=op)
        proto.abort()

    # -- connecting -------------------------------------------------------------

    def _set_status(self, status: Status):
        self.status = status
        if self.on_status is not None:
            try:
                self.on_status(status)
            except Exception:
                self.log.failure("status callback failed")

    def _ensure_connecting(self):
        if self._closed or self._proto is not None or self._rotation is not None:
            return
        self._start_rotation(after=None)

    def _start_rotation(self, after):
        self._read_cas_again()
        now = self.reactor.seconds()
        self._no_majority = False
        self._closed_unanswered = False
        self._untrusted = {}
        self._said_not_accepted = False
        first = self.prefer_node if after is None else None
        self._rotation = Rotation(list(self.targets), self.policy, now, first=first, after=after,
                                  random=self._random)
        state = "reconnecting" if self._ever_connected else "connecting"
        detail, self._leaving = self._leaving, ""
        self._set_status(Status(state, None, self.leader, detail))
        self._next_attempt()

    def _read_cas_again(self):
        """The CA files the nodes' certificates are checked against, read again if they
        changed (a stat each; a file of a kilobyte then): a prompt or desktop app that was
        told its ca.pem is not the cluster's takes the right one, once copied in, at its
        next campaign instead of failing until restarted."""
        cas = {id(t.ca): t.ca for t in self.targets.values() if hasattr(t.ca, "reload")}
        for ca in cas.values():
            try:
                if ca.reload():
                    self.log.info("{path} changed: node certificates are checked against it from now on",
                                  path=str(ca.path))
            except CertificateFilesError as e:
                self.log.warn("{path} changed, but cannot be used ({why}); still trusting the CA read"
                              " before", path=str(ca.path), why=str(e))

    def _next_attempt(self):
        if self._closed or self._rotation is None:
            return
        attempt = self._rotation.next_attempt(self.reactor.seconds())
        if attempt is None:
            self._give_up()
            return
        node_id, delay = attempt
        self._attempt_call = self.reactor.callLater(delay, self._attempt, node_id)

    def _attempt(self, node_id):
        self._attempt_call = None
        if self._closed:
            return
        target = self.targets[node_id]
        self.log.debug("connecting to node {node} at {where}", node=node_id, where=target.label)
        d = target.endpoint.connect(ChatClientFactory())
        d.addTimeout(self.policy.connect_timeout, self.reactor)
        d.addCallbacks(self._connected, self._attempt_failed, callbackArgs=(node_id,), errbackArgs=(node_id,))

    def _attempt_failed(self, failure, node_id):
        self.log.info("node {node} unreachable: {why}", node=node_id, why=failure.getErrorMessage())
        self._attempt_ended(Attempt(node_id, NOT_ACCEPTED, _not_accepted(failure)))

    def _attempt_ended(self, attempt: Attempt):
        """An attempt of the rotation found no usable node: judge the round if it is over, go on.

        A round in which nodes were reached only to have TLS refuse their
        certificates (the rest not accepting a connection) gives up at
        once: a wrong ca.pem does not mend by waiting, and the user is
        better told so now than after the whole deadline. A round in which
        no node accepted a connection says so once (``Status.not_accepted``)
        and waits on, since nodes restart.
        """
        rotation = self._rotation
        if rotation is None or self._closed:
            return
        rotation.failed(attempt)
        outcomes = rotation.round_over()
        if outcomes is not None:
            kinds = {a.kind for a in outcomes}
            if UNTRUSTED in kinds and kinds <= {UNTRUSTED, NOT_ACCEPTED}:
                self._give_up()
                return
            if kinds == {NOT_ACCEPTED} and not self._said_not_accepted:
                self._said_not_accepted = True
                left = rotation.started + self.policy.deadline - self.reactor.seconds()
                self._set_status(Status(
                    "reconnecting" if self._ever_connected else "connecting", None, self.leader,
                    "no server is accepting connections",
                    not_accepted=tuple((self.targets[a.node_id].label, a.why) for a in outcomes),
                    retry_for=max(0.0, left)))
        self._next_attempt()

    def _certificate_refused(self, node_id, refused: CertificateRefused) -> Attempt:
        """Keep why node ``node_id``'s certificate was refused, for the error that names it."""
        target = self.targets[node_id]
        problem, detail, advice = "certificate refused", refused.detail, ""
        if target.ca is not None:
            host = target.label.rpartition(":")[0].strip("[]")
            try:
                problem, detail, advice = target.ca.refusal(refused.chain, host, refused.hostname,
                                                            refused.detail)
            except Exception:
                # The chain is whatever the node presented. Raised from here, in
                # the connection's loss, it would leave the rotation waiting for
                # an attempt that never ends: no other node would be tried.
                self.log.failure("explaining why node {node}'s certificate was refused failed",
                                 node=node_id)
        self.log.warn("node {node} at {where}: TLS refused its certificate ({problem})", node=node_id,
                      where=target.label, problem=problem)
        self._untrusted[node_id] = (f"node {node_id} ({target.label})", problem, detail, advice)
        return Attempt(node_id, UNTRUSTED, problem)

    def _connected(self, proto, node_id):
        if self._closed:
            proto.close()
            return
        proto.on_event = lambda event, proto=proto: self._event(event, proto)
        proto.on_lost = lambda reason, proto=proto: self._lost(proto, reason)
        self._proto = proto
        self._proto_node = node_id
        self._handshake_watchdog = self.reactor.callLater(
            self.policy.answer_timeout, self._silent, proto, "hello")
        # Asks for leader events: a node of an earlier build ignores the argument.
        d = proto.request("hello", leader_events=True)
        d.addCallback(self._hello_answered, proto, node_id)
        d.addErrback(self._handshake_failed, proto)

    @defer.inlineCallbacks
    def _hello_answered(self, hello, proto, node_id):
        self._hello = dict(hello)   # a leader event during the resume below updates it
        if self.session is not None:
            try:
                resumed = yield proto.request("resume", session=self.session)
            except ServerError as e:
                if e.code == "unavailable":
                    self._without_majority(proto, node_id)
                    return
                if e.code != "bad_session":
                    raise
                self._session_lost(e)
            else:
                self.username = resumed.get("username", self.username)
        if proto is not self._proto or proto.lost:
            return
        if self._handshake_watchdog is not None and self._handshake_watchdog.active():
            self._handshake_watchdog.cancel()
        self._handshake_watchdog = None
        self.node = hello.get("node", node_id)
        self.leader = self._hello.get("leader")
        self._leader_pushed = hello.get("leader_events") is True
        self._ready = True
        self._ever_connected = True
        self._rotation = None
        self.log.info("connected to node {node}", node=self.node)
        self._set_status(Status("connected", self.node, self.leader))
        waiters, self._connect_waiters = self._connect_waiters, []
        for d in waiters:
            d.callback(dict(self._hello))
        self._flush()

    def _without_majority(self, proto, node_id):
        """``resume`` answered ``unavailable``: this node is up, but cut off from a majority.

        Say so in the status, and try the next node; if none does better
        before the deadline, the caller hears ``NoMajority``, not that no
        server could be reached.
        """
        if proto is not self._proto or proto.lost:
            return
        self._no_majority = True
        why = f"node {node_id} could not confirm with a majority in time"
        self.log.info("{why}; trying another node", why=why)
        status = Status("reconnecting" if self._ever_connected else "connecting",
                        None, self.leader, why, no_majority=True)
        if (status.state, status.no_majority) != (self.status.state, self.status.no_majority):
            self._set_status(status)          # once per rotation, not once per node
        proto.abort()  # _lost moves on to the next node

    def _handshake_failed(self, failure, proto):
        if not failure.check(ConnectionDropped):
            self.log.info("handshake with node {node} failed: {why}", node=self._proto_node,
                          why=failure.getErrorMessage())
            proto.abort()  # _lost moves on to the next node
        return None

    def _session_lost(self, error):
        """``resume`` said the session is gone (expired, logged out or account deleted)."""
        self.session = None
        self.username = None
        for req in list(self._outstanding):
            # A logout or delete_account that was sent before the drop evidently took effect.
            if req.op in ("logout", "delete_account") and req.sends > 0:
                self._outstanding.remove(req)
                self._stop_timers(req)
                req.deferred.callback({})
        self._event({"event": "session_ended", "reason": "the session is no longer valid"})

    def _event(self, event, proto=None):
        if event.get("event") == "session_ended":   # the connection is logged out
            self.session = None
            self.username = None
        elif event.get("event") == "leader" and proto is not None and proto is self._proto:
            self._leader_changed(event.get("leader"))
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                self.log.failure("event callback failed")
        if event.get("event") == "node_stopping" and proto is not None:
            if event.get("reason") == "full":   # it holds max_clients connections already
                self._leave_node(proto, "is full", "node {node} is full")
            else:
                self._leave_node(proto, f"is stopping ({event.get('reason')})", "node {node} is stopping")

    def _leader_changed(self, leader):
        """The node says it now believes ``leader`` leads (None: it is electing one),
        as a ``hello`` answer would: the status says so at once."""
        if leader is not None and type(leader) is not int:
            return
        if self._hello is not None:
            self._hello["leader"] = leader
        if self._ready and leader != self.leader:
            self.leader = leader
            self._set_status(Status("connected", self.node, self.leader))

    def _leave_node(self, proto, why, detail):
        """Close ``proto`` on purpose; ``_lost`` moves on to another node, this one tried last.

        For a node that said it is stopping (after answering what it had
        read) or that answered ``unavailable``. Whatever is still unanswered
        fails with ConnectionDropped and is sent again on the next node, as
        after any drop (writes keep their client_msg_id). ``detail`` (with
        ``{node}``) is what the next status says.
        """
        if proto is None or proto is not self._proto or proto.lost:
            return
        node = self._proto_node
        self.log.info("node {node} {why}; moving to another node", node=node, why=why)
        if self._rotation is None:  # else a rotation is under way and goes on
            self._leaving = detail.format(node=node)
        self._ready = False  # calls from now on wait for the next node
        proto.close()

    def _lost(self, proto, reason):
        if proto is not self._proto:
            return
        was_ready = self._ready
        self._proto = None
        self._ready = False
        self._leader_pushed = False
        lost_node = self._proto_node
        if self._handshake_watchdog is not None and self._handshake_watchdog.active():
            self._handshake_watchdog.cancel()
        self._handshake_watchdog = None
        if self._closed:
            waiters, self._close_waiters = self._close_waiters, []
            for d in waiters:
                d.callback(None)
            return
        self.log.info("connection to node {node} lost", node=lost_node)
        refused = reason.value if isinstance(reason, Failure) and reason.check(CertificateRefused) else None
        if not proto.heard and refused is None:
            self._closed_unanswered = True
        if was_ready or self._rotation is None:
            # Starts with the node after the lost one, so the lost one comes last.
            self._start_rotation(after=lost_node)
        elif refused is not None:
            self._attempt_ended(self._certificate_refused(lost_node, refused))
        else:
            self._attempt_ended(Attempt(lost_node, ANSWERED))

    def _unreachable(self):
        tried = ", ".join(t.label for t in self.targets.values())
        if self._untrusted:
            refusals = [entry[:3] for entry in self._untrusted.values()]
            advice = "; ".join(dict.fromkeys(entry[3] for entry in self._untrusted.values() if entry[3]))
            return UntrustedNodes(refusals, advice)
        if self._no_majority:
            return NoMajority(f"servers answered, but none could confirm with a majority in time (tried {tried})")
        if self._closed_unanswered:
            return ClosedUnanswered(f"nodes closed the connection before answering: {tried}")
        return Unreachable(f"no paxchat node could be reached: {tried}")

    def _give_up(self):
        self._rotation = None
        error = self._unreachable()
        outstanding, self._outstanding = self._outstanding, []
        # Each call its own error, all made now: a callback below that calls
        # again starts the next rotation, which forgets why this one failed.
        errors = [self._unreachable() for _ in outstanding]
        self._set_status(Status("failed", None, self.leader, str(error),
                                no_majority=isinstance(error, NoMajority), error=error))
        for req, failed in zip(outstanding, errors):
            self._stop_timers(req)
            req.deferred.errback(failed)
        self._fail_connect_waiters(error)

    def _fail_connect_waiters(self, error):
        waiters, self._connect_waiters = self._connect_waiters, []
        for d in waiters:
            d.errback(error)


def _not_accepted(failure) -> str:
    """A few words for why a connection attempt failed, for the line that says no node accepts one."""
    if failure.check(net_error.ConnectionRefusedError):
        return "connection refused"
    if failure.check(net_error.TimeoutError, net_error.ConnectingCancelledError, defer.TimeoutError):
        return "no answer"
    if failure.check(net_error.NoRouteError):
        return "no route to host"
    if failure.check(net_error.DNSLookupError):
        return "host name not found"
    return failure.getErrorMessage() or failure.type.__name__
