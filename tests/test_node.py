"""NodeService: one node's state, worker, log and client listener, on the real reactor."""

import errno
import os
import sqlite3
import stat

import pytest
import pytest_twisted
from twisted.application.service import IService, Service
from twisted.internet import defer, error, protocol
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from paxchat import config as configmod
from paxchat import tls
from paxchat.devcluster import write_local_config
from paxchat.metrics import node_status
from paxchat.node import CLIENT_BACKLOG, STATE_FILE, NodeService
from paxchat.state.chat import APPLY_VERSION, ChatState, NewerThanThisBuild

from .cluster_support import wait_until
from .ops_support import connect, reactor_


def make_cluster(tmp_path, client_tls):
    path = write_local_config(tmp_path, nodes=2, client_tls="on" if client_tls else "off",
                              bcrypt_cost=4)
    cfg = configmod.load(path)
    tls.make_cluster_certs(cfg)  # peer links are always TLS
    return cfg


@pytest_twisted.inlineCallbacks
def run_session(cfg, node_id, body):
    # Every node of the cluster runs, so that writes have a quorum.
    nodes = {n: NodeService(cfg, n, reactor_()) for n in cfg.nodes}
    for each in nodes.values():
        each.startService()
    client = None
    try:
        client = yield connect(cfg, node_id)
        yield body(nodes[node_id], client)
    finally:
        if client is not None:
            client.transport.loseConnection()
        for each in nodes.values():
            yield each.stopService()


@pytest.mark.parametrize("client_tls", [True, False], ids=["tls", "tcp"])
@pytest_twisted.inlineCallbacks
def test_node_serves_clients_and_keeps_state_across_restarts(tmp_path, client_tls):
    cfg = make_cluster(tmp_path, client_tls)

    @defer.inlineCallbacks
    def first(node, client):
        assert IService.providedBy(node) and node.running
        assert node.port.backlog == CLIENT_BACKLOG    # clients failing over arrive together
        hello = yield client.request("hello")
        assert hello["result"]["node"] == 2
        assert [n["id"] for n in hello["result"]["nodes"]] == [1, 2]
        created = yield client.request("create_account", username="alice", password="password1")
        assert created["ok"], created
        # Both builds know this apply version, so the leader moved the cluster to it.
        yield wait_until(reactor_(), lambda: node.versions.cluster_version == APPLY_VERSION, 10,
                         "the cluster's apply version")
        assert node_status(node)["apply_version"] == {
            "build": APPLY_VERSION, "cluster": APPLY_VERSION, "peers": {"1": APPLY_VERSION}}

    yield run_session(cfg, 2, first)
    data_dir = cfg.node_data_dir(2)
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert (data_dir / STATE_FILE).is_file()

    @defer.inlineCallbacks
    def second(node, client):
        again = yield client.request("create_account", username="alice", password="password1")
        assert again["error"]["code"] == "username_taken"

    yield run_session(cfg, 2, second)


@pytest_twisted.inlineCallbacks
def test_stop_closes_the_listener_and_the_state(tmp_path):
    cfg = make_cluster(tmp_path, client_tls=False)
    node = NodeService(cfg, 1, reactor_())
    node.startService()
    worker = node.worker
    yield node.stopService()
    assert not node.running and node.port is None and node.log is None
    assert not worker.running
    with pytest.raises(error.ConnectionRefusedError):
        yield connect(cfg, 1)


@pytest_twisted.inlineCallbacks
def test_port_in_use_fails_start_and_releases_everything(tmp_path):
    cfg = make_cluster(tmp_path, client_tls=False)
    address = cfg.node(1).client
    squatter = reactor_().listenTCP(address.port, protocol.Factory(), interface=address.host)
    try:
        node = NodeService(cfg, 1, reactor_())
        with pytest.raises(error.CannotListenError):
            node.startService()
        assert not node.running and node.worker is None and node.state is None
        # Not before what the failed start opened is closed: two logs on one
        # directory would write over each other.
        if not node.closing.called:
            with pytest.raises(RuntimeError, match="still closing"):
                node.startService()
        yield node.closing
        # Closed, so another start on the same data dir works.
        yield squatter.stopListening()
        squatter = None
        node.startService()
        yield node.stopService()
    finally:
        if squatter is not None:
            yield squatter.stopListening()


@pytest_twisted.inlineCallbacks
def test_a_damaged_log_stops_the_start_before_any_port_is_bound(tmp_path):
    from paxchat.paxos.store import CorruptLogError
    from .test_plugin import damage_the_log
    path = write_local_config(tmp_path, nodes=1, client_tls="off", bcrypt_cost=4)
    cfg = configmod.load(path)
    damage_the_log(cfg.node_data_dir(1) / "paxos")
    node = NodeService(cfg, 1, reactor_())
    with pytest.raises(CorruptLogError) as info:
        node.startService()
    assert not node.running and node.port is None and node.log is None
    with pytest.raises(error.ConnectionRefusedError):
        yield connect(cfg, 1)
    # With no other node to rebuild from, a one-node cluster is restored from a backup.
    assert str(info.value).endswith(
        f"refusing to start. Move {cfg.node_data_dir(1)} aside and run `paxchat-admin --config"
        f" {cfg.path} restore BACKUP --node 1` with the latest backup, then start the node"
        ' (docs/operations.md, "Backups")')


@pytest_twisted.inlineCallbacks
def test_a_state_the_node_cannot_write_stops_the_start_without_rebuild_advice(
        tmp_path, monkeypatch):
    from paxchat.state import kv
    from paxchat.state.kv import CorruptStore, StoreError
    from .test_kv import read_only
    cfg = make_cluster(tmp_path, client_tls=False)
    cfg.node_data_dir(1).mkdir(parents=True)
    ChatState.open(str(cfg.node_data_dir(1) / STATE_FILE)).close()
    monkeypatch.setattr(kv, "_connect", read_only)       # a read-only disk, or another owner
    node = NodeService(cfg, 1, reactor_())
    with pytest.raises(StoreError) as info:
        node.startService()
    yield node.closing
    assert not node.running and node.port is None
    # Its data is whole: fix the disk or the rights, do not move it aside and rebuild.
    assert not isinstance(info.value, CorruptStore)
    assert str(info.value).startswith(
        f"cannot use state database {cfg.node_data_dir(1) / STATE_FILE}: attempt to write a"
        " readonly database (the node's user must be able to write it")
    assert "rebuild" not in str(info.value)


@pytest_twisted.inlineCallbacks
def test_a_node_on_a_full_disk_does_not_start(tmp_path, monkeypatch):
    import os
    from paxchat.paxos.store import StorageError
    cfg = make_cluster(tmp_path, client_tls=False)
    node = NodeService(cfg, 1, reactor_())
    node.startService()                   # made its data directory
    yield node.stopService()
    real = os.statvfs

    def disk_with(free):
        def statvfs(path):
            found = real(path)
            return os.statvfs_result((found.f_bsize, 4096, found.f_blocks, found.f_bfree,
                                      free // 4096, *found[5:]))
        return statvfs

    # Its last start filled it: started again as it is, it would join, be sent
    # what it missed and stop again at once, as often as systemd restarts it.
    monkeypatch.setattr(os, "statvfs", disk_with(64 << 10))
    node = NodeService(cfg, 1, reactor_())
    with pytest.raises(StorageError) as info:
        node.startService()
    yield node.closing
    assert not node.running and node.port is None and node.log is None
    assert str(info.value) == (
        f"the disk of {cfg.node_data_dir(1)} is full (64 KiB free; a node needs 1024 KiB at"
        " least): free some space or grow the disk, then start the node; it catches up from"
        " the others")
    monkeypatch.setattr(os, "statvfs", disk_with(1 << 20))      # space freed: it starts
    node.startService()
    yield node.stopService()


class _ReactorKeptRunning:
    """The real reactor, except that a node's fatal stop is noted instead of done:
    it would stop the tests' reactor and end the process (``NodeService.fatal``)."""

    running = True

    def __init__(self, reactor):
        self._reactor = reactor
        self.stopped = defer.Deferred()

    def __getattr__(self, name):
        return getattr(self._reactor, name)

    def addSystemEventTrigger(self, phase, event, fn, *args, **kwargs):
        if (phase, event) == ("after", "shutdown"):
            return None           # the node's exit with status 1: not in the tests' process
        return self._reactor.addSystemEventTrigger(phase, event, fn, *args, **kwargs)

    def stop(self):
        self.stopped.callback(None)


class _ShutdownPlayed(_ReactorKeptRunning):
    """As _ReactorKeptRunning, and the shutdown triggers the node adds are kept here,
    not on the tests' reactor: a test plays the process's stop (SIGTERM) by calling
    the ``before`` ones, as the reactor would before it stops the application."""

    def __init__(self, reactor):
        super().__init__(reactor)
        self.triggers = {"before": [], "after": []}

    def addSystemEventTrigger(self, phase, event, fn, *args, **kwargs):
        if event == "shutdown" and phase in self.triggers:
            self.triggers[phase].append(fn)
            return ("played", phase, fn)
        return self._reactor.addSystemEventTrigger(phase, event, fn, *args, **kwargs)

    def removeSystemEventTrigger(self, handle):
        if isinstance(handle, tuple) and handle[0] == "played":
            self.triggers[handle[1]].remove(handle[2])
        else:
            self._reactor.removeSystemEventTrigger(handle)


@pytest.mark.parametrize("when", ["as the stop begins", "as it closes"])
@pytest_twisted.inlineCallbacks
def test_a_disk_failure_while_the_process_stops_on_purpose_ends_it_with_status_1(tmp_path, when):
    """systemctl stop of a node whose disk fails meanwhile: the stop goes on, and the
    process ends with status 1, so systemd shows the unit failed, not stopped as asked."""
    from paxchat import node as nodemod
    cfg = configmod.load(write_local_config(tmp_path, nodes=1, client_tls="off", bcrypt_cost=4))
    reactor = _ShutdownPlayed(reactor_())
    node = NodeService(cfg, 1, reactor)
    node.startService()
    for trigger in list(reactor.triggers["before"]):
        trigger()                                   # SIGTERM: the reactor shuts down
    if when == "as the stop begins":
        assert node.running
        node.fatal("the Paxos log cannot be written: the disk is full")
    yield node.stopService()
    if when == "as it closes":
        node.fatal("the Paxos log cannot be written: the disk is full")
    assert reactor.triggers["after"] == [nodemod._exit_failed]
    assert not reactor.stopped.called               # stopping already: not asked again


@pytest_twisted.inlineCallbacks
def test_a_node_its_owner_stops_as_a_service_leaves_the_process_alone(tmp_path):
    cfg = configmod.load(write_local_config(tmp_path, nodes=1, client_tls="off", bcrypt_cost=4))
    reactor = _ShutdownPlayed(reactor_())
    node = NodeService(cfg, 1, reactor)
    node.startService()
    assert len(reactor.triggers["before"]) == 1
    yield node.stopService()
    assert reactor.triggers["before"] == []         # nothing left behind on the reactor
    node.fatal("the Paxos log cannot be written: the disk is full")
    assert reactor.triggers["after"] == [] and not reactor.stopped.called


def _disk_full_in_the_log(node):
    def write(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    node.log.store._files._write = write


def _disk_full_in_the_state(node):
    def create_account(command):
        raise sqlite3.OperationalError("database or disk is full")
    node.state._handlers["create_account"] = create_account


@pytest.mark.parametrize("fill, said", [
    (_disk_full_in_the_log, "paxchat node 1 is stopping: the Paxos log cannot be written:"
                            " {data}/paxos: the disk is full"),
    (_disk_full_in_the_state, "paxchat node 1 is stopping: the state could not apply the log:"
                              " state database {data}/state.sqlite3: database or disk is full"),
], ids=["paxos-log", "state"])
@pytest_twisted.inlineCallbacks
def test_a_node_whose_disk_fills_says_so_once_and_stops(tmp_path, fill, said):
    """One line in the journal, with the disk's answer (docs/operations.md, A full
    disk), not the store's, the replicated log's and the node's in turn."""
    path = write_local_config(tmp_path, nodes=1, client_tls="off", bcrypt_cost=4)
    cfg = configmod.load(path)
    reactor = _ReactorKeptRunning(reactor_())
    node = NodeService(cfg, 1, reactor)
    node.startService()
    client = None
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        client = yield connect(cfg, 1)
        fill(node)
        answer = yield client.request("create_account", username="alice", password="password1")
        yield reactor.stopped                    # the node asked for its process to end
        assert answer["error"]["code"] == "unavailable", answer      # nothing acknowledged
    finally:
        globalLogPublisher.removeObserver(events.append)
        if client is not None:
            client.transport.loseConnection()
        yield node.stopService()
    # Errors and worse: a loaded machine may add a warning of a slow fsync.
    loud = [formatEvent(e) for e in events if e.get("log_level") >= LogLevel.error]
    assert loud == [said.format(data=cfg.node_data_dir(1))]


@pytest_twisted.inlineCallbacks
def test_a_taken_peer_port_fails_the_start_and_closes_the_log_it_recovered(tmp_path):
    from paxchat.paxos.store import locked
    cfg = make_cluster(tmp_path, client_tls=False)
    address = cfg.node(1).peer
    squatter = reactor_().listenTCP(address.port, protocol.Factory(), interface=address.host)
    try:
        node = NodeService(cfg, 1, reactor_())
        with pytest.raises(error.CannotListenError):
            node.startService()
        assert not node.running and node.log is None
        yield node.closing
        with locked(cfg.node_data_dir(1) / "paxos"):      # no process holds the log any more
            pass
    finally:
        yield squatter.stopListening()


@pytest_twisted.inlineCallbacks
def test_the_lineage_stamp_reaches_the_peer_links_and_a_damaged_one_stops_the_start(tmp_path):
    from paxchat.lineage import LINEAGE_FILE, LineageError, write_lineage
    cfg = make_cluster(tmp_path, client_tls=False)
    data_dir = cfg.node_data_dir(1)
    data_dir.mkdir(parents=True, mode=0o700)
    write_lineage(data_dir, b"ab" * 32)
    node = NodeService(cfg, 1, reactor_())
    node.startService()
    try:
        assert node.log.transport.lineage == b"ab" * 32
    finally:
        yield node.stopService()
    (data_dir / LINEAGE_FILE).write_bytes(b"garbage\n")
    node = NodeService(cfg, 1, reactor_())
    with pytest.raises(LineageError, match="damaged"):
        node.startService()
    assert not node.running and node.state is None and node.log is None


@pytest_twisted.inlineCallbacks
def test_a_cluster_ini_that_lists_other_nodes_than_the_data_records_stops_the_start(tmp_path):
    from paxchat.lineage import MEMBERS_FILE, LineageError
    cfg = make_cluster(tmp_path, client_tls=False)
    node = NodeService(cfg, 1, reactor_())
    node.startService()
    yield node.stopService()
    assert (cfg.node_data_dir(1) / MEMBERS_FILE).read_text() == "1 2\n"
    # The same data under a cluster.ini with a third node: refused, nothing opened.
    grown = configmod.load(write_local_config(tmp_path, nodes=3, client_tls="off", bcrypt_cost=4))
    assert grown.node_data_dir(1) == cfg.node_data_dir(1)
    node = NodeService(grown, 1, reactor_())
    with pytest.raises(LineageError, match="belongs to a cluster of nodes 1, 2, but .* lists nodes 1, 2, 3"):
        node.startService()
    assert not node.running and node.state is None and node.log is None and node.port is None
    assert (cfg.node_data_dir(1) / MEMBERS_FILE).read_text() == "1 2\n"


@pytest_twisted.inlineCallbacks
def test_a_node_of_an_older_build_holds_settings_back_until_it_is_upgraded(tmp_path):
    """A rolling upgrade through the real log: node 2's build says an older apply
    version, so set_settings waits; once node 2 restarts on this build, the leader
    moves the cluster and both nodes apply it."""
    cfg = make_cluster(tmp_path, client_tls=False)
    nodes = {n: NodeService(cfg, n, reactor_()) for n in cfg.nodes}
    nodes[2].versions.version = 0            # as a build before settings would stand
    client = None
    try:
        for node in nodes.values():
            node.startService()
        yield wait_until(reactor_(), lambda: nodes[1].versions.status()["peers"] == {"2": 0}, 10,
                         "node 2's build, over the peer link")
        client = yield connect(cfg, 1)
        assert (yield client.request("create_account", username="alice", password="password1"))["ok"]
        assert (yield client.request("login", username="alice", password="password1"))["ok"]
        refused = yield client.request("set_settings", read_receipts=False)
        assert refused["error"]["code"] == "upgrade_in_progress"
        assert [n.versions.cluster_version for n in nodes.values()] == [0, 0]
        yield nodes[2].stopService()
        yield nodes[2].closing
        nodes[2].versions.version = APPLY_VERSION     # upgraded
        nodes[2].startService()
        yield wait_until(reactor_(), lambda: nodes[1].versions.cluster_version == APPLY_VERSION, 10,
                         "the cluster's apply version")
        answer = yield client.request("set_settings", read_receipts=False)
        assert answer["result"] == {"read_receipts": False}, answer
        other = yield connect(cfg, 2)
        try:
            assert (yield other.request("login", username="alice", password="password1"))["ok"]
            assert (yield other.request("get_settings"))["result"] == {"read_receipts": False}
        finally:
            other.transport.loseConnection()
    finally:
        if client is not None:
            client.transport.loseConnection()
        for node in nodes.values():
            if node.running:
                yield node.stopService()


@pytest_twisted.inlineCallbacks
def test_a_state_of_a_newer_apply_version_stops_the_start(tmp_path):
    """A node downgraded after the cluster moved on must not apply (or answer from) what
    it would read otherwise: it stops before anything is served."""
    cfg = make_cluster(tmp_path, client_tls=False)
    node = NodeService(cfg, 1, reactor_())
    node.startService()
    yield node.stopService()
    state = ChatState.open(str(cfg.node_data_dir(1) / STATE_FILE))
    with state.kv.transaction():
        state.kv.put("#version", str(APPLY_VERSION + 1).encode())
    state.close()
    node = NodeService(cfg, 1, reactor_())
    with pytest.raises(NewerThanThisBuild, match=f"apply version is {APPLY_VERSION + 1}"):
        node.startService()
    assert not node.running and node.log is None and node.port is None
    yield node.closing
    assert node.state is None


@pytest_twisted.inlineCallbacks
def test_nodes_keep_their_data_identity_and_remember_each_others(tmp_path):
    from twisted.internet import task

    from paxchat.lineage import read_or_make_identity, read_peer_identities
    cfg = make_cluster(tmp_path, client_tls=False)
    nodes = {n: NodeService(cfg, n, reactor_()) for n in cfg.nodes}
    for node in nodes.values():
        node.startService()
    try:
        identities = {n: node.identity for n, node in nodes.items()}
        assert all(len(i) == 32 for i in identities.values()) and identities[1] != identities[2]
        deadline = reactor_().seconds() + 10
        while read_peer_identities(cfg.node_data_dir(1)) != {2: identities[2]}:
            assert reactor_().seconds() < deadline, "node 1 did not write node 2's identity"
            yield task.deferLater(reactor_(), 0.05, lambda: None)
    finally:
        for node in nodes.values():
            yield node.stopService()
    assert read_or_make_identity(cfg.node_data_dir(1), 1) == identities[1]      # kept


def test_a_file_a_reload_refuses_is_to_be_fixed_when_a_restart_would_refuse_it_too(tmp_path):
    from twisted.logger import globalLogPublisher
    cfg = make_cluster(tmp_path, client_tls=False)
    node = NodeService(cfg, 1, reactor_())
    good = cfg.path.read_text()
    said = []

    def refused(event):
        if event.get("log_format", "").startswith("node {node_id} did not reload"):
            said.append(event["then"])
    globalLogPublisher.addObserver(refused)
    try:
        for text in (good.replace("bcrypt_cost = 4", "bcrypt_cots = 4"),          # a typo
                     good[:good.index("[node.2]")],                              # [node.2] gone
                     good.replace("bcrypt_cost = 4", "bcrypt_cost = 5")):        # a setting
            cfg.path.write_text(text)
            assert node.reload() is False
    finally:
        globalLogPublisher.removeObserver(refused)
    assert said == [
        "fix the file: a restart would refuse it too",
        "put the [node.N] sections back: a restart would refuse them too, and the nodes of a"
        ' cluster change by a restore of every node (docs/operations.md, "Changing the nodes of a'
        ' cluster")',
        "a restart takes it"]
    assert node.config is cfg                            # it goes on as it was


def test_missing_certificates_stop_the_node_before_it_starts(tmp_path):
    path = write_local_config(tmp_path, nodes=1, client_tls="on")
    with pytest.raises(tls.CertificateFilesError, match="paxchat-certs"):
        NodeService(configmod.load(path), 1, reactor_())


def test_a_node_does_not_start_on_another_nodes_certificate(tmp_path):
    import shutil
    cfg = make_cluster(tmp_path, client_tls=False)     # peer links alone need it
    for suffix in ("pem", "key"):
        shutil.copy(cfg.tls_dir / f"node-2.{suffix}", cfg.tls_dir / f"node-1.{suffix}")
    with pytest.raises(tls.CertificateFilesError, match="is node 2's certificate, not node 1's"):
        NodeService(cfg, 1, reactor_())


@pytest_twisted.inlineCallbacks
def test_a_certificate_that_expires_within_a_month_is_said_at_start(tmp_path):
    import datetime
    cfg = make_cluster(tmp_path, client_tls=False)
    node = NodeService(cfg, 1, reactor_())
    assert node.certificate_expires > datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=365)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        for days_left in (400, 12):
            node.certificate_expires = (datetime.datetime.now(datetime.timezone.utc)
                                        + datetime.timedelta(days=days_left, hours=1))
            node.startService()
            yield node.stopService()
    finally:
        globalLogPublisher.removeObserver(events.append)
    said = [formatEvent(e) for e in events if "certificate" in formatEvent(e)
            and e.get("log_level") == LogLevel.warn]
    assert said == [f"node 1's certificate {cfg.node_cert_path(1)} expires on"
                    f" {node.certificate_expires:%Y-%m-%d} (in 12 days): make it a new one"
                    " (docs/operations.md, Certificates)"]


def test_unknown_node(tmp_path):
    cfg = make_cluster(tmp_path, client_tls=False)
    with pytest.raises(configmod.ConfigError, match="no \\[node.3\\]"):
        NodeService(cfg, 3, reactor_())


@pytest_twisted.inlineCallbacks
def test_the_command_log_is_one_replaceable_method(tmp_path):
    cfg = make_cluster(tmp_path, client_tls=False)
    made = []

    class Node(NodeService):
        def make_command_log(self, worker):
            log = super().make_command_log(worker)
            made.append((log, worker))
            return log

    node = Node(cfg, 1, reactor_())
    node.startService()
    try:
        assert made == [(node.log, node.worker)]
        assert node.log.node_id == 1
        assert node.factory.log is node.log
    finally:
        yield node.stopService()


class Recorder(Service):
    def __init__(self, events):
        self.events = events

    def startService(self):
        super().startService()
        self.events.append("child started")

    def stopService(self):
        super().stopService()
        self.events.append("child stopped")


@pytest_twisted.inlineCallbacks
def test_log_services_start_before_clients_and_stop_before_the_log(tmp_path):
    cfg = make_cluster(tmp_path, client_tls=False)
    events = []

    class Node(NodeService):
        def make_command_log(self, worker):
            log = super().make_command_log(worker)
            stop = log.stop

            def recorded_stop():
                events.append("log stopped")
                return stop()          # lets go of the log's lock for the next start
            log.stop = recorded_stop
            Recorder(events).setServiceParent(self)
            return log

    node = Node(cfg, 1, reactor_())
    node.startService()
    assert events == ["child started"] and node.port is not None
    yield node.stopService()
    assert events == ["child started", "child stopped", "log stopped"]

    # A start that fails after the children started stops them again.
    events.clear()
    address = cfg.node(1).client
    squatter = reactor_().listenTCP(address.port, protocol.Factory(), interface=address.host)
    try:
        node = Node(cfg, 1, reactor_())
        with pytest.raises(error.CannotListenError):
            node.startService()
        assert events == ["child started", "child stopped", "log stopped"]
    finally:
        yield squatter.stopListening()
