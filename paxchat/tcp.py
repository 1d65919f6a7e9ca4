"""TCP options every paxchat connection sets.

Nagle's algorithm holds a small segment back while an earlier one is
unacknowledged, and the receiver delays its ACK by up to 40 ms: on a link
that carries several small messages at once (Accepts, heartbeats, answers
and events), that adds tens of milliseconds to some of them. Every paxchat
connection is request/answer or message traffic where each write is a
whole message, so each goes out at once.
"""

__all__ = ["no_delay"]


def no_delay(transport):
    """Turn Nagle's algorithm off on ``transport`` (through TLS wrappers); False if it has no socket."""
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, NotImplementedError, OSError):
        return False
    return True
