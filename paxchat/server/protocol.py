"""One client connection: JSON lines in, answers and events out, with bounded memory.

Framing: lines end with ``\\n``; a line over 65,536 bytes (or that much
data without a newline) gets ``frame_too_large`` and the connection closes.

Backpressure, both ways:
- At most ``max_pending_per_connection`` requests are in flight; past that
  the server stops reading from the socket until answers drain, so any
  number of pipelined requests is served in constant memory.
- Each request read counts what its answer may weigh
  (``answer_bytes_at_most``: ~1 MiB for ``history`` and ``read_messages``,
  whose answers the state cuts at ``MAX_ANSWER_MESSAGE_BYTES``; a few
  hundred bytes for most others). While the requests in flight may answer
  ``max_answer_bytes_in_flight`` or more, the server reads no further
  request; one request is always read when none is in flight.
- The connection registers as the producer of its transport's output. When
  the transport's buffer fills (the client is not reading), the server
  stops reading requests too. Answers to the requests already read still
  get written, and do not count toward the events' backlog: the budget
  above bounds them. Events (and ``frame_too_large`` / ``node_stopping``)
  still get written too, counted as the connection's backlog until its
  buffer drains. A transport says "full" as soon as it holds 64 KiB, before
  it has even tried the socket, so a burst of big events (a sender's
  pipelined long messages, committed together) fills it for a client that
  reads as fast as it can. So the backlog may pass ``max_output_backlog``
  for a while: the client must then drain it within
  ``output_stall_seconds``. The connection is aborted (and nothing more is
  written to it) when it does not, at once when its backlog passes
  ``max_output_burst``, and at once past ``max_output_backlog`` while the
  backlogs of all the node's connections (``OutputDebt``) pass
  ``max_output_debt``, so many stuck clients cannot add up to more memory
  than that. Events are best effort: the client recovers them with
  ``read_messages`` / ``history`` after it reconnects.

So a client that stops reading makes the node hold, past the transport's
own buffer, at most about ``max_answer_bytes_in_flight`` plus one answer
(that of the request read last, which may overshoot the budget: ~1 MiB at
most) plus ``max_output_burst`` of events for ``output_stall_seconds``;
once every connection's share of ``max_output_debt`` is spent, the old
bound of ``max_output_backlog`` of events holds.

Requests of one connection run concurrently, except that a request that
changes the connection's session (login, resume, logout, delete_account)
makes the requests after it wait until it is answered.

When its node stops, ``close_after_answers`` stops reading requests, lets
those already read be answered, then sends a ``node_stopping`` event and
closes: the client resends what it had not got an answer to elsewhere.
"""

import json
import weakref
from collections import deque
from json.encoder import encode_basestring_ascii

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from paxchat.limits import MAX_ANSWER_MESSAGE_BYTES, MAX_LIMIT, MAX_LINE_BYTES
from paxchat.tcp import SERVER_KEEPALIVE, keep_alive, no_delay

from .errors import FRAME_TOO_LARGE, INTERNAL, INVALID_REQUEST, ProtocolError
from .handlers import SESSION_OPS
from .ratelimit import TokenBucket
from .request_line import decode_request, valid_id
from .validation import MAX_USERNAME_CHARS

log = Logger()

# A connection the server closes (frame_too_large, node_stopping) that its client
# has not closed too after this long is cut off.
CLOSE_GRACE_SECONDS = 10.0


_json_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode  # built once


def encode(message):
    return _json_encode(message).encode("ascii") + b"\n"


# What an answer weighs besides its id and its list of messages or names:
# keys, "ok", "more" / "unread", an error's code and message.
_ANSWER_ENVELOPE_BYTES = 512
# A name in a list_accounts answer: ASCII characters, quotes and a comma.
_ACCOUNT_NAME_BYTES = MAX_USERNAME_CHARS + 3
_MESSAGE_LIST_OPS = frozenset({"history", "read_messages"})


def answer_bytes_at_most(request_id, op, request):
    """What the answer to a request may weigh, as ``encode`` writes it.

    The answer echoes the id, escaped to ASCII: a string id of 64 KiB of
    control characters alone weighs 384 KiB, so it is counted as it is.
    """
    size = _ANSWER_ENVELOPE_BYTES + (
        len(encode_basestring_ascii(request_id)) if type(request_id) is str else len(repr(request_id)))
    if op in _MESSAGE_LIST_OPS:
        return size + MAX_ANSWER_MESSAGE_BYTES
    if op == "list_accounts":
        limit = request.get("limit")
        if type(limit) is not int or not 0 < limit <= MAX_LIMIT:
            limit = MAX_LIMIT
        return size + limit * _ACCOUNT_NAME_BYTES
    return size


class OutputDebt:
    """Bytes of events written to the node's connections whose output is full, all together."""

    def __init__(self):
        self.bytes = 0


def _forget_tracebacks(failure, logged):
    """Drop the tracebacks of an answered failure and of the exceptions it chains to.

    A Deferred failure that a handler awaited (a read dropped because the
    connection closed, ``Unavailable`` from the log) is thrown into its
    coroutine by Twisted's coroutine runner, whose frame holds the Failure
    thrown in; the exception's traceback holds that frame (a reference
    cycle) and the handler's frames, which hold the connection with its
    transport. Left alone, that closed connection lives on until the cycle
    collector finds it. A ``logged`` Failure keeps its frames as text, for
    a log observer that formats it later (worked out only then: most
    failures are the errors a client is answered, never logged).
    """
    if logged:
        failure.frames  # computed now, from the traceback about to go
    failure.tb = None
    seen = set()
    chained = [failure.value]
    while chained:
        exc = chained.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        exc.__traceback__ = None
        chained += (exc.__context__, exc.__cause__)


@implementer(IPushProducer)
class _OutputGate:
    """What the transport tells when its write buffer fills and drains.

    It holds its connection weakly: the connection holds its transport, and
    a TLS transport keeps its producer after the connection is lost, so a
    strong reference would be a cycle keeping every closed TLS connection
    until the next full garbage collection.
    """

    def __init__(self, protocol):
        self._protocol = weakref.ref(protocol)

    def pauseProducing(self):
        protocol = self._protocol()
        if protocol is not None:
            protocol._output_full()

    def resumeProducing(self):
        protocol = self._protocol()
        if protocol is not None:
            protocol._output_drained()

    def stopProducing(self):
        pass


_NO_PAUSES = frozenset()


class ChatProtocol(Protocol):
    """One client connection.

    Thousands of these sit idle on a node, so what only some connections
    need (a queue of waiting requests, rate-limit buckets, a Deferred for
    whoever waits for the close) is made on first use.
    """

    def __init__(self, reactor, settings, handlers, registry, debt=None):
        self._reactor = reactor
        self._debt = debt if debt is not None else OutputDebt()  # the node's, from its factory
        self._settings = settings
        self._handlers = handlers
        self._registry = registry
        self.session = None  # set by the registry while logged in
        self.ending_session = None  # the session this connection is logging out or deleting
        self._login_bucket = None
        self._write_bucket = None
        self._buffer = bytearray()
        self._pos = 0
        self._draining = False
        self._closing = False
        self._pauses = _NO_PAUSES  # why reading is paused (a frozenset: pauses are rare)
        self._in_flight = 0
        self._answer_bytes = 0  # what the answers to the requests in flight may weigh
        self._session_op_running = False
        self._waiting = None  # a deque of the requests behind a session-changing one
        self._output_paused = False
        self._backlog = 0  # bytes of events written since the output filled
        self._stall_timer = None  # the backlog must be gone when it fires
        self._dropped = False  # aborted for its backlog: nothing more is written
        self._close_timer = None
        self._stopping_event = None  # the node_stopping event, once the node is stopping
        self._lost = False
        self._closed_waiters = None

    # A bucket that took nothing is full, so one made on first use allows
    # exactly what one made with the connection would have.

    @property
    def login_bucket(self):
        if self._login_bucket is None:
            self._login_bucket = TokenBucket(self._reactor, self._settings.login_per_connection)
        return self._login_bucket

    @property
    def write_bucket(self):
        if self._write_bucket is None:
            self._write_bucket = TokenBucket(self._reactor, self._settings.writes_per_connection)
        return self._write_bucket

    # Connection life

    def connectionMade(self):
        factory = self.factory
        connections = getattr(factory, "connections", None)  # a ChatServerFactory's
        if (connections is not None and len(connections) >= self._settings.max_clients
                and not factory.make_room()):
            self._turn_away()
            return
        no_delay(self.transport)
        keep_alive(self.transport, SERVER_KEEPALIVE)  # a client that vanished is dropped, not kept
        self.transport.registerProducer(_OutputGate(self), True)
        if connections is not None:
            connections.add(self)
            factory.arrived(self)

    def _turn_away(self):
        """The node holds ``max_clients`` connections: tell this one to go elsewhere, and close.

        The client hears what a stopping node says (``node_stopping``, reason
        ``full``), so paxchat's client moves to another node at once and
        tries this one last. No request is read from the connection (under
        TLS the handshake still runs, to deliver the event).
        """
        self._closing = True
        self.factory.turned_away()
        self.send_event({"event": "node_stopping", "reason": "full"})
        self._close(producer=False)

    def connectionLost(self, reason):
        self.connected = False
        self._closing = True
        self._lost = True
        self._registry.detach(self)
        self._waiting = None
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._forget_backlog()
        connections = getattr(self.factory, "connections", None)
        if connections is not None:
            connections.discard(self)
            self.factory.left(self)
        waiters, self._closed_waiters = self._closed_waiters, None
        for d in waiters or ():
            d.callback(None)

    def when_closed(self):
        """A Deferred that fires once the connection is gone (at once if it is)."""
        if self._lost:
            return defer.succeed(None)
        d = defer.Deferred()
        if self._closed_waiters is None:
            self._closed_waiters = []
        self._closed_waiters.append(d)
        return d

    def close_after_answers(self, reason):
        """The node is stopping: read nothing more, answer what was read, then say so and close.

        Requests still unread are never started, so the client can safely
        send them again to another node. ``close_now`` ends the wait early.
        """
        if self._stopping_event is not None or not self.connected or self._close_timer is not None:
            return
        self._stopping_event = {"event": "node_stopping", "reason": reason}
        self._closing = True
        self._pause("stopping")
        self._waiting_done()

    def close_now(self):
        """Stop waiting for answers: send ``node_stopping`` and close at once."""
        if self.connected:
            self._send_stopping_and_close()

    def _waiting_done(self):
        if self._stopping_event is not None and self._in_flight == 0 and self.connected:
            self._send_stopping_and_close()

    def _send_stopping_and_close(self):
        event, self._stopping_event = self._stopping_event, None
        if event is None or self.transport is None:
            return
        self.send_event(event)
        self._close()

    def _close(self, producer=True):
        """Close once all that was written has gone out, reading and dropping
        what the client still sends until it closes too (or
        ``CLOSE_GRACE_SECONDS`` pass).

        The kernel resets a socket closed with data unread in it, and throws
        away what it had not sent yet: a client that had sent more than the
        server read (pipelined requests, a line over the limit) lost the last
        answers and the event that says why. So the server shuts only its
        side: the client reads everything, then the end, and closes. The TLS
        port does this itself (``paxchat.clienttls``), on ``loseConnection``.
        """
        transport = self.transport
        if producer:
            # A streaming producer that is paused would keep the transport open,
            # and a full output would stop the reading that drops the client's data.
            transport.unregisterProducer()
        try:
            transport.loseWriteConnection()
        except (AttributeError, NotImplementedError):
            transport.loseConnection()
        else:
            transport.resumeProducing()     # what comes now is dropped (dataReceived)
        if self._close_timer is None:
            self._close_timer = self._reactor.callLater(CLOSE_GRACE_SECONDS, transport.abortConnection)

    @property
    def in_flight(self):
        return self._in_flight

    @property
    def reading_paused(self):
        return bool(self._pauses)

    # Reading

    def dataReceived(self, data):
        if self._closing:
            return
        self._buffer += data
        self._drain()

    def _drain(self):
        if self._draining:
            return
        self._draining = True
        try:
            while not self._pauses and not self._closing:
                end = self._buffer.find(b"\n", self._pos)
                if end < 0:
                    if len(self._buffer) - self._pos > MAX_LINE_BYTES:
                        self._frame_too_large()
                    break
                if end - self._pos > MAX_LINE_BYTES:
                    self._frame_too_large()
                    break
                line = bytes(self._buffer[self._pos:end])
                self._pos = end + 1
                self._line_received(line)
            if self._pos:
                del self._buffer[:self._pos]
                self._pos = 0
        finally:
            self._draining = False

    def _frame_too_large(self):
        self._closing = True
        self._buffer = bytearray()
        self._pos = 0
        self._write({"id": None, "ok": False, "error": {
            "code": FRAME_TOO_LARGE, "message": f"a line may hold at most {MAX_LINE_BYTES} bytes"}})
        self._close()

    def _pause(self, reason):
        if not self._pauses:
            self.transport.pauseProducing()
        self._pauses = self._pauses | {reason}

    def _resume(self, reason):
        if reason not in self._pauses:
            return
        self._pauses = self._pauses - {reason} or _NO_PAUSES
        if not self._pauses and not self._closing:
            self.transport.resumeProducing()
            self._drain()

    # Requests

    def _line_received(self, line):
        self._in_flight += 1
        if self._in_flight >= self._settings.max_pending_per_connection:
            self._pause("pipeline")
        if not line.strip():
            return self._answer_error(None, ProtocolError(INVALID_REQUEST, "empty line"))
        try:
            request = decode_request(line)
        except ProtocolError as e:
            return self._answer_error(getattr(e, "request_id", None), e)
        request_id = request.get("id")
        if not valid_id(request_id):
            return self._answer_error(None, ProtocolError(
                INVALID_REQUEST, "a request needs an \"id\" that is an integer or a string"))
        op = request.get("op")
        if type(op) is not str:
            return self._answer_error(request_id, ProtocolError(INVALID_REQUEST, "\"op\" must be a string"))
        size = answer_bytes_at_most(request_id, op, request)
        self._answer_bytes += size
        self._start(request_id, op, request, size)
        # Checked once dispatched: an answer given at once pauses nothing.
        if self._answers_full():
            self._pause("answers")

    def _answers_full(self):
        """Whether the answers in flight may fill the budget (never with none in flight)."""
        return 0 < self._answer_bytes >= self._settings.max_answer_bytes_in_flight

    def _start(self, request_id, op, request, size):
        if self._session_op_running:
            if self._waiting is None:
                self._waiting = deque()
            self._waiting.append((request_id, op, request, size))
            return
        d = defer.maybeDeferred(self._handlers.dispatch, self, op, request)
        d.addCallbacks(self._answer_result, self._answer_failure,
                       callbackArgs=(request_id, size), errbackArgs=(request_id, op, size))
        if op in SESSION_OPS and not d.called:
            self._session_op_running = True
            d.addBoth(self._session_op_done)
        d.addErrback(self._answer_crashed, op)

    def _answer_crashed(self, failure, op):
        log.failure("answering {op} failed", failure, op=op)

    def _session_op_done(self, passthrough):
        self._session_op_running = False
        while self._waiting and not self._session_op_running:
            self._start(*self._waiting.popleft())
        return passthrough

    def _answer_result(self, result, request_id, size):
        self._answer({"id": request_id, "ok": True, "result": result}, size)

    def _answer_failure(self, failure, request_id, op, size):
        logged = False
        try:
            if failure.check(ProtocolError):
                return self._answer_error(request_id, failure.value, size)
            if self._lost and failure.check(defer.CancelledError):
                return None  # its read was dropped when the connection closed
            logged = True
            log.failure("request {op} failed", failure, op=op)
            self._answer_error(request_id, ProtocolError(INTERNAL, "internal error; it has been logged"), size)
        finally:
            _forget_tracebacks(failure, logged)

    def _answer_error(self, request_id, error, size=0):
        self._answer({"id": request_id, "ok": False, "error": error.as_error()}, size)

    def _answer(self, message, size):
        """Write the answer to a request in flight, whose answer was to weigh ``size`` at most."""
        try:
            data = encode(message)
        except (TypeError, ValueError):
            log.failure("unencodable answer")
            data = encode({"id": message.get("id"), "ok": False, "error": {
                "code": INTERNAL, "message": "internal error; it has been logged"}})
        self._in_flight -= 1
        self._answer_bytes -= size
        self._send(data, answer=True)
        if self._in_flight < self._settings.max_pending_per_connection:
            self._resume("pipeline")
        if not self._answers_full():
            self._resume("answers")
        self._waiting_done()

    # Writing

    def send_event(self, event):
        """Push an event; never blocks (see the module docstring)."""
        self._send(encode(event))

    def _write(self, message):
        self._send(encode(message))

    def _send(self, data, answer=False):
        """Write ``data``; an event past what the client may owe drops it instead.

        Answers do not count toward the backlog: what they may weigh is
        bounded before their requests are read.
        """
        if not self.connected or self.transport is None or self._dropped:
            return
        if self._output_paused and not answer:
            backlog = self._backlog + len(data)
            settings = self._settings
            if backlog > settings.max_output_burst:
                return self._drop("it was sent more than {limit} bytes it has not read",
                                  limit=settings.max_output_burst)
            if backlog > settings.max_output_backlog:
                if self._debt.bytes + len(data) > settings.max_output_debt:
                    return self._drop("clients of this node owe more than {limit} bytes of events",
                                      limit=settings.max_output_debt)
                if self._stall_timer is None:
                    self._stall_timer = self._reactor.callLater(
                        settings.output_stall_seconds, self._stalled)
            self._backlog = backlog
            self._debt.bytes += len(data)
        self.transport.write(data)

    def _stalled(self):
        self._stall_timer = None
        if self._output_paused and self._backlog > self._settings.max_output_backlog:
            self._drop("it did not read its events for {limit} s",
                       limit=self._settings.output_stall_seconds)

    def _drop(self, why, **fields):
        """Abort a client that is not reading what it is sent; events are best effort."""
        self._dropped = True
        if not self._closing:
            log.warn("dropping a client: " + why + " ({backlog} bytes of events waiting)",
                     backlog=self._backlog, **fields)
            self._closing = True
            self.transport.abortConnection()

    def _forget_backlog(self):
        self._debt.bytes -= self._backlog
        self._backlog = 0
        if self._stall_timer is not None:
            if self._stall_timer.active():
                self._stall_timer.cancel()
            self._stall_timer = None

    def _output_full(self):
        # TCP transports say this again on every write while full.
        if self._output_paused:
            return
        self._output_paused = True
        self._forget_backlog()
        self._pause("output")

    def _output_drained(self):
        self._output_paused = False
        self._forget_backlog()
        self._resume("output")
