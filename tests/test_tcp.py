"""Every paxchat connection sends each message at once (no Nagle delay); client links probe a silent peer."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from paxchat.tcp import CLIENT_KEEPALIVE, SERVER_KEEPALIVE, KeepAlive, keep_alive, no_delay

from . import netns_support


class RecordingSocket:
    def __init__(self):
        self.options = {}

    def setsockopt(self, level, option, value):
        self.options[(level, option)] = value


class NoDelayTransport(StringTransport):
    def __init__(self):
        super().__init__()
        self.no_delay = None
        self.keep_alive = None
        self.socket = RecordingSocket()

    def setTcpNoDelay(self, enabled):
        self.no_delay = enabled

    def setTcpKeepAlive(self, enabled):
        self.keep_alive = enabled

    def getHandle(self):
        return self.socket


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


def _tcp_options(sock):
    return {name: sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, name))
            for name in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT", "TCP_USER_TIMEOUT")
            if hasattr(socket, name)}


def test_keep_alive_leaves_a_transport_without_a_socket_alone():
    assert keep_alive(StringTransport(), SERVER_KEEPALIVE) is False


def test_the_timings_say_when_a_silent_peer_is_dropped():
    assert SERVER_KEEPALIVE.dead_after == 120
    assert CLIENT_KEEPALIVE.dead_after == 30
    assert KeepAlive(idle=7, interval=2, count=3).dead_after == 13


@pytest_twisted.inlineCallbacks
def test_a_real_tcp_connection_under_a_wrapper_gets_keepalive_and_its_timers():
    from twisted.internet import reactor
    seen = defer.Deferred()
    timing = KeepAlive(idle=7, interval=2, count=3)

    class Server(protocol.Protocol):
        def connectionMade(self):
            # self.transport is the wrapper, as it is under TLS.
            assert isinstance(self.transport, ProtocolWrapper)
            assert keep_alive(self.transport, timing)
            sock = self.transport.transport.getHandle()
            seen.callback((sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), _tcp_options(sock)))
            self.transport.loseConnection()

    port = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        WrappingFactory(protocol.Factory.forProtocol(Server)))
    try:
        client = yield endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            protocol.Factory.forProtocol(protocol.Protocol))
        keepalive, options = yield seen
        assert keepalive != 0
        expected = {"TCP_KEEPIDLE": 7, "TCP_KEEPINTVL": 2, "TCP_KEEPCNT": 3, "TCP_USER_TIMEOUT": 13000}
        assert options == {name: expected[name] for name in options}
        assert "TCP_KEEPIDLE" in options, "Linux has these options; the test machine runs Linux"
        client.transport.loseConnection()
    finally:
        yield port.stopListening()


def test_keep_alive_reaches_the_socket_under_a_tls_layer_whose_handle_is_not_a_socket():
    class TLSLike(ProtocolWrapper):
        def getHandle(self):            # as Twisted's TLS layer: its OpenSSL connection
            return object()

    tcp = NoDelayTransport()
    wrapper = TLSLike(WrappingFactory(protocol.Factory()), protocol.Protocol())
    wrapper.makeConnection(tcp)
    assert keep_alive(wrapper, SERVER_KEEPALIVE)
    assert tcp.keep_alive is True
    assert tcp.socket.options[(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)] == 60


def test_the_server_and_client_protocols_probe_with_their_own_timings():
    from paxchat.client.connection import ChatClient
    from paxchat.server.protocol import ChatProtocol
    from paxchat.server.settings import ServerSettings

    server = ChatProtocol(MemoryReactorClock(), ServerSettings(node_id=1), None, None)
    for proto, timing in ((server, SERVER_KEEPALIVE), (ChatClient(), CLIENT_KEEPALIVE)):
        transport = NoDelayTransport()
        proto.makeConnection(transport)
        assert transport.keep_alive is True, type(proto).__name__
        options = transport.socket.options
        assert options[(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)] == timing.idle
        assert options[(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)] == timing.count


REPO = Path(__file__).resolve().parent.parent


def _vanish(side, *args):
    """Run tests/keepalive_netns.py; its JSON report."""
    done = subprocess.run([sys.executable, "-m", "tests.keepalive_netns", side, *args],
                          cwd=REPO, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def namespaces():
    why = netns_support.unusable()
    if why is not None:
        pytest.skip(why)


@pytest.mark.parametrize("side", ["server", "client"])
def test_a_peer_whose_machine_vanished_is_dropped_after_the_keepalive_time(namespaces, side):
    report = _vanish(side)
    assert report["lost_after"] is not None, f"the {side} vanished and the other end never noticed"
    # Probes (idle 1 s, then 2 x 1 s): not an error at once, not the kernel's 2 h default.
    assert report["dead_after"] - 1 <= report["lost_after"] <= report["dead_after"] + 3, report


def test_without_keepalive_a_peer_that_vanished_is_never_noticed(namespaces):
    # The control: what every client connection was before keepalive.
    report = _vanish("server", "off", "6")
    assert report["lost_after"] is None, report
