"""NodeService: one paxchat node wired from its config.

State on disk, the state worker thread, the command log (the Multi-Paxos
replicated log, with its peer links and ticker) and the client listener,
started in that order and stopped in reverse, so no client request reaches
a log or state that is already gone.
"""

import datetime
import os
import sys

from twisted.application import service
from twisted.internet import defer, endpoints, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from paxchat import clienttls, config as configmod, notify, tls
from paxchat.lineage import (check_members, clear_rebuilding, describe, is_rebuilding,
                             read_lineage, read_or_make_identity, read_peer_identities,
                             write_lineage, write_peer_identities)
from paxchat.metrics import MetricsService, find_service
from paxchat.paxos.store import CorruptLogError, DurableLog, StorageError, locked
from paxchat.replicatedlog import ReplicatedLog
from paxchat.server.factory import ChatServerFactory
from paxchat.server.settings import ServerSettings
from paxchat.state.chat import ChatState
from paxchat.state.kv import CorruptStore
from paxchat.state.worker import StateWorker
from paxchat.upgrades import ApplyVersionKeeper

log = Logger()

STATE_FILE = "state.sqlite3"
# The reason a planned stop gives clients in its node_stopping event.
STOPPING_REASON = "shutdown"
# Connections the kernel queues for the client port until the node accepts
# them. The clients of a node that died all come to the others at once; at
# Twisted's default of 50 the kernel dropped the handshakes past it, and
# those clients waited 1-3 s for their SYN to be sent again. (Linux caps it
# at net.core.somaxconn, 4096 by default.)
CLIENT_BACKLOG = 1024
# Free space a node needs on its data directory's disk to start. A node whose
# disk filled stops (its log cannot be written); started again on a disk still
# as full, it would join the cluster, be sent what it missed, and stop again
# within a second, as often as its supervisor restarts it.
MIN_FREE_BYTES = 1 << 20
# A node whose certificate expires within this long says so at each start.
CERTIFICATE_WARNING = datetime.timedelta(days=30)


class NodeService(service.MultiService):
    """Node ``node_id`` of ``config``; everything it starts, it stops.

    The constructor reads the certificates so that a missing file stops a
    node before it starts; ``startService`` opens the state and listens,
    raising if either fails. Child services (none yet) start once the log
    exists and stop before it closes.
    """

    def __init__(self, config, node_id, reactor):
        super().__init__()
        self.config = config
        self.node_id = node_id
        self.node = config.node(node_id)
        self.reactor = reactor
        self.settings = ServerSettings.from_config(config, node_id)
        self.client_tls_context = (
            tls.client_server_context(config, node_id) if config.client_tls else None)
        self.certificate_expires = None
        if config.peers_of(node_id):
            # Peer links are always mutual TLS: missing certificates stop us here.
            tls.load_ca(config)
            tls.load_node_certificate(config, node_id)
        if config.client_tls or config.peers_of(node_id):
            # And one the others would refuse (another node's, another CA's, expired).
            self.certificate_expires = tls.check_node_certificate(config, node_id)
        self.state = self.worker = self.log = self.factory = self.port = None
        self.lineage = b""                 # paxchat.lineage, read at start
        self.identity = b""                # this node's data identity (paxchat.lineage)
        self._known_peers = {}             # the peers' data identities, read at start
        self.rebuilding = False            # back on an empty disk (paxchat.lineage), read at start
        self._lineage_kept = defer.succeed(True)   # the lineage a rebuilding node took is on disk
        self._peers_to_write = None        # peer identities waiting to go to disk
        self._writing_peers = False
        self._stopping_for_fatal = False   # fatal() has said why the node stops
        self._process_ending = False       # the reactor shuts down (SIGTERM): the process ends
        self._shutdown_trigger = None
        # Fires once what a failed start opened is closed (the close is not
        # instant: the log's files close on their own thread).
        self.closing = defer.succeed(None)
        self.add_operations()
        self.versions = ApplyVersionKeeper(reactor, node_id, config.nodes, lambda: self.log,
                                           self._peer_builds, lambda: self.worker.call("version"))
        self.versions.setServiceParent(self)

    @property
    def data_dir(self):
        return self.config.node_data_dir(self.node_id)

    def startService(self):
        if not self.closing.called:
            # Two logs on one directory would write over each other.
            raise RuntimeError(f"node {self.node_id} is still closing what its last start opened")
        service.Service.startService(self)
        self._stopping_for_fatal = False
        try:
            self.config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.data_dir.mkdir(mode=0o700, exist_ok=True)
            # Before any port is bound: a node started twice is told so, not that
            # its port is taken. (The log takes the lock for good when it opens.)
            with locked(self.data_dir / "paxos"):
                pass
            self.check_free_space()
            self.lineage = read_lineage(self.data_dir)
            if self.lineage:
                log.info("node {node_id}'s data was {lineage}", node_id=self.node_id,
                         lineage=describe(self.lineage))
            check_members(self.data_dir, self.config.nodes,
                          where=str(self.config.source_name or self.config.path))
            self.identity = read_or_make_identity(self.data_dir, self.node_id)
            self._known_peers = read_peer_identities(self.data_dir)
            self.rebuilding = is_rebuilding(self.data_dir)
            # Opened once here before anything is served; from now on only the
            # worker's thread touches it.
            # The Paxos log is the durable record: the state commits without
            # an fsync and is synced before the log is compacted past it.
            # Checked whole (SQLite's quick_check) before it is used: a node
            # applying to a damaged file would answer differently from the others.
            self.state = self.open_state()
            self.state.check_version()     # a downgrade past what the cluster runs stops here
            self.worker = StateWorker(self.reactor, self.state)
            self.log = self.make_command_log(self.worker)
            self.factory = ChatServerFactory(self.reactor, self.log, self.worker, self.settings)
            for child in self:
                if not child.running:  # one added while we run has started already
                    child.startService()
            self.port = _listen_now(self.client_endpoint(), self.factory)
        except BaseException:
            self.running = 0
            for child in reversed(list(self)):
                if child.running:
                    child.stopService()
            self.closing = self._close_started()
            raise
        # Runs before the application's stopService when the process stops:
        # fatal() then knows the stop under way ends the process.
        self._process_ending = False
        self._shutdown_trigger = self.reactor.addSystemEventTrigger(
            "before", "shutdown", self._process_ends)
        log.info("paxchat node {node_id} serving clients on {address} ({tls})",
                 node_id=self.node_id, address=str(self.node.client),
                 tls="TLS" if self.client_tls_context else "plain TCP")
        self._warn_of_certificate_expiry()
        self.announce_ready()

    def _warn_of_certificate_expiry(self):
        """A certificate that expires soon is said at each start: once it has, its
        peers and clients refuse it, and the node would not start again."""
        expires = self.certificate_expires
        if expires is None:
            return
        left = expires - datetime.datetime.now(datetime.timezone.utc)
        if left < CERTIFICATE_WARNING:
            log.warn("node {node_id}'s certificate {path} expires on {date} (in {days} days): make it a"
                     " new one (docs/operations.md, Certificates)", node_id=self.node_id,
                     path=str(self.config.node_cert_path(self.node_id)), date=f"{expires:%Y-%m-%d}",
                     days=max(0, left.days))

    def check_free_space(self):
        """Refuse to start, in one line, on a disk with less than MIN_FREE_BYTES free
        (to the node's user: blocks kept for root do not count)."""
        disk = os.statvfs(self.data_dir)
        free = disk.f_bavail * disk.f_frsize
        if free < MIN_FREE_BYTES:
            raise StorageError(
                f"the disk of {self.data_dir} is full ({free // 1024} KiB free; a node needs"
                f" {MIN_FREE_BYTES // 1024} KiB at least): free some space or grow the disk, then"
                " start the node; it catches up from the others")

    def add_operations(self):
        """Metrics, the admin API (when ``metrics``/``admin`` are set), systemd's watchdog: children.

        Children start once the command log exists and before clients are
        served; ``self.metrics`` takes ``observe_commit``/``observe_fsync``.
        """
        operations = MetricsService(self)
        operations.setServiceParent(self)
        self.metrics = operations.metrics
        if self.node.admin is not None:
            # Imported only when served: the admin API and its command line
            # weigh on every start-up (see httpsite.py).
            from paxchat.admin import AdminService
            AdminService(self).setServiceParent(self)
        notify.WatchdogService(self.reactor).setServiceParent(self)

    def announce_ready(self):
        """Tell systemd READY=1 once every listener (clients, and peers if any) is up.

        A no-op outside systemd. A peer transport that fails to listen
        leaves the node unready; its own error handling stops the node.
        """
        transport = find_service(self, "listening")
        waiting = getattr(transport, "listening", None)
        status = f"node {self.node_id} serving clients on {self.node.client}"
        if not isinstance(waiting, defer.Deferred):
            notify.ready(status)
            return
        mine = defer.Deferred()
        mine.addCallback(lambda _: notify.ready(status))
        mine.addErrback(lambda _: None)

        def forward(result):
            (mine.errback if isinstance(result, Failure) else mine.callback)(result)
            return result
        waiting.addBoth(forward)

    def make_command_log(self, worker):
        """The node's ICommandLog: the replicated log, for a cluster of any size.

        The durable log is recovered first, on this thread: a damaged one
        fails the start before any port is bound or systemd hears READY=1.
        Its running parts (peer transport, ticker) become children of the
        node here: they start right away, before clients are served, and stop
        before the log's own ``stop()``. A peer port that cannot be bound
        fails the start.
        """
        recovered = self.recover_log()
        try:
            command_log = ReplicatedLog.from_config(
                self.reactor, self.config, self.node_id, worker, on_fatal=self.fatal,
                peer_options={"lineage": self.lineage, "identity": self.identity,
                              "build_version": self.versions.version,
                              "known_identities": self._known_peers,
                              "remember": self.remember_peers,
                              "rebuilding": self.rebuilding, "adopt_lineage": self._adopt_lineage},
                rebuilding=self.rebuilding, on_rebuilt=self._rebuilt, recovered=recovered)
        except BaseException:
            recovered[0].close()
            raise
        for part in command_log.services():
            part.setServiceParent(self)
        if command_log.transport is not None:
            outcome = []

            def listened(result):
                if isinstance(result, Failure) and outcome == ["late"]:
                    self.fatal(f"cannot listen for peers: {result.getErrorMessage()}")
                outcome.append(result)

            # TCP endpoints listen synchronously: a taken peer port fails the start here.
            command_log.transport.listening.addBoth(listened)
            if outcome and isinstance(outcome[0], Failure):
                self.log = command_log     # closed, its store too, with the rest the start opened
                outcome[0].raiseException()
            outcome.append("late")
        command_log.start()
        return command_log

    def open_state(self):
        """The node's state, found whole; a damaged one raises CorruptStore saying how
        to bring the node back."""
        try:
            return ChatState.open(str(self.data_dir / STATE_FILE), check=True, durable=False)
        except CorruptStore as e:
            raise CorruptStore(f"{e}. {self._how_to_bring_back()}") from None

    def recover_log(self):
        """The node's durable log, as ``(DurableLog, records)``; a damaged one raises
        CorruptLogError saying how to bring the node back (its data cannot be trusted)."""
        try:
            return DurableLog.open_now(self.reactor, self.data_dir / "paxos")
        except CorruptLogError as e:
            raise CorruptLogError(f"{e}. {self._how_to_bring_back()}") from None

    def _how_to_bring_back(self):
        """What docs/operations.md does for a node whose data is lost: a rebuild from the
        others, or, with no other node to answer, a restore from a backup."""
        admin = f"paxchat-admin --config {self.config.path}"
        if self.config.peers_of(self.node_id):
            return (f"Move {self.data_dir} aside and, with every other node up and linked"
                    f" (`{admin} status`), run `{admin} rebuild --node {self.node_id}` as the"
                    " node's user, then start the node: it rebuilds from the others"
                    " (docs/operations.md, \"A node whose disk was lost\")")
        return (f"Move {self.data_dir} aside and run `{admin} restore BACKUP --node"
                f" {self.node_id}` with the latest backup, then start the node"
                " (docs/operations.md, \"Backups\")")

    def _peer_transport(self):
        """The replicated log's peer transport, or None (not started, or one node)."""
        return getattr(self.log, "transport", None)

    def _peer_builds(self):
        transport = self._peer_transport()
        return transport.peer_builds() if transport is not None else {}

    def remember_peers(self, known):
        """Keep the peers' data identities on disk (off the reactor, latest last)."""
        self._peers_to_write = known
        if not self._writing_peers:
            self._write_peers()

    def _write_peers(self):
        known, self._peers_to_write = self._peers_to_write, None
        self._writing_peers = True
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                      write_peer_identities, self.data_dir, known)

        def written(result):
            self._writing_peers = False
            if isinstance(result, Failure):
                log.failure("node {node_id} could not keep its peers' identities on disk;"
                            " it learns them again at its next start", result,
                            node_id=self.node_id)
            if self._peers_to_write is not None:
                self._write_peers()
        d.addBoth(written)

    def reload(self):
        """Take cluster.ini again (SIGHUP: ``systemctl reload``): other nodes' new
        addresses, for a node moved to another machine. Anything else, the node
        refuses and goes on as it was, saying what to do: a restart takes a
        changed setting, but refuses a mistake or another set of nodes too."""
        try:
            new = configmod.load(self.config.path)
        except configmod.ConfigError as e:
            why, then = str(e), "fix the file: a restart would refuse it too"
        else:
            why = configmod.what_a_reload_cannot_take(self.config, new, self.node_id)
            then = "a restart takes it"
            if set(new.nodes) != set(self.config.nodes):
                then = ("put the [node.N] sections back: a restart would refuse them too, and the"
                        " nodes of a cluster change by a restore of every node (docs/operations.md,"
                        " \"Changing the nodes of a cluster\")")
        if why:
            log.error("node {node_id} did not reload cluster.ini: {why}; it goes on as it was"
                      " ({then})", node_id=self.node_id, why=why, then=then)
            return False
        moved = [n for n in sorted(new.nodes) if new.nodes[n] != self.config.nodes[n]]
        self.config = new
        transport = self._peer_transport()
        if transport is not None:
            for n in moved:
                transport.readdress(n, new.nodes[n].peer.host, new.nodes[n].peer.port)
        if self.factory is not None:
            self.factory.use_nodes(ServerSettings.from_config(new, self.node_id).nodes)
        log.info("node {node_id} reloaded cluster.ini: {what}", node_id=self.node_id,
                 what=("new addresses for node " + ", ".join(map(str, moved))) if moved
                 else "nothing changed")
        return True

    def _off_reactor(self, what, fn, *args):
        """Run a small durable write on a thread; a failure stops the node (its data
        would not say what the node did)."""
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn, *args)

        def failed(f):
            self.fatal(f"cannot {what}: {f.getErrorMessage()}")
            return False
        return d.addCallbacks(lambda _: True, failed)

    def _adopt_lineage(self, lineage):
        """Rebuilding on an empty disk in a restored cluster: its lineage is ours now."""
        self.lineage = lineage
        self._lineage_kept = self._off_reactor("keep the cluster's lineage", write_lineage,
                                               self.data_dir, lineage)

    def _rebuilt(self):
        """The node votes again: its data no longer says it rebuilds (after it keeps
        the lineage it took, if any: a node started again must still say it)."""
        self.rebuilding = False
        self._lineage_kept.addCallback(
            lambda kept: kept and self._off_reactor("clear the rebuilding mark", clear_rebuilding,
                                                    self.data_dir))

    def _process_ends(self):
        self._process_ending = True
        self._shutdown_trigger = None

    def fatal(self, why):
        """The node cannot go on (its storage failed): end the process with status 1.

        Services stop first (the state is closed cleanly); then the process
        exits non-zero so a supervisor notices and an operator looks. This is
        the one line that says why (the replicated log and its store leave
        it to the node); what fails after it comes of it and is not said.
        A failure during a planned stop of the process (SIGTERM, ``systemctl
        stop``) is said too; that stop goes on, and ends with status 1 as
        well, so systemd shows the unit failed rather than stopped as asked.
        A node stopped as a service by its owner (not the process) only says it.
        """
        if self._stopping_for_fatal:
            return  # said already
        self._stopping_for_fatal = True
        log.critical("paxchat node {node_id} is stopping: {why}", node_id=self.node_id, why=why)
        if not (self.running or self._process_ending):
            return  # its owner stopped the service; the process is not ours to end
        self.reactor.addSystemEventTrigger("after", "shutdown", _exit_failed)
        if not self._process_ending and self.reactor.running:
            self.reactor.stop()

    def client_endpoint(self):
        """Where clients connect: the node's ``client`` address, TLS on it when client_tls is on."""
        address = self.node.client
        if self.client_tls_context is not None:
            return clienttls.TLSServerEndpoint(self.reactor, address.port, self.client_tls_context,
                                               interface=address.host, backlog=CLIENT_BACKLOG)
        return endpoints.TCP4ServerEndpoint(self.reactor, address.port, interface=address.host,
                                            backlog=CLIENT_BACKLOG)

    @defer.inlineCallbacks
    def stopService(self):
        trigger, self._shutdown_trigger = self._shutdown_trigger, None
        if trigger is not None:            # stopped by its owner, the process going on
            self.reactor.removeSystemEventTrigger(trigger)
        notify.stopping(f"node {self.node_id} stopping")
        port, self.port = self.port, None
        if port is not None:
            yield port.stopListening()
        yield self.hand_over()
        yield self.close_client_connections()
        yield super().stopService()
        yield self._close_started()
        log.info("paxchat node {node_id} stopped", node_id=self.node_id)

    @defer.inlineCallbacks
    def hand_over(self):
        """Before a planned stop: pass leadership on, then let writes in flight finish.

        New clients are already turned away. A leader asks the log to step
        down (``step_down_gracefully``) so the others need not wait out an
        election timeout; then submits still waiting (``pending_proposals``
        and ``held_commands`` in ``status()``) get up to ``request_timeout``
        to be answered. Bounded, and skipped by logs that offer neither:
        a stop never hangs on it, and nothing acknowledged depends on it.
        """
        command_log = self.log
        if command_log is None:
            return
        step_down = getattr(command_log, "step_down_gracefully", None)
        if step_down is not None and command_log.leader_id() == self.node_id:
            try:
                handed = yield step_down()
            except Exception:
                log.failure("node {node_id} could not hand over leadership", node_id=self.node_id)
            else:
                successor = command_log.leader_id()
                if successor not in (None, self.node_id):
                    log.info("node {node_id} stopping: leadership passed to node {successor}",
                             node_id=self.node_id, successor=successor)
                elif not handed:
                    log.warn("node {node_id} stopping: no node took over leadership in time; "
                             "the others will elect a leader", node_id=self.node_id)
        status = getattr(command_log, "status", None)
        if status is None:
            return

        def waiting():
            now = status()
            return (now.get("pending_proposals") or 0) + (now.get("held_commands") or 0)

        deadline = self.reactor.seconds() + self.config.request_timeout
        while waiting() and self.reactor.seconds() < deadline:
            pause = defer.Deferred()
            self.reactor.callLater(self.config.heartbeat_interval, pause.callback, None)
            yield pause
        left = waiting()
        if left:
            log.warn("node {node_id} stopping with {count} writes unanswered; clients retry them",
                     node_id=self.node_id, count=left)

    def close_client_connections(self):
        """Send every client ``node_stopping`` once its requests are answered, and close it.

        Runs after ``hand_over`` and before the log and the state stop, so
        each connection's last answers are real ones, not ``internal``
        errors from a stopped state worker; its client then moves to
        another node at once instead of waiting for this one to vanish.
        Bounded by ``request_timeout`` (twice, then aborts).
        """
        if self.factory is None:
            return defer.succeed(None)
        return self.factory.close_all(STOPPING_REASON, grace=self.config.request_timeout)

    @defer.inlineCallbacks
    def _close_started(self):
        """Close the log, then the worker (which owns the state), whatever got started."""
        if self.port is not None:
            port, self.port = self.port, None
            yield port.stopListening()
        # Forget them all at once: stopping the log may wait for its disk thread.
        log_, self.log = self.log, None
        worker, self.worker = self.worker, None
        state, self.state = self.state, None
        if self.factory is not None:
            yield self.factory.hasher.close()        # the bcrypt worker process
        if log_ is not None and hasattr(log_, "stop"):
            yield log_.stop()
        if worker is not None:
            yield worker.stop()
        elif state is not None:
            state.close()


def _exit_failed():
    """End the process with status 1 (after the reactor shut down: the services are stopped)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _listen_now(endpoint, factory):
    """Listen and return the port, raising at once if the address cannot be bound.

    TCP and SSL endpoints bind synchronously; failing here, before the
    reactor runs, is what lets twistd exit with the error.
    """
    result = []
    endpoint.listen(factory).addBoth(result.append)
    if not result:
        raise RuntimeError(f"{endpoint!r} did not listen synchronously")
    if isinstance(result[0], Failure):
        result[0].raiseException()
    return result[0]
