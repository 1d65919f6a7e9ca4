"""Is a peer that vanished dropped? As root: ``python -m tests.keepalive_netns server|client [off] [deadline]``.

Two network namespaces joined by a veth pair stand for two machines; a
server listens in one and a client connects from the other, both ends with
keepalive on and short timers. Then one side "vanishes": its end of the
link goes down, so what the other sends is dropped on the way, as when a
machine loses power or network (the sender sees nothing fail). Prints one
JSON line: how long after the cut the surviving end lost the connection,
and why (``lost_after`` null: still open at the deadline). With ``off``
neither end turns keepalive on: the control. The namespaces are removed
whatever happens.
"""

import ctypes
import json
import os
import sys
import time

from twisted.internet import defer, protocol, task

from paxchat.tcp import KeepAlive, keep_alive

from .netns_support import ip, remove

TIMING = KeepAlive(idle=1, interval=1, count=2)
DEADLINE = 20.0
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class Namespaces:
    """Namespaces ``<tag>a`` and ``<tag>b``, 10.77.0.1 and .2 on a veth pair between them."""

    def __init__(self):
        tag = f"pxk{os.getpid()}"
        self.a, self.b = tag + "a", tag + "b"
        self.link = {self.a: tag + "0", self.b: tag + "1"}

    def __enter__(self):
        ip("netns", "add", self.a)
        try:
            ip("netns", "add", self.b)
            ip("link", "add", self.link[self.a], "netns", self.a, "type", "veth",
               "peer", "name", self.link[self.b], "netns", self.b)
            for ns, address in ((self.a, "10.77.0.1/24"), (self.b, "10.77.0.2/24")):
                ip("-n", ns, "addr", "add", address, "dev", self.link[ns])
                ip("-n", ns, "link", "set", self.link[ns], "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        remove(self.a, self.b)

    def cut(self, ns):
        ip("-n", ns, "link", "set", self.link[ns], "down")

    def inside(self, ns, fn):
        """Call ``fn`` with this thread in ``ns``: sockets it makes stay there."""
        home = os.open("/proc/self/ns/net", os.O_RDONLY)
        target = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            try:
                return fn()
            finally:
                if _libc.setns(home, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back")
        finally:
            os.close(home)
            os.close(target)


class End(protocol.Protocol):
    def __init__(self, made, lost, probing):
        self.made, self.lost, self.probing = made, lost, probing

    def connectionMade(self):
        if self.probing:
            assert keep_alive(self.transport, TIMING)
        self.made.callback(None)

    def connectionLost(self, reason):
        self.lost.callback((time.monotonic(), reason.type.__name__))


@defer.inlineCallbacks
def run(reactor, vanishing, probing=True, deadline=DEADLINE):
    with Namespaces() as ns:
        made = {"server": defer.Deferred(), "client": defer.Deferred()}
        lost = {"server": defer.Deferred(), "client": defer.Deferred()}
        server = protocol.ServerFactory.forProtocol(lambda: End(made["server"], lost["server"], probing))
        client = protocol.ClientFactory.forProtocol(lambda: End(made["client"], lost["client"], probing))
        port = ns.inside(ns.a, lambda: reactor.listenTCP(0, server, interface="10.77.0.1"))
        ns.inside(ns.b, lambda: reactor.connectTCP("10.77.0.1", port.getHost().port, client))
        yield defer.gatherResults([made["server"], made["client"]]).addTimeout(5, reactor)
        ns.cut(ns.a if vanishing == "server" else ns.b)
        cut = time.monotonic()
        survivor = "client" if vanishing == "server" else "server"
        report = {"vanished": vanishing, "dead_after": TIMING.dead_after}
        try:
            at, why = yield lost[survivor].addTimeout(deadline, reactor)
            report.update(lost_after=round(at - cut, 2), why=why)
        except defer.TimeoutError:
            report.update(lost_after=None)
        print(json.dumps(report), flush=True)
        port.stopListening()
        for proto_lost in lost.values():
            proto_lost.addErrback(lambda _: None)


if __name__ == "__main__":
    args = sys.argv[1:]
    task.react(run, [args[0], "off" not in args[1:2], float(args[2]) if len(args) > 2 else DEADLINE])
