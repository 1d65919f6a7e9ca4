"""The client port's TLS layer (paxchat.clienttls) against Twisted's own TLS client.

Both ends run over iosim's in-memory transports: no sockets, no reactor;
``flush(pump)`` moves every byte (Twisted's client gathers small writes
until its clock ticks, so the clock is advanced too).
"""

from __future__ import annotations

import pytest
from twisted.internet import protocol
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from zope.interface import implementer

from paxchat import clienttls, tls
from tests.test_tls import make_config

ADDRESS = IPv4Address("TCP", "127.0.0.1", 7101)


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

    def connectionMade(self):
        if self.on_connect:
            self.on_connect(self)

    def handshakeCompleted(self):
        self.handshakes += 1

    def dataReceived(self, data):
        self.received += data
        if self.on_data:
            self.on_data(self, data)

    def connectionLost(self, reason):
        self.lost = reason


def connected(cluster, server_app, client_app=None, client_raw=False):
    """(server app, client app, pump): our TLS server and a Twisted TLS (or raw TCP) client."""
    client_app = client_app or App()
    server_clock = Clock()
    server_factory = clienttls.TLSServerFactory(
        tls.client_server_context(cluster, 1), protocol.Factory.forProtocol(lambda: server_app),
        server_clock)
    if client_raw:
        client_side = client_app
    else:
        client_factory = TLSMemoryBIOFactory(
            tls.client_connection_options(cluster, "127.0.0.1"), True,
            protocol.Factory.forProtocol(lambda: client_app), clock=Clock())
        client_side = client_factory.buildProtocol(ADDRESS)
    _, _, pump = iosim.connectedServerAndClient(
        lambda: server_factory.buildProtocol(ADDRESS), lambda: client_side)
    pump.tls_clock = None if client_raw else client_factory._clock
    pump.server_clock = server_clock
    flush(pump)
    return server_app, client_app, pump


def flush(pump):
    for _ in range(100):
        if pump.tls_clock is not None:
            pump.tls_clock.advance(0)
        if not pump.flush() and not (pump.tls_clock and pump.tls_clock.getDelayedCalls()):
            return
    raise AssertionError("still moving bytes after 100 rounds")


def test_round_trip_both_ways_and_large_writes(cluster):
    big = bytes(range(256)) * 1200  # 300 KiB: many TLS records each way
    server, client, pump = connected(
        cluster, App(on_data=lambda app, data: app.transport.write(b"ok")))
    assert server.handshakes == 1 and client.handshakes == 1
    client.transport.write(b"ping\n")
    flush(pump)
    assert server.received == b"ping\n" and client.received == b"ok"
    server.on_data = None
    server.transport.write(big)
    client.transport.write(big)
    flush(pump)
    assert client.received == b"ok" + big
    assert server.received == b"ping\n" + big


def test_writes_before_the_handshake_arrive_first_and_in_order(cluster):
    def greet(app):
        app.transport.write(b"one,")
        app.transport.writeSequence([b"two,", b"three"])
    server, client, pump = connected(cluster, App(on_connect=greet))
    assert client.received == b"one,two,three"
    server.transport.write(b",four")
    flush(pump)
    assert client.received == b"one,two,three,four"


def test_server_close_delivers_what_was_written_first(cluster):
    server, client, pump = connected(cluster, App())
    server.transport.write(b"bye\n")
    server.transport.loseConnection()
    server.transport.write(b"not sent")  # after loseConnection: dropped
    flush(pump)
    assert client.received == b"bye\n"
    assert isinstance(client.lost.value, ConnectionDone)
    assert server.lost is not None


def test_close_before_the_handshake_still_sends_early_writes(cluster):
    def greet_and_go(app):
        app.transport.write(b"node is stopping\n")
        app.transport.loseConnection()
    server, client, pump = connected(cluster, App(on_connect=greet_and_go))
    assert client.received == b"node is stopping\n"
    assert client.lost is not None and server.lost is not None


def test_client_close_reaches_the_server_app(cluster):
    server, client, pump = connected(cluster, App())
    client.transport.loseConnection()
    flush(pump)
    assert isinstance(server.lost.value, ConnectionDone)
    assert isinstance(client.lost.value, ConnectionDone)


def test_a_plain_text_client_is_dropped_and_the_app_sees_nothing(cluster):
    raw = App(on_connect=lambda app: app.transport.write(b'{"op": "create_account"}\n'))
    server, client, pump = connected(cluster, App(), client_app=raw, client_raw=True)
    assert server.received == b"" and server.handshakes == 0
    assert isinstance(server.lost.value, clienttls.TLSError)
    assert client.lost is not None
    assert b"create_account" not in client.received


def test_writes_must_be_bytes(cluster):
    server, client, pump = connected(cluster, App())
    with pytest.raises(TypeError):
        server.transport.write("text")
    assert server.transport.getPeerCertificate() is None  # none asked of clients


def test_a_client_that_never_finishes_its_handshake_is_dropped(cluster):
    silent = App()
    server, client, pump = connected(cluster, App(), client_app=silent, client_raw=True)
    pump.server_clock.advance(clienttls.HANDSHAKE_TIMEOUT_SECONDS - 0.1)
    assert server.lost is None
    pump.server_clock.advance(0.1)
    flush(pump)
    assert isinstance(server.lost.value, clienttls.TLSError)
    assert "no handshake" in str(server.lost.value)
    assert silent.lost is not None


def test_a_finished_handshake_stops_the_clock(cluster):
    server, client, pump = connected(cluster, App())
    assert pump.server_clock.getDelayedCalls() == []
    pump.server_clock.advance(clienttls.HANDSHAKE_TIMEOUT_SECONDS * 10)
    assert server.lost is None and client.lost is None
