"""TLS on the client port: an ``ssl.SSLSocket`` over each accepted socket.

A node holds one TLS connection per logged-in client, most of them idle,
so what a connection costs at rest matters more than anything else here.
Twisted's own TLS layer (pyOpenSSL over the OpenSSL that ``cryptography``
ships) costs ~34 KiB per idle connection; the standard library's ``ssl``
module over memory BIOs ~16 KiB, of which ~2.5 KiB are the two BIOs and
the buffers they keep at the size of the largest flight they ever carried
(docs/performance.md has the figures). Here OpenSSL reads and writes the
socket itself: no BIO buffers, no copy of each record through Python, and
Twisted's reactor still owns the socket. Peer links keep pyOpenSSL: they
are few, and mutual TLS with the cluster CA is built on it
(``paxchat.tls``).

L{TLSServerEndpoint} listens like ``TCP4ServerEndpoint``; each accepted
connection is a L{TLSServer}, a ``tcp.Server`` whose socket is an
``SSLSocket`` in non-blocking mode. The chat protocol sees an ordinary TCP
transport: ``write`` encrypts, ``dataReceived`` is already decrypted, and
producers, pausing, ``abortConnection`` and ``setTcpNoDelay`` are Twisted's.

Non-blocking OpenSSL has one rule the reactor has to keep: a call that
could not finish is repeated once the socket is ready for it. A read or
handshake step that needs to write waits for the socket to be writable
(``_wants_write``), and for reading to resume if the protocol paused it
meanwhile, so no data reaches a paused protocol; a write that stopped
midway returns 0, and Twisted's write buffer offers the same bytes again
(Python sets ``SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER``, so they may sit
elsewhere).
Renegotiation is refused, so a write never has to wait for a read.
"""

from __future__ import annotations

import errno
import socket
import ssl

from twisted.internet import defer, error, main, tcp
from twisted.internet.interfaces import IHandshakeListener, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["HANDSHAKE_TIMEOUT_SECONDS", "LINGER_SECONDS", "TLSError", "TLSServer",
           "TLSServerEndpoint", "TLSServerPort", "server_context"]

log = Logger()

# A client that connects and never finishes its handshake is dropped after this long.
HANDSHAKE_TIMEOUT_SECONDS = 10.0
# A connection closed by the server waits this long at most for its client to close too.
LINGER_SECONDS = 10.0
_WOULD_BLOCK = (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS)


def server_context(cert_path, key_path, minimum=ssl.TLSVersion.TLSv1_2) -> ssl.SSLContext:
    """A server context presenting the node's certificate; no client certificate is asked."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = minimum
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.load_cert_chain(str(cert_path), str(key_path))
    return context


class TLSError(error.ConnectionLost):
    """The TLS layer failed (a bad handshake, a corrupt record): the connection was dropped."""


class TLSServer(tcp.Server):
    """One client connection: Twisted's TCP transport over an ``SSLSocket``.

    The chat protocol's ``connectionMade`` runs when TCP connects, as on
    plain TCP; what it writes before the handshake is done is held and sent
    first. ``handshakeCompleted`` is called on protocols that listen for
    it. A handshake not done ``handshake_timeout`` seconds after the
    connection opened drops it (the protocol sees L{TLSError}).
    """

    # Class defaults: most connections never change them, so an idle one
    # does not carry them.
    _handshaken = False
    _handshake_timer = None
    _early = ()                    # written before the handshake finished
    _lose_after_handshake = False
    _wants_write = False           # a handshake or read step is owed a turn (room, or resumed reading)
    _reading_paused = False        # the protocol paused reading (pauseProducing)
    _reason = None                 # why the TLS layer dropped the connection
    _linger_timer = None           # set while closed for writing, waiting for the client to close

    def __init__(self, sock, protocol, client, server, sessionno, reactor):
        # Non-blocking once tcp.Connection sets it below; the SSLSocket reads
        # the mode again on every call.
        sock = server.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        super().__init__(sock, protocol, client, server, sessionno, reactor)
        self._handshake_timer = server.clock.callLater(
            server.handshake_timeout, self._handshake_timed_out)

    # -- from the socket ----------------------------------------------------------

    def doRead(self):
        if self._linger_timer is not None:
            return self._drop_input()
        if not self._handshaken:
            return self._handshake()
        try:
            data = self.socket.recv(self.bufferSize)
        except ssl.SSLWantReadError:   # part of a record, or a record with no data in it
            return None
        except ssl.SSLWantWriteError:
            return self._wait_for_room()
        except ssl.SSLError as e:
            return self._failed(e)
        except OSError as e:
            return None if e.errno in _WOULD_BLOCK else main.CONNECTION_LOST
        if not data:                   # close_notify, or TCP closed without one
            self._say_close_notify()
            return main.CONNECTION_DONE
        self.protocol.dataReceived(data)
        return None

    def doWrite(self):
        # The step that waited for room goes on, unless the protocol paused
        # reading meanwhile: its data would arrive while it is paused.
        # ``startReading`` brings it back.
        if self._wants_write and not self._reading_paused:
            self._wants_write = False
            if not self.disconnecting:
                why = self.doRead()
                if why is not None or self._wants_write:
                    return why
        return super().doWrite()

    def stopReading(self):
        self._reading_paused = True
        super().stopReading()

    def startReading(self):
        self._reading_paused = False
        super().startReading()
        if self._wants_write:
            # What OpenSSL already took from the socket will not wake the
            # reactor as a read: let the next writable turn finish the step.
            self.startWriting()

    def writeSomeData(self, data):
        if not data:
            return 0
        try:
            return self.socket.send(memoryview(data)[:self.SEND_LIMIT])
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return 0                   # offered again, from the same byte, when there is room
        except ssl.SSLError as e:
            return self._failed(e)
        except OSError as e:
            return 0 if e.errno in _WOULD_BLOCK else main.CONNECTION_LOST

    def _postLoseConnection(self):
        """All that was written has gone out: close_notify, TCP's FIN, then
        wait for the client to close (L{_linger})."""
        if not self._say_close_notify():
            self.startWriting()
            return None
        return self._linger()

    def _linger(self):
        """Read and drop what the client still sends until it closes, for
        L{LINGER_SECONDS} at most, then close.

        The kernel resets a socket closed with data unread in it, throwing
        away what it had not sent yet: the last answers and events of a
        client that had sent more than was read (a stopping node reads no
        more requests). Shut for writing only, the socket sends all of it,
        then the FIN, and the client closes once it has read them.
        """
        if not self._handshaken or self._reason is not None:
            return super()._postLoseConnection()
        try:
            socket.socket.shutdown(self.socket, socket.SHUT_WR)   # TLS has said close_notify
        except OSError:
            return super()._postLoseConnection()
        self._linger_timer = self.server.clock.callLater(LINGER_SECONDS, self.abortConnection)
        self.startReading()
        return None

    def _drop_input(self):
        """While lingering: read the raw socket, drop what comes; the client closing ends it."""
        try:
            data = socket.socket.recv(self.socket, self.bufferSize)
        except OSError as e:
            return None if e.errno in _WOULD_BLOCK else main.CONNECTION_LOST
        return None if data else main.CONNECTION_DONE

    def connectionLost(self, reason):
        self._cancel_handshake_timer()
        timer, self._linger_timer = self._linger_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if self._reason is not None:
            reason = Failure(self._reason)
        self._early = ()
        super().connectionLost(reason)

    # -- TLS ---------------------------------------------------------------------

    def _handshake(self):
        try:
            self.socket.do_handshake()
        except ssl.SSLWantReadError:
            return None
        except ssl.SSLWantWriteError:
            return self._wait_for_room()
        except ssl.SSLError as e:
            return self._failed(e)
        except (OSError, ValueError):  # reset before or during the handshake
            return main.CONNECTION_LOST
        self._handshaken = True
        self._cancel_handshake_timer()
        if IHandshakeListener.providedBy(self.protocol):
            self.protocol.handshakeCompleted()
        early = self._early
        if early:
            self._early = ()
            self.write(b"".join(early))
        if self._lose_after_handshake:
            self.loseConnection()
            return None
        # What came with the client's Finished is read now, not when the
        # socket next wakes the reactor (OpenSSL reads record by record,
        # so it is still in the socket; this does not rely on that).
        if self.disconnecting:
            return None
        if self._reading_paused:
            self._wants_write = True   # read once reading resumes (startReading)
            return None
        return self.doRead()

    def _wait_for_room(self):
        self._wants_write = True
        self.startWriting()
        return None

    def _say_close_notify(self):
        """Send close_notify, not waiting for the client's; False if the socket has no room yet."""
        if not self._handshaken or self._reason is not None:
            return True
        try:
            self.socket.unwrap()
        except ssl.SSLWantWriteError:
            return False
        except (OSError, ValueError):  # SSLWantReadError: the client's close_notify is not here
            pass
        return True

    def _failed(self, exc):
        self._reason = TLSError(f"TLS: {exc}")
        log.debug("client TLS failed from {peer}: {error}", peer=self.getPeer(), error=exc)
        return self._reason           # OpenSSL has sent its alert, if it made one

    def _handshake_timed_out(self):
        self._handshake_timer = None
        if self._handshaken or not self.connected:
            return
        self._reason = TLSError(f"TLS: no handshake within {self.server.handshake_timeout:g} s")
        self.abortConnection()

    def _cancel_handshake_timer(self):
        timer = self._handshake_timer
        if timer is not None:
            self._handshake_timer = None
            if timer.active():
                timer.cancel()

    # -- from the chat protocol ----------------------------------------------------

    def getPeerCertificate(self):
        """None: the client port asks clients for no certificate."""
        return None

    def write(self, data):
        if not isinstance(data, bytes):
            raise TypeError(f"Data must be bytes, not {type(data).__name__}")
        if self.disconnecting or not data:
            return
        if not self._handshaken:
            if self._early:
                self._early.append(data)
            else:
                self._early = [data]    # most connections never write early: no list for them
            return
        super().write(data)

    def writeSequence(self, data):
        self.write(b"".join(data))

    def loseWriteConnection(self):
        """Not offered: TCP's half-close would end TLS under a connection still reading."""
        raise NotImplementedError("half-close is not offered on the TLS client port")

    def loseConnection(self):
        if not self._handshaken and self._early and self.connected:
            self._lose_after_handshake = True
            # What was written waits for the handshake, which goes on though
            # the protocol paused reading (a stopping node pauses every
            # connection before it says so): else the close would wait for
            # the handshake timeout. No data reaches the protocol: closing,
            # the connection stops reading once the handshake is done.
            self.startReading()
            return
        super().loseConnection()


class TLSServerPort(tcp.Port):
    """A listening TCP port whose connections speak TLS with ``context`` (L{TLSServer})."""

    transport = TLSServer

    def __init__(self, port, factory, context: ssl.SSLContext, reactor, backlog=50, interface="",
                 handshake_timeout=HANDSHAKE_TIMEOUT_SECONDS, clock=None):
        super().__init__(port, factory, backlog, interface, reactor)
        self.context = context
        self.handshake_timeout = handshake_timeout
        self.clock = reactor if clock is None else clock   # for handshake timeouts


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """``TCP4ServerEndpoint``, with TLS (``context``) on every connection it accepts."""

    def __init__(self, reactor, port, context: ssl.SSLContext, interface="", backlog=50,
                 handshake_timeout=HANDSHAKE_TIMEOUT_SECONDS, clock=None):
        self._reactor = reactor
        self._port = port
        self._context = context
        self._interface = interface
        self._backlog = backlog
        self._handshake_timeout = handshake_timeout
        self._clock = clock

    def __repr__(self):
        return f"<TLSServerEndpoint {self._interface or '*'}:{self._port}>"

    def listen(self, protocolFactory):
        """Bind and listen at once (a bind error fails the returned Deferred before it returns)."""
        return defer.execute(self._listen, protocolFactory)

    def _listen(self, factory):
        port = TLSServerPort(self._port, factory, self._context, self._reactor, self._backlog,
                             self._interface, self._handshake_timeout, self._clock)
        port.startListening()
        return port
