"""Each node tells the cluster which apply version its build knows.

During a rolling upgrade nodes of two builds apply the same log. A build
that changes what a command does keeps the old behaviour until the
cluster's apply version reaches its own (``paxchat/state/chat.py``,
"Apply versions"), and that version moves only through the log: each node,
once it starts, commits a ``node_version`` command naming its build's
version and its cluster's members, and the apply raises the cluster's
version to the lowest every member reported. So the last node upgraded
switches the whole cluster over, at one log index, on every node.

The report is retried until it commits (a node may start before there is
a quorum), and sent only while a leader is known; it costs one log entry
per start. Other nodes' reports applied
here keep what ``status()`` shows up to date.
"""

from twisted.application import service
from twisted.logger import Logger

from paxchat.state.chat import APPLY_VERSION

__all__ = ["VersionReporter"]

log = Logger()

FIRST_RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 30.0


class VersionReporter(service.Service):
    """Commit this node's apply version once per start; follow the cluster's.

    ``command_log`` is called at start for the node's ICommandLog (it exists
    only once the node has started).
    """

    def __init__(self, reactor, node_id, members, command_log, version=APPLY_VERSION):
        self._reactor = reactor
        self.node_id = node_id
        self.members = sorted(members)
        self._command_log = command_log
        self.version = version
        self.cluster_version = None       # unknown until a report is applied here
        self.reported = {}                # node id (str) -> version, as the last report applied
        self.committed = False
        self._log = None
        self._retry = None
        self._delay = FIRST_RETRY_SECONDS
        self._observing = None

    def startService(self):
        super().startService()
        self._log = self._command_log()
        if self._observing is not self._log:
            self._observing = self._log
            self._log.add_observer(self._applied)
        self.committed = False
        self._delay = FIRST_RETRY_SECONDS
        self._report()

    def stopService(self):
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        return super().stopService()

    def status(self):
        """What ``paxchat-admin status`` shows: this build's version and the cluster's."""
        return {"build": self.version, "cluster": self.cluster_version,
                "reported": dict(self.reported), "committed": self.committed}

    def _report(self):
        self._retry = None
        command = {"op": "node_version", "node": self.node_id, "version": self.version,
                   "members": self.members}
        if self._log.leader_id() is None:
            # Nothing could commit it: wait for a leader rather than hold it in the log,
            # where a stop would wait for it as for a client's write.
            self._retry = self._reactor.callLater(FIRST_RETRY_SECONDS, self._report)
            return
        d = self._log.submit(command)
        d.addCallbacks(self._answered, self._failed)

    def _answered(self, response):
        if not self.running:
            return
        if response.get("ok"):
            self.committed = True
            return
        # Only a command this code got wrong is refused: retrying would not help.
        error = response.get("error", {})
        log.error("the cluster refused node {node}'s apply version report: {code}: {message}",
                  node=self.node_id, code=error.get("code"), message=error.get("message"))

    def _failed(self, failure):
        if not self.running:
            return
        log.debug("node {node}'s apply version report did not commit ({why}); retrying in {delay} s",
                  node=self.node_id, why=failure.getErrorMessage(), delay=self._delay)
        self._retry = self._reactor.callLater(self._delay, self._report)
        self._delay = min(self._delay * 2, MAX_RETRY_SECONDS)

    def _applied(self, command, response):
        if command.get("op") != "node_version" or not response.get("ok"):
            return
        result = response["result"]
        before = self.cluster_version
        self.cluster_version = result["version"]
        self.reported = dict(result["reported"])
        if before is not None and self.cluster_version > before:
            log.info("the cluster's apply version is now {version}: every node runs a build"
                     " that knows it", version=self.cluster_version)
