"""Every paxchat connection sends each message at once (no Nagle delay)."""

import socket

import pytest_twisted
from twisted.internet import defer, endpoints, protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport

from paxchat.tcp import no_delay


class NoDelayTransport(StringTransport):
    def __init__(self):
        super().__init__()
        self.no_delay = None

    def setTcpNoDelay(self, enabled):
        self.no_delay = enabled


def test_a_transport_without_a_socket_is_left_alone():
    assert no_delay(StringTransport()) is False


@pytest_twisted.inlineCallbacks
def test_a_real_tcp_connection_gets_tcp_nodelay():
    from twisted.internet import reactor
    seen = defer.Deferred()

    class Server(protocol.Protocol):
        def connectionMade(self):
            assert no_delay(self.transport)
            sock = self.transport.getHandle()
            seen.callback(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            self.transport.loseConnection()

    port = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        protocol.Factory.forProtocol(Server))
    try:
        client = yield endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            protocol.Factory.forProtocol(protocol.Protocol))
        assert (yield seen) != 0
        client.transport.loseConnection()
    finally:
        yield port.stopListening()


def test_server_client_and_peer_protocols_turn_nagle_off():
    from paxchat.client.connection import ChatClient
    from paxchat.paxos.transport import PeerProtocol, PeerTransport
    from paxchat.server.protocol import ChatProtocol
    from paxchat.server.settings import ServerSettings

    server = ChatProtocol(MemoryReactorClock(), ServerSettings(node_id=1), None, None)
    peers = PeerTransport(MemoryReactorClock(), 1, {2: ("127.0.0.1", 1)}, ("127.0.0.1", 0),
                          None, lambda peer: None, lambda cert: cert, lambda s, f: None)
    for proto in (server, ChatClient(), PeerProtocol(peers)):
        transport = NoDelayTransport()
        proto.makeConnection(transport)
        assert transport.no_delay is True, type(proto).__name__
