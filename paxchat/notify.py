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

from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger

__all__ = ["WatchdogService", "notify", "ready", "status", "stopping", "watchdog_interval"]

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


def watchdog_interval(environ=None):
    """Seconds between WATCHDOG=1 pings (half of ``WatchdogSec=``), or None if not asked.

    systemd sets ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, the process it
    means) when the unit has ``WatchdogSec=``.
    """
    environ = os.environ if environ is None else environ
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = environ.get("WATCHDOG_PID", "")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2e6


class WatchdogService(service.Service):
    """Pings systemd's watchdog from the reactor, so a wedged reactor gets the node restarted.

    The ping is a reactor timer: if the reactor stops turning (a blocking
    call, a deadlock), pings stop and systemd kills and restarts the node
    after ``WatchdogSec=``. Does nothing without ``$WATCHDOG_USEC``.
    """

    name = "systemd-watchdog"

    def __init__(self, reactor, environ=None):
        self._reactor = reactor
        self._environ = environ
        self._loop = None

    def startService(self):
        super().startService()
        interval = watchdog_interval(self._environ)
        if interval is None:
            return
        self._loop = task.LoopingCall(notify, "WATCHDOG=1", environ=self._environ)
        self._loop.clock = self._reactor
        self._loop.start(interval, now=True)

    def stopService(self):
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
