"""Tell systemd how the node is doing: the sd_notify protocol, no dependency.

Under ``Type=notify`` systemd starts the node with ``$NOTIFY_SOCKET`` set and
waits for ``READY=1`` before it counts the unit as started, so
``systemctl start`` returns (and units ordered after ours start) only once
clients and peers can connect. The protocol is one datagram of
``KEY=value`` lines on a unix socket; a name starting with ``@`` is in the
abstract namespace. Without ``$NOTIFY_SOCKET`` (a node run by hand, tests)
every call does nothing.
"""

import os
import socket

from twisted.logger import Logger

__all__ = ["notify", "ready", "status", "stopping"]

log = Logger()


def _address(environ):
    """The socket address of $NOTIFY_SOCKET, or None when it is not set or not usable."""
    name = environ.get("NOTIFY_SOCKET", "")
    if name.startswith("@"):
        return "\0" + name[1:]
    if name.startswith("/"):
        return name
    if name:
        log.warn("ignoring NOTIFY_SOCKET={name!r}: only unix socket paths and @abstract names "
                 "are supported", name=name)
    return None


def notify(*assignments, environ=None):
    """Send ``KEY=value`` lines to systemd in one datagram; True if sent.

    Never blocks and never raises: a full or missing socket is logged, since
    a node must go on serving even if systemd cannot be told.
    """
    address = _address(os.environ if environ is None else environ)
    if address is None:
        return False
    message = "\n".join(assignments).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.connect(address)
            sock.send(message)
    except OSError as e:
        log.warn("cannot tell systemd {what}: {error}",
                 what=" ".join(a.split("=", 1)[0] for a in assignments), error=e)
        return False
    return True


def ready(status_text=None, environ=None):
    """READY=1: start-up is complete (systemctl start returns)."""
    lines = ["READY=1"] + ([_status_line(status_text)] if status_text else [])
    return notify(*lines, environ=environ)


def stopping(status_text=None, environ=None):
    """STOPPING=1: the node is shutting down on purpose."""
    lines = ["STOPPING=1"] + ([_status_line(status_text)] if status_text else [])
    return notify(*lines, environ=environ)


def status(status_text, environ=None):
    """STATUS=...: one line that ``systemctl status`` shows."""
    return notify(_status_line(status_text), environ=environ)


def _status_line(text):
    return "STATUS=" + " ".join(str(text).split())
