"""The leader moves the cluster's apply version once every node's build knows it.

During a rolling upgrade nodes of two builds apply the same log. A build
that changes what a command does keeps the old behaviour until the
cluster's apply version reaches its own (``paxchat/state/chat.py``,
"Apply versions"), and that version moves only through the log, so every
node switches at the same log index.

What each peer's build knows comes over the peer links (each says it
after its hello, ``paxchat/paxos/transport.py``), live: a node of an
earlier build says nothing, and a node that is down is not counted. The
leader checks every ``CHECK_SECONDS``; once every member's build is
known, it proposes ``set_apply_version`` with the lowest of them, if that
is above the cluster's. So the last node upgraded, once linked, switches
the cluster over. Nothing is stored per node: the state holds only the
cluster's version, the same on every node.
"""

from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger

from paxchat.state.chat import APPLY_VERSION

__all__ = ["ApplyVersionKeeper"]

log = Logger()

CHECK_SECONDS = 1.0


class ApplyVersionKeeper(service.Service):
    """This node's side of the apply version: its build's, the cluster's, and the move.

    ``command_log()``, ``peer_builds()`` (``{node id: version}`` of the peers
    linked now) and ``read_version()`` (a Deferred of the state's version)
    are called only once the node has started.
    """

    def __init__(self, reactor, node_id, members, command_log, peer_builds, read_version,
                 version=APPLY_VERSION):
        self._reactor = reactor
        self.node_id = node_id
        self.members = sorted(members)
        self._command_log = command_log
        self._peer_builds = peer_builds
        self._read_version = read_version
        self.version = version
        self.cluster_version = None       # unknown until read from the state
        self._observing = None
        self._proposing = False
        self._reading = False
        self._loop = None

    def startService(self):
        super().startService()
        command_log = self._command_log()
        if self._observing is not command_log:
            self._observing = command_log
            command_log.add_observer(self._applied)
        self.cluster_version = None
        self._reading = False
        self._refresh()
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = self._reactor
        self._loop.start(CHECK_SECONDS, now=False)

    def stopService(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return super().stopService()

    def status(self):
        """What ``paxchat-admin status`` shows: this build's, the cluster's and the peers'."""
        return {"build": self.version, "cluster": self.cluster_version,
                "peers": {str(n): v for n, v in sorted(self._peer_builds().items())}}

    def check(self):
        """On the leader: propose the lowest version every member's build knows, if higher."""
        if self.cluster_version is None or not self.running:
            return
        if self.cluster_version < self.version:
            self._refresh()
        if self._proposing:
            return
        command_log = self._command_log()
        if command_log.leader_id() != self.node_id:
            return
        builds = {**self._peer_builds(), self.node_id: self.version}
        if any(m not in builds for m in self.members):
            return                        # a node down, or of a build that does not say
        target = min(builds[m] for m in self.members)
        if target <= self.cluster_version:
            return
        self._proposing = True
        d = command_log.submit({"op": "set_apply_version", "version": target})
        d.addCallbacks(self._answered, self._failed)

    def _answered(self, response):
        self._proposing = False
        if not response.get("ok"):
            error = response.get("error", {})
            log.error("the cluster refused to move its apply version: {code}: {message}",
                      code=error.get("code"), message=error.get("message"))

    def _failed(self, failure):
        self._proposing = False           # tried again at the next check
        log.debug("moving the apply version did not commit: {why}", why=failure.getErrorMessage())

    def _refresh(self):
        """Read the state's version: at start, and again while it is below the
        build's, since a node that caught up by a snapshot applied no
        ``set_apply_version`` and no observer told it of the move."""
        if self._reading:
            return
        self._reading = True

        def done(result):
            self._reading = False
            return result
        self._read_version().addBoth(done).addCallbacks(self._read, self._read_failed)

    def _read(self, version):
        if self.running:
            self.cluster_version = max(version, self.cluster_version or 0)

    def _read_failed(self, failure):
        log.failure("reading the cluster's apply version failed", failure)

    def _applied(self, command, response):
        if command.get("op") != "set_apply_version" or not response.get("ok"):
            return
        before, self.cluster_version = self.cluster_version, response["result"]["version"]
        if before is None or self.cluster_version > before:
            log.info("the cluster's apply version is now {version}: every node runs a build"
                     " that knows it", version=self.cluster_version)
