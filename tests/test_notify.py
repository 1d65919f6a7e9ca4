"""sd_notify: READY=1 and STOPPING=1 reach a real unix datagram socket, as systemd's does."""

import os
import socket

import pytest
import pytest_twisted
from twisted.internet import defer, task

from paxchat import notify
from tests.cluster_support import cluster_factory, wait_until  # noqa: F401 (fixture)


@pytest.fixture
def listener(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield str(path), sock
    sock.close()


def test_ready_reaches_the_socket(listener):
    path, sock = listener
    assert notify.ready("serving clients on 127.0.0.1:7101", environ={"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving clients on 127.0.0.1:7101"


def test_stopping_and_status(listener):
    path, sock = listener
    env = {"NOTIFY_SOCKET": path}
    assert notify.stopping(environ=env)
    assert sock.recv(4096) == b"STOPPING=1"
    assert notify.status("two\nlines", environ=env)
    assert sock.recv(4096) == b"STATUS=two lines"


def test_reads_the_process_environment(listener, monkeypatch):
    path, sock = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify.ready()
    assert sock.recv(4096) == b"READY=1"


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX") or os.uname().sysname != "Linux",
                    reason="abstract unix socket names are a Linux feature")
def test_abstract_namespace():
    name = f"paxchat-test-{os.getpid()}-{os.urandom(4).hex()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert notify.ready(environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"READY=1"


def test_no_socket_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.ready() is False
    assert notify.stopping(environ={}) is False
    assert notify.notify("READY=1", environ={"NOTIFY_SOCKET": ""}) is False


def test_unusable_socket_is_logged_not_raised(tmp_path):
    from twisted.logger import LogLevel, globalLogPublisher
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert notify.ready(environ={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")}) is False
        assert notify.ready(environ={"NOTIFY_SOCKET": "vsock:2:1234"}) is False
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [e for e in events if e.get("log_namespace") == "paxchat.notify"]
    assert len(warnings) == 2 and all(e["log_level"] == LogLevel.warn for e in warnings)


def test_watchdog_interval():
    assert notify.watchdog_interval({}) is None
    assert notify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert notify.watchdog_interval({"WATCHDOG_USEC": "30000000",
                                     "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert notify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert notify.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def test_watchdog_pings_on_the_reactor(listener):
    path, sock = listener
    clock = task.Clock()
    watchdog = notify.WatchdogService(clock, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    watchdog.startService()
    assert sock.recv(100) == b"WATCHDOG=1"
    clock.advance(1.0)
    assert sock.recv(100) == b"WATCHDOG=1"
    watchdog.stopService()
    clock.advance(5.0)
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(100)


def test_no_watchdog_without_systemd_asking():
    clock = task.Clock()
    watchdog = notify.WatchdogService(clock, {})
    watchdog.startService()
    assert not clock.getDelayedCalls()
    watchdog.stopService()


@pytest_twisted.inlineCallbacks
def test_a_twistd_node_tells_systemd_it_is_ready_and_stopping(cluster_factory, tmp_path,  # noqa: F811
                                                              monkeypatch):
    from twisted.internet import protocol, reactor

    received = []
    ready = defer.Deferred()

    class Systemd(protocol.DatagramProtocol):
        def datagramReceived(self, data, address):
            received.append(data)
            if data.startswith(b"READY=1") and not ready.called:
                ready.callback(data)

    path = str(tmp_path / "notify.sock")
    port = reactor.listenUNIXDatagram(path, Systemd())
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a ping every 0.2 s
        cluster = cluster_factory(nodes=1)
        cluster.start(1)
        message = yield ready.addTimeout(60, reactor)
        assert message.startswith(b"READY=1\nSTATUS=node 1 serving clients on ")
        yield cluster.wait_ready(1)  # READY=1 came once it could be served
        yield wait_until(reactor, lambda: b"WATCHDOG=1" in received, 10, "a watchdog ping")
        yield cluster.stop_gracefully(1)
        yield wait_until(reactor, lambda: any(m.startswith(b"STOPPING=1") for m in received),
                         10, "STOPPING=1")
    finally:
        yield port.stopListening()
