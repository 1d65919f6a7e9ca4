"""TLS on the client port, done by the standard library's ``ssl`` module.

A node holds one TLS connection per logged-in client, most of them idle.
Twisted's own TLS layer (pyOpenSSL over the OpenSSL that ``cryptography``
ships) costs ~34 KiB per idle connection; an ``ssl.SSLObject`` over two
memory BIOs costs ~17 KiB, and its record work runs in C rather than
through Python wrappers on every read and write (docs/performance.md has
the figures). Peer links keep pyOpenSSL: they are few, and mutual TLS with
the cluster CA is built on it (``paxchat.tls``).

L{TLSServerFactory} wraps the chat factory the way
``twisted.protocols.tls.TLSMemoryBIOFactory`` does: the chat protocol sees
a transport whose ``write`` encrypts and whose ``dataReceived`` is already
decrypted; everything else (producers, pausing, ``abortConnection``,
``setTcpNoDelay``) goes to the TCP transport underneath.
"""

from __future__ import annotations

import ssl

from twisted.internet import error
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure

__all__ = ["HANDSHAKE_TIMEOUT_SECONDS", "TLSError", "TLSServerFactory", "server_context"]

log = Logger()

_READ_CHUNK = 64 * 1024
# A client that connects and never finishes its handshake is dropped after this long.
HANDSHAKE_TIMEOUT_SECONDS = 10.0


def server_context(cert_path, key_path, minimum=ssl.TLSVersion.TLSv1_2) -> ssl.SSLContext:
    """A server context presenting the node's certificate; no client certificate is asked."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = minimum
    context.load_cert_chain(str(cert_path), str(key_path))
    return context


class TLSError(error.ConnectionLost):
    """The TLS layer failed (a bad handshake, a corrupt record): the connection was dropped."""


class _TLSServerProtocol(ProtocolWrapper):
    """One connection: decrypts what TCP delivers, encrypts what the chat protocol writes."""

    def __init__(self, factory, wrapped):
        super().__init__(factory, wrapped)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = factory.context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._handshaken = False
        self._early = ()            # written by the chat protocol before the handshake finished
        self._lose_after_handshake = False
        self._reason = None         # why the TLS layer closed the connection
        self._handshake_timer = None

    # -- from TCP ----------------------------------------------------------------

    def makeConnection(self, transport):
        factory = self.factory
        self._handshake_timer = factory.reactor.callLater(
            factory.handshake_timeout, self._handshake_timed_out)
        super().makeConnection(transport)

    def dataReceived(self, data):
        self._incoming.write(data)
        if not self._handshaken and not self._handshake():
            return
        self._read()

    def connectionLost(self, reason):
        self._cancel_handshake_timer()
        if self._reason is not None:
            reason = self._reason
        self._early = ()
        super().connectionLost(reason)

    def _cancel_handshake_timer(self):
        timer, self._handshake_timer = self._handshake_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _handshake_timed_out(self):
        self._handshake_timer = None
        if self._handshaken:
            return
        self._reason = Failure(TLSError(
            f"TLS: no handshake within {self.factory.handshake_timeout:g} s"))
        self.transport.abortConnection()

    # -- TLS ---------------------------------------------------------------------

    def _handshake(self):
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except (ssl.SSLError, ValueError) as e:
            self._fail(e)
            return False
        self._handshaken = True
        self._cancel_handshake_timer()
        self._flush()
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()
        early, self._early = self._early, ()
        if early:
            self.write(b"".join(early))
        if self._lose_after_handshake:
            self.loseConnection()
        return True

    def _read(self):
        tls = self._tls
        while self.wrappedProtocol is not None and self._reason is None:
            try:
                data = tls.read(_READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLError as e:   # SSLZeroReturnError is not raised: read() gives b""
                self._fail(e)
                break
            if not data:
                # The client said close_notify: answer it and close.
                self.loseConnection()
                break
            self.wrappedProtocol.dataReceived(data)
        self._flush()

    def _flush(self):
        if self._outgoing.pending:
            self.transport.write(self._outgoing.read())

    def _fail(self, exc):
        self._reason = Failure(TLSError(f"TLS: {exc}"))
        log.debug("client TLS failed from {peer}: {error}", peer=self.transport.getPeer(), error=exc)
        self._flush()                 # the alert, if OpenSSL made one
        self.transport.loseConnection()

    # -- from the chat protocol ----------------------------------------------------

    def getPeerCertificate(self):
        """None: the client port asks clients for no certificate."""
        return None

    def write(self, data):
        if not isinstance(data, bytes):
            raise TypeError(f"Data must be bytes, not {type(data).__name__}")
        if self.disconnecting or self._reason is not None or not data:
            return
        if not self._handshaken:
            if self._early:
                self._early.append(data)
            else:
                self._early = [data]    # most connections never write early: no list for them
            return
        try:
            self._tls.write(data)
        except ssl.SSLError as e:
            self._fail(e)
            return
        self._flush()

    def writeSequence(self, data):
        self.write(b"".join(data))

    def loseConnection(self):
        if self.disconnecting:
            return
        if not self._handshaken and self._early:
            self._lose_after_handshake = True
            return
        self.disconnecting = True
        if self._handshaken and self._reason is None:
            try:
                self._tls.unwrap()           # queues close_notify; we do not wait for the client's
            except (ssl.SSLError, ValueError):  # SSLWantReadError: the client's is not here yet
                pass
            self._flush()
        self.transport.loseConnection()


class TLSServerFactory(WrappingFactory):
    """Wraps ``wrapped`` (the chat factory) so each connection speaks TLS with ``context``.

    A connection whose handshake is not done ``handshake_timeout`` seconds
    after it opened is dropped (the chat protocol sees ``TLSError``).
    """

    protocol = _TLSServerProtocol

    def __init__(self, context: ssl.SSLContext, wrapped, reactor,
                 handshake_timeout=HANDSHAKE_TIMEOUT_SECONDS):
        super().__init__(wrapped)
        self.context = context
        self.reactor = reactor
        self.handshake_timeout = handshake_timeout

    def logPrefix(self):
        return f"{self.wrappedFactory.__class__.__name__} (TLS)"
