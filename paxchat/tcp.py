"""TCP options every paxchat connection sets.

Nagle's algorithm holds a small segment back while an earlier one is
unacknowledged, and the receiver delays its ACK by up to 40 ms: on a link
that carries several small messages at once (Accepts, heartbeats, answers
and events), that adds tens of milliseconds to some of them. Every paxchat
connection is request/answer or message traffic where each write is a
whole message, so each goes out at once.

A peer that vanishes without closing (a laptop that went to sleep, a
machine that lost power, a NAT box that forgot the mapping) leaves the
other side's connection open and silent for ever: a node would keep the
connection, its session registration and its memory; a client idle on that
node would never hear of new messages and never fail over. Client
connections therefore use TCP keepalive with short timers, and a user
timeout of the same length for data that is never acknowledged. Peer links
have their own keepalive frames (L{paxchat.paxos.transport}).
"""

import socket
from dataclasses import dataclass

__all__ = ["CLIENT_KEEPALIVE", "KeepAlive", "SERVER_KEEPALIVE", "keep_alive", "no_delay"]


@dataclass(frozen=True)
class KeepAlive:
    """Silence before the first probe, seconds between probes, unanswered probes before giving up."""

    idle: int
    interval: int
    count: int

    @property
    def dead_after(self) -> int:
        """Seconds of silence after which the connection is dropped."""
        return self.idle + self.interval * self.count


# A node drops a client connection two minutes after the client went silent.
SERVER_KEEPALIVE = KeepAlive(idle=60, interval=15, count=4)
# A client notices a node that went silent within 30 s and moves to another;
# probing every 15 s of quiet also keeps NAT mappings of an idle desktop alive.
CLIENT_KEEPALIVE = KeepAlive(idle=15, interval=5, count=3)


def _tcp_transport(transport):
    """The TCP transport under any protocol wrappers (TLS)."""
    while getattr(transport, "wrappedProtocol", None) is not None and hasattr(transport, "transport"):
        transport = transport.transport
    return transport


def no_delay(transport):
    """Turn Nagle's algorithm off on ``transport`` (through TLS wrappers); False if it has no socket."""
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, NotImplementedError, OSError):
        return False
    return True


def keep_alive(transport, timing: KeepAlive):
    """Turn TCP keepalive on with ``timing`` (through TLS wrappers); False if there is no socket.

    Options the platform lacks are skipped (``TCP_USER_TIMEOUT`` is Linux
    only): keepalive then runs with the system's own timers for them.
    """
    tcp = _tcp_transport(transport)
    try:
        tcp.setTcpKeepAlive(True)
        sock = tcp.getHandle()
    except (AttributeError, NotImplementedError, OSError):
        return False
    for name, value in (("TCP_KEEPIDLE", timing.idle), ("TCP_KEEPINTVL", timing.interval),
                        ("TCP_KEEPCNT", timing.count),
                        ("TCP_USER_TIMEOUT", timing.dead_after * 1000)):
        option = getattr(socket, name, None)
        if option is None:
            continue
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
        except OSError:         # a platform that has the name but refuses the value
            pass
    return True
