"""One connection to one paxchat node: JSON lines in, Deferreds out.

``ChatClient`` knows nothing of failover or sessions; it numbers requests,
matches answers by ``id`` (they may come back out of order, and many may be
in flight at once) and hands server-pushed events to a callback. The failover
logic in ``api.PaxchatClient`` is built on top of it.
"""

from __future__ import annotations

import itertools
import json
from typing import Callable

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.protocols.basic import LineOnlyReceiver

from paxchat.limits import MAX_LINE_BYTES
from paxchat.tcp import CLIENT_KEEPALIVE, keep_alive, no_delay

from .errors import CertificateRefused, ConnectionDropped, RequestTooLarge, ServerError

__all__ = ["ChatClient", "ChatClientFactory", "check_size", "encode_request"]

# Answers (history pages of long bodies) can be far bigger than the 64 KiB the
# server accepts from us; this only guards against a runaway peer.
MAX_ANSWER_BYTES = 32 * 1024 * 1024


def encode_request(request_id, op: str, args: dict) -> bytes:
    """One request line, exactly as the protocol frames it."""
    body = {"id": request_id, "op": op}
    body.update(args)
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def check_size(op: str, line: bytes) -> None:
    """Raise RequestTooLarge if the server would refuse ``line`` (it counts bytes without the ``\\n``)."""
    if len(line) - 1 > MAX_LINE_BYTES:
        raise RequestTooLarge(op, len(line) - 1, MAX_LINE_BYTES)


class ChatClient(LineOnlyReceiver):
    """A client connection speaking the paxchat protocol.

    ``on_event(event_dict)`` receives pushed events; ``on_lost(reason)`` is
    called once when the connection ends, after every unanswered request has
    failed with ``ConnectionDropped``.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_ANSWER_BYTES
    log = Logger()

    def __init__(self, on_event: Callable[[dict], None] | None = None,
                 on_lost: Callable[[object], None] | None = None):
        self.on_event = on_event
        self.on_lost = on_lost
        self._ids = itertools.count(1)
        self._pending: dict[int, defer.Deferred] = {}
        self._sizes: dict[int, int] = {}  # line length of each pending request
        self.connected = False
        self.lost = False
        self.heard = False  # the node sent something (a TLS mismatch ends a connection unheard)

    # -- requests -----------------------------------------------------------

    def request(self, op: str, **args) -> defer.Deferred:
        """Send one request; the Deferred fires with its ``result`` dict or fails with ServerError."""
        if self.lost or self.transport is None:
            return defer.fail(ConnectionDropped("not connected"))
        request_id = next(self._ids)
        line = encode_request(request_id, op, args)
        try:
            check_size(op, line)
        except RequestTooLarge:
            return defer.fail()
        d = defer.Deferred()
        self._pending[request_id] = d
        self._sizes[request_id] = len(line)
        self.transport.write(line)
        return d

    @property
    def in_flight(self) -> int:
        """How many requests are waiting for their answer."""
        return len(self._pending)

    def close(self):
        """Close the connection; unanswered requests fail with ConnectionDropped."""
        if self.transport is not None and not self.lost:
            self.transport.loseConnection()

    def abort(self):
        """Drop the connection at once (a node that stopped answering)."""
        if self.transport is not None and not self.lost:
            self.transport.abortConnection()

    # -- protocol -----------------------------------------------------------

    def connectionMade(self):
        self.connected = True
        no_delay(self.transport)
        keep_alive(self.transport, CLIENT_KEEPALIVE)  # a node that vanished is noticed, then left

    def dataReceived(self, data: bytes):
        self.heard = True
        super().dataReceived(data)

    def lineReceived(self, line: bytes):
        line = line.rstrip(b"\r")
        if not line.strip():
            return
        try:
            message = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            self.log.warn("ignoring a line from the server that is not JSON ({n} bytes)", n=len(line))
            return
        if not isinstance(message, dict):
            self.log.warn("ignoring a JSON line from the server that is not an object")
            return
        if "id" not in message:
            if "event" in message and self.on_event is not None:
                try:
                    self.on_event(message)
                except Exception:
                    self.log.failure("event handler failed on {event}", event=message.get("event"))
            return
        if message["id"] is None and _error_code(message) == "frame_too_large":
            self._frame_too_large(message)
            return
        d = self._pending.pop(message["id"], None)
        self._sizes.pop(message["id"], None)
        if d is None:
            self.log.warn("answer for unknown request id {id!r}", id=message["id"])
            return
        if message.get("ok") is True:
            result = message.get("result")
            d.callback(result if isinstance(result, dict) else {})
        else:
            d.errback(_server_error(message))

    def _frame_too_large(self, message):
        """The server refused a line as too long and is closing: fail that request, for good.

        The answer cannot say which request it was (``"id": null``); it is
        the longest one in flight. The others fail with ConnectionDropped
        when the connection closes, so they are sent again elsewhere; this
        one would only be refused again.
        """
        if not self._sizes:
            self.log.warn("the server refused a line as too large, but none is in flight")
            return
        request_id = max(self._sizes, key=self._sizes.get)
        del self._sizes[request_id]
        self._pending.pop(request_id).errback(_server_error(message))

    def lineLengthExceeded(self, line):
        self.log.warn("server sent a line over {n} bytes; closing", n=self.MAX_LENGTH)
        self.abort()

    def connectionLost(self, reason=None):
        if self.lost:
            return
        self.lost = True
        self.connected = False
        pending, self._pending = self._pending, {}
        self._sizes = {}
        for d in pending.values():
            d.errback(ConnectionDropped("the connection closed before the answer came"))
        refused = certificate_refused(reason, self.transport)
        if refused is not None:
            reason = Failure(refused)
        if self.on_lost is not None:
            self.on_lost(reason)


def certificate_refused(reason, transport) -> CertificateRefused | None:
    """A CertificateRefused if TLS verification of the node's certificate ended the connection.

    Twisted reports it as an OpenSSL "certificate verify failed" (or a
    service_identity VerificationError for a certificate made for another
    address), which says nothing of which certificate: the chain the node
    presented is taken from the TLS connection, still there while the
    protocol hears of the loss, so the failover can say what is wrong with it.
    """
    if reason is None or not isinstance(reason, Failure):
        return None
    error = reason.value
    kind = f"{type(error).__module__}.{type(error).__name__}"
    if kind.startswith("service_identity.") and kind.endswith("VerificationError"):
        hostname = True
    elif kind.startswith("OpenSSL.") and "certificate verify failed" in str(error):
        hostname = False
    else:
        return None
    detail = "the certificate is not for this address" if hostname else "certificate verify failed"
    return CertificateRefused(detail, _peer_chain(transport), hostname=hostname)


def _peer_chain(transport) -> list:
    """The certificates the node presented, as ``cryptography`` objects; [] where they cannot be had."""
    try:
        handle = transport.getHandle()
        try:
            return list(handle.get_peer_cert_chain(as_cryptography=True) or [])
        except TypeError:               # pyOpenSSL before 24.3
            return [c.to_cryptography() for c in handle.get_peer_cert_chain() or []]
    except Exception:
        return []


def _error_code(message):
    error = message.get("error")
    return error.get("code") if isinstance(error, dict) else None


def _server_error(message):
    error = message.get("error")
    if not isinstance(error, dict):
        error = {}
    return ServerError(str(error.get("code", "internal")), str(error.get("message", "")))


class ChatClientFactory(Factory):
    """Builds one ChatClient with the given callbacks (for endpoint.connect)."""

    protocol = ChatClient

    def __init__(self, on_event=None, on_lost=None):
        self.on_event = on_event
        self.on_lost = on_lost

    def buildProtocol(self, addr):
        proto = ChatClient(self.on_event, self.on_lost)
        proto.factory = self
        return proto
