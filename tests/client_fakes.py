"""In-memory stand-ins for paxchat nodes, for client tests without sockets.

``FakeNodes`` sits on a MemoryReactorClock: each connection attempt the
client makes (``reactor.tcpClients``) can be accepted, refused or left
hanging; an accepted one is a ``FakeConnection`` whose requests the test reads
and answers line by line, as a real node would.
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from paxchat.client.errors import CertificateRefused


class FakeConnection:
    """One accepted client connection: read its requests, answer them, drop it."""

    def __init__(self, port, protocol, transport):
        self.port = port
        self.protocol = protocol
        self.transport = transport
        self._read = 0
        self.log = []

    def requests(self):
        """The requests written since the last call, parsed."""
        data = self.transport.value()
        new, self._read = data[self._read:], len(data)
        out = [json.loads(line) for line in new.split(b"\n") if line.strip()]
        self.log.extend(out)
        return out

    def send(self, obj):
        self.protocol.dataReceived(json.dumps(obj).encode() + b"\n")

    def answer(self, request, result=None):
        self.send({"id": request["id"], "ok": True, "result": result or {}})

    def fail(self, request, code, message="refused"):
        self.send({"id": request["id"], "ok": False, "error": {"code": code, "message": message}})

    def push(self, event):
        self.send(event)

    def drop(self):
        self.protocol.connectionLost(Failure(ConnectionLost("gone")))

    def refuse_certificate(self, chain=()):
        """End the connection as client TLS does when the node's certificate fails verification."""
        self.protocol.connectionLost(Failure(CertificateRefused("certificate verify failed", chain)))

    def handshake(self, node=1, leader=1, resume_user=None):
        """Answer the client's hello (and resume) the way a healthy node would."""
        [hello] = self.requests()
        assert hello["op"] == "hello", hello
        self.answer(hello, {"node": node, "leader": leader, "nodes": [], "protocol": 1})
        if resume_user is not None:
            [resume] = self.requests()
            assert resume["op"] == "resume", resume
            self.answer(resume, {"username": resume_user, "unread": 0})


class FakeNodes:
    """Accept or refuse the connection attempts a client made on a MemoryReactorClock."""

    def __init__(self, reactor):
        self.reactor = reactor
        self._handled = 0

    def pending_ports(self):
        return [c[1] for c in self.reactor.tcpClients[self._handled:]]

    def _next(self):
        assert len(self.reactor.tcpClients) > self._handled, "the client made no new connection attempt"
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[self._handled]
        connector = self.reactor.connectors[self._handled]
        self._handled += 1
        return host, port, factory, connector

    def accept(self) -> FakeConnection:
        host, port, factory, _ = self._next()
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        protocol.makeConnection(transport)
        return FakeConnection(port, protocol, transport)

    def refuse(self) -> int:
        host, port, factory, connector = self._next()
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
        return port
