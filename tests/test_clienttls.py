"""The client port's TLS layer (paxchat.clienttls) against Twisted's own TLS client.

Real sockets on 127.0.0.1: OpenSSL reads and writes them itself, so what
is under test is exactly what a node runs. Every wait is on a Deferred
bounded by ``TIMEOUT``; the handshake timeout is driven by a ``Clock``.
"""

from __future__ import annotations

import select
import socket
import ssl

import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, protocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.task import Clock
from zope.interface import implementer

from paxchat import clienttls, tcp, tls
from tests.cluster_support import wait_until
from tests.test_tls import make_config

TIMEOUT = 10


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cfg = make_config(tmp_path_factory.mktemp("clienttls"))
    tls.make_cluster_certs(cfg)
    return cfg


@implementer(IHandshakeListener)
class App(protocol.Protocol):
    """Either end's application: records what it got; ``on_connect`` runs in connectionMade."""

    def __init__(self, on_connect=None, on_data=None):
        self.on_connect = on_connect
        self.on_data = on_data
        self.received = b""
        self.handshakes = 0
        self.lost = None
        self._waits = []

    def connectionMade(self):
        if self.on_connect:
            self.on_connect(self)

    def handshakeCompleted(self):
        self.handshakes += 1
        self._check()

    def dataReceived(self, data):
        self.received += data
        if self.on_data:
            self.on_data(self, data)
        self._check()

    def connectionLost(self, reason):
        self.lost = reason
        self._check()

    def until(self, condition):
        """A Deferred fired (bounded) once ``condition(self)`` holds."""
        from twisted.internet import reactor
        d = defer.Deferred()
        self._waits.append((condition, d))
        self._check()
        return d.addTimeout(TIMEOUT, reactor)

    def _check(self):
        for wait in list(self._waits):
            condition, d = wait
            if condition(self):
                self._waits.remove(wait)
                d.callback(self)


class Served:
    """A listening TLS port whose connections get the apps ``make_app`` builds."""

    def __init__(self, port, clock):
        self.port = port
        self.clock = clock
        self.apps = []          # server ends
        self.clients = []       # client ends (dial)


@pytest.fixture
def serve(cluster):
    """``serve(make_app)``: listen on a free port; stopped after the test.

    (The endpoint, L{clienttls.TLSServerEndpoint}, is what test_tls and
    test_server_socket listen with.)
    """
    from twisted.internet import reactor
    served = []

    def start(make_app, port_class=clienttls.TLSServerPort):
        clock = Clock()
        factory = protocol.Factory()
        record = Served(None, clock)

        def build(addr):
            app = make_app()
            record.apps.append(app)
            return app
        factory.buildProtocol = build
        port = port_class(0, factory, tls.client_server_context(cluster, 1), reactor,
                          interface="127.0.0.1", clock=clock)
        port.startListening()
        record.port = port
        served.append(record)
        return record

    yield start
    for record in served:
        for app in record.apps + record.clients:
            if app.lost is None and app.transport is not None:
                app.transport.abortConnection()
        pytest_twisted.blockon(record.port.stopListening())


def dial(cluster, served, app, raw=False):
    """Connect ``app`` to ``served`` with Twisted's TLS client (or plain TCP when ``raw``)."""
    from twisted.internet import reactor
    served.clients.append(app)
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", served.port.getHost().port,
                                            timeout=TIMEOUT)
    if not raw:
        endpoint = endpoints.wrapClientTLS(tls.client_connection_options(cluster, "127.0.0.1"),
                                           endpoint)
    return endpoints.connectProtocol(endpoint, app).addTimeout(TIMEOUT, reactor)


@defer.inlineCallbacks
def connected(cluster, served, client=None):
    """(server app, client app) once both ends have finished the handshake."""
    client = client or App()
    yield dial(cluster, served, client)
    yield client.until(lambda app: app.handshakes)
    server = served.apps[-1]
    yield server.until(lambda app: app.handshakes)
    return server, client


@pytest_twisted.inlineCallbacks
def test_round_trip_both_ways_and_large_writes(cluster, serve):
    big = bytes(range(256)) * 1200  # 300 KiB: many TLS records each way
    served = serve(lambda: App(on_data=lambda app, data: app.transport.write(b"ok")))
    server, client = yield connected(cluster, served)
    assert server.handshakes == 1 and client.handshakes == 1
    client.transport.write(b"ping\n")
    yield client.until(lambda app: app.received == b"ok")
    assert server.received == b"ping\n"
    server.on_data = None
    server.transport.write(big)
    client.transport.write(big)
    yield client.until(lambda app: len(app.received) >= 2 + len(big))
    yield server.until(lambda app: len(app.received) >= 5 + len(big))
    assert client.received == b"ok" + big
    assert server.received == b"ping\n" + big


@pytest_twisted.inlineCallbacks
def test_a_client_that_stops_reading_gets_every_byte_once_it_reads_again(cluster, serve):
    """The socket fills, OpenSSL's writes stop midway, and the same bytes are offered again."""
    served = serve(App)
    server, client = yield connected(cluster, served)
    transport = server.transport
    results = []
    write_some = transport.writeSomeData

    def counted(data):
        result = write_some(data)
        results.append(result)
        return result
    transport.writeSomeData = counted
    # Small socket buffers, so a 128 KiB write cannot fit once the client stops reading.
    transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    client.transport.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    client.transport.pauseProducing()
    payload = bytes(range(251)) * (32 * 1024)  # ~8 MiB
    transport.write(payload)
    from twisted.internet import reactor
    yield wait_until(reactor, lambda: 0 in results, TIMEOUT, "the socket filled up")
    client.transport.resumeProducing()
    yield client.until(lambda app: len(app.received) >= len(payload))
    assert client.received == payload
    assert sum(r for r in results if isinstance(r, int)) == len(payload)


@pytest_twisted.inlineCallbacks
def test_writes_before_the_handshake_arrive_first_and_in_order(cluster, serve):
    def greet(app):
        app.transport.write(b"one,")
        app.transport.writeSequence([b"two,", b"three"])
    served = serve(lambda: App(on_connect=greet))
    server, client = yield connected(cluster, served)
    yield client.until(lambda app: len(app.received) >= 13)
    assert client.received == b"one,two,three"
    server.transport.write(b",four")
    yield client.until(lambda app: len(app.received) >= 18)
    assert client.received == b"one,two,three,four"


@pytest_twisted.inlineCallbacks
def test_server_close_sends_close_notify_after_what_was_written(cluster, serve):
    served = serve(App)
    server, client = yield connected(cluster, served)
    server.transport.write(b"bye\n")
    server.transport.loseConnection()
    server.transport.write(b"not sent")  # after loseConnection: dropped
    yield client.until(lambda app: app.lost is not None)
    yield server.until(lambda app: app.lost is not None)
    assert client.received == b"bye\n"
    assert isinstance(client.lost.value, ConnectionDone)   # a clean TLS close, not a truncation


@pytest.mark.parametrize("paused", [False, True], ids=["reading", "paused"])
@pytest_twisted.inlineCallbacks
def test_close_before_the_handshake_still_sends_early_writes(cluster, serve, paused):
    # A stopping node pauses every connection, then writes node_stopping and
    # closes: one still in its handshake must finish it all the same (the
    # handshake timeout's clock never moves here) and get what was written.
    def greet_and_go(app):
        if paused:
            app.transport.pauseProducing()
        app.transport.write(b"node is stopping\n")
        app.transport.loseConnection()
    served = serve(lambda: App(on_connect=greet_and_go))
    client = App()
    yield dial(cluster, served, client)
    yield client.until(lambda app: app.lost is not None)
    assert client.received == b"node is stopping\n"
    yield served.apps[-1].until(lambda app: app.lost is not None)
    assert served.clock.getDelayedCalls() == []


@pytest_twisted.inlineCallbacks
def test_client_close_reaches_the_server_app(cluster, serve):
    served = serve(App)
    server, client = yield connected(cluster, served)
    client.transport.loseConnection()
    yield server.until(lambda app: app.lost is not None)
    yield client.until(lambda app: app.lost is not None)
    assert isinstance(server.lost.value, ConnectionDone)
    assert isinstance(client.lost.value, ConnectionDone)


@pytest_twisted.inlineCallbacks
def test_a_plain_text_client_is_dropped_and_the_app_sees_nothing(cluster, serve):
    served = serve(App)
    raw = App(on_connect=lambda app: app.transport.write(b'{"op": "create_account"}\n'))
    yield dial(cluster, served, raw, raw=True)
    yield raw.until(lambda app: app.lost is not None)
    server = served.apps[-1]
    yield server.until(lambda app: app.lost is not None)
    assert server.received == b"" and server.handshakes == 0
    assert isinstance(server.lost.value, clienttls.TLSError)
    assert b"create_account" not in raw.received


@pytest_twisted.inlineCallbacks
def test_writes_must_be_bytes_and_the_socket_is_reachable(cluster, serve):
    served = serve(App)
    server, client = yield connected(cluster, served)
    with pytest.raises(TypeError):
        server.transport.write("text")
    assert server.transport.getPeerCertificate() is None  # none asked of clients
    assert tcp.keep_alive(server.transport, tcp.SERVER_KEEPALIVE)
    assert tcp.no_delay(server.transport)
    sock = server.transport.getHandle()
    assert isinstance(sock, ssl.SSLSocket)
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


@pytest_twisted.inlineCallbacks
def test_a_client_that_never_finishes_its_handshake_is_dropped(cluster, serve):
    served = serve(App)
    silent = App()
    yield dial(cluster, served, silent, raw=True)
    from twisted.internet import reactor
    yield wait_until(reactor, lambda: served.apps, TIMEOUT, "the server accepted the connection")
    server = served.apps[0]
    served.clock.advance(clienttls.HANDSHAKE_TIMEOUT_SECONDS - 0.1)
    assert server.lost is None
    served.clock.advance(0.1)
    yield server.until(lambda app: app.lost is not None)
    assert isinstance(server.lost.value, clienttls.TLSError)
    assert "no handshake" in str(server.lost.value)
    yield silent.until(lambda app: app.lost is not None)


@pytest_twisted.inlineCallbacks
def test_a_finished_handshake_stops_the_clock(cluster, serve):
    served = serve(App)
    server, client = yield connected(cluster, served)
    assert served.clock.getDelayedCalls() == []
    served.clock.advance(clienttls.HANDSHAKE_TIMEOUT_SECONDS * 10)
    assert server.lost is None and client.lost is None


class _HandshakeWaitsForRoom(clienttls.TLSServer):
    """Its first handshake step finds the socket full, as a slow network would make it."""

    waited = 0

    def _handshake(self):
        if not type(self).waited:
            type(self).waited += 1
            return self._wait_for_room()
        return super()._handshake()


class _PortWaitingForRoom(clienttls.TLSServerPort):
    transport = _HandshakeWaitsForRoom


@pytest_twisted.inlineCallbacks
def test_a_handshake_step_that_waits_for_room_goes_on_when_the_socket_is_writable(
        cluster, serve):
    served = serve(App, port_class=_PortWaitingForRoom)
    server, client = yield connected(cluster, served)
    assert _HandshakeWaitsForRoom.waited == 1
    client.transport.write(b"after\n")
    yield server.until(lambda app: app.received == b"after\n")


class _ReadWaitsForRoomThenPaused(clienttls.TLSServer):
    """Its first read step after the handshake finds the socket full (as a
    renegotiation-free TLS 1.3 key update could make it), and the protocol
    pauses reading before the socket has room again."""

    armed = False                 # set by the test once the handshake is done
    waited = 0
    write_turns = 0
    turns_when_waited = None

    def doRead(self):
        readable = select.select([self.fileno()], [], [], 0)[0]
        if type(self).armed and readable and not type(self).waited:
            type(self).waited += 1
            type(self).turns_when_waited = type(self).write_turns
            self._wait_for_room()
            self.pauseProducing()
            return None
        return super().doRead()

    def doWrite(self):
        type(self).write_turns += 1
        return super().doWrite()


class _PortReadWaitsForRoomThenPaused(clienttls.TLSServerPort):
    transport = _ReadWaitsForRoomThenPaused


@pytest_twisted.inlineCallbacks
def test_a_read_step_waiting_for_room_does_not_deliver_while_the_protocol_is_paused(
        cluster, serve):
    from twisted.internet import reactor
    probe = _ReadWaitsForRoomThenPaused
    probe.armed, probe.waited, probe.write_turns = False, 0, 0
    served = serve(App, port_class=_PortReadWaitsForRoomThenPaused)
    server, client = yield connected(cluster, served)
    probe.armed = True                  # the next read with bytes waiting is this data's
    client.transport.write(b"while paused\n")
    yield wait_until(reactor, lambda: probe.waited, TIMEOUT, "the read step waited for room")
    turns = probe.turns_when_waited
    yield wait_until(reactor, lambda: probe.write_turns > turns, TIMEOUT,
                     "the socket had room again")
    assert server.received == b""
    server.transport.resumeProducing()
    yield server.until(lambda app: app.received == b"while paused\n")


class _StdlibTLSClient(App):
    """A client doing TLS by hand (``ssl`` over memory BIOs), so a test can send raw bytes."""

    def __init__(self, context):
        super().__init__()
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing)
        self.handshaken = False

    def connectionMade(self):
        self._step()

    def dataReceived(self, data):
        self.incoming.write(data)
        self._step()
        self._check()

    def _step(self):
        if not self.handshaken:
            try:
                self.tls.do_handshake()
                self.handshaken = True
            except ssl.SSLWantReadError:
                pass
        if self.outgoing.pending:
            self.transport.write(self.outgoing.read())


@pytest_twisted.inlineCallbacks
def test_a_corrupt_record_after_the_handshake_drops_only_that_connection(cluster, serve):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(cluster.ca_path))
    context.check_hostname = False
    served = serve(App)
    corrupt = _StdlibTLSClient(context)
    yield dial(cluster, served, corrupt, raw=True)
    yield corrupt.until(lambda app: app.handshaken)
    corrupt.tls.write(b"hello\n")
    record = bytearray(corrupt.outgoing.read())
    record[-1] ^= 0xFF                    # the record's tag no longer matches
    corrupt.transport.write(bytes(record))
    server = served.apps[0]
    yield server.until(lambda app: app.lost is not None)
    assert isinstance(server.lost.value, clienttls.TLSError)
    assert server.received == b""
    yield corrupt.until(lambda app: app.lost is not None)
    # The port still serves.
    other_server, other = yield connected(cluster, served)
    other.transport.write(b"still here\n")
    yield other_server.until(lambda app: app.received == b"still here\n")


@pytest_twisted.inlineCallbacks
def test_a_client_gone_in_the_middle_of_its_handshake_is_a_lost_connection(cluster, serve):
    served = serve(App)
    rude = App(on_connect=lambda app: app.transport.write(b"\x16\x03\x01\x02\x00\x01\x00\x01"))
    yield dial(cluster, served, rude, raw=True)
    from twisted.internet import reactor
    yield wait_until(reactor, lambda: served.apps, TIMEOUT, "the server accepted the connection")
    rude.transport.abortConnection()        # a reset, half a ClientHello sent
    server = served.apps[0]
    yield server.until(lambda app: app.lost is not None)
    assert server.handshakes == 0 and server.received == b""
    assert served.clock.getDelayedCalls() == []   # its handshake timer is gone with it


@pytest_twisted.inlineCallbacks
def test_half_close_is_refused_rather_than_ending_tls_under_a_reading_connection(cluster, serve):
    served = serve(App)
    server, client = yield connected(cluster, served)
    with pytest.raises(NotImplementedError):
        server.transport.loseWriteConnection()
    client.transport.write(b"still read\n")
    yield server.until(lambda app: app.received == b"still read\n")


@pytest_twisted.inlineCallbacks
def test_closed_connections_leave_no_tls_objects_behind(cluster, serve):
    import gc
    import weakref
    served = serve(App)
    pairs = []
    for _ in range(5):
        pairs.append((yield connected(cluster, served)))
    left = [weakref.ref(server.transport) for server, _ in pairs]
    left += [weakref.ref(server.transport.socket) for server, _ in pairs]
    for server, client in pairs:
        client.transport.loseConnection()
    for server, client in pairs:
        yield server.until(lambda app: app.lost is not None)
    for server, _ in pairs:
        server.transport = None          # the app was the last holder, as a node's factory lets go
    del pairs, server, client
    served.apps.clear()
    # Resumed from inside the last connection's connectionLost: let the
    # reactor return from it first.
    from twisted.internet import reactor, task
    yield task.deferLater(reactor, 0, lambda: None)
    gc.collect()
    assert [ref() for ref in left] == [None] * 10


@pytest_twisted.inlineCallbacks
def test_data_after_the_handshake_waits_while_the_protocol_is_paused(cluster, serve):
    """The client's first data comes with its Finished; a protocol that pauses
    reading when the handshake completes gets it only once it resumes."""
    from twisted.internet import reactor, task
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(cluster.ca_path))
    context.check_hostname = False
    class PausesOnHandshake(App):
        def handshakeCompleted(self):
            self.transport.pauseProducing()
            super().handshakeCompleted()
    served = serve(PausesOnHandshake)
    eager = _StdlibTLSClient(context)
    step = eager._step

    def step_and_talk():
        was = eager.handshaken
        if not was:
            try:
                eager.tls.do_handshake()
                eager.handshaken = True
                eager.tls.write(b"with my Finished\n")   # one TCP write: Finished, then data
            except ssl.SSLWantReadError:
                pass
        step()
    eager._step = step_and_talk
    yield dial(cluster, served, eager, raw=True)
    yield eager.until(lambda app: app.handshaken)
    server = served.apps[0]
    yield server.until(lambda app: app.handshakes)
    yield task.deferLater(reactor, 0, lambda: None)   # a reactor turn with the data readable
    assert server.received == b""
    server.transport.resumeProducing()
    yield server.until(lambda app: app.received == b"with my Finished\n")
