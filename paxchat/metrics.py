"""Prometheus metrics of one node, served over HTTP on its ``metrics`` address.

Most of what an operator watches (role, ballot, indexes, peers, clients)
is read from the node when Prometheus scrapes, by a custom collector, so
nothing has to be kept in step. What only a running count or a latency
distribution can tell (proposals, commit latency, fsync latency) is
observed as it happens, through three calls any layer may make:
``observe_proposal()``, ``observe_commit(seconds)``, ``observe_fsync(seconds)``.
The service itself samples how late the event loop runs a timer
(``paxchat_event_loop_lag_seconds``, and a warning in the log when it is
over ``LAG_WARN_SECONDS``): a node whose loop is late answers clients and
peers late, and a leader late by an election timeout loses its lease, so
that is worth seeing before it happens.

The endpoint is off unless ``[node.N] metrics = host:port`` is set; bind it
to 127.0.0.1 (or a private interface) since it has no authentication.
Each node has its own registry, so several nodes can run in one process.
"""

import re
from numbers import Real

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.process_collector import ProcessCollector
from twisted.application import service
from twisted.logger import Logger

from paxchat.logs import Occasional
from paxchat.paxos.core import CANDIDATE, FOLLOWER, LEADER, PRECANDIDATE

__all__ = ["MetricsService", "NodeMetrics", "node_status"]

log = Logger()

# Seconds: from sub-millisecond group commits to the request timeout.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)
# Every role a node's status can show, each a paxchat_role series (0 or 1), so
# none appears only while it is held: the Paxos replica's (a precandidate asks
# for pre-votes before it disturbs the others with an election), the
# replicated log's before it runs and after its disk failed, and a LocalLog's.
ROLES = (LEADER, FOLLOWER, PRECANDIDATE, CANDIDATE, "starting", "failed", "standalone")
# The event loop's lag is sampled by a timer due this often (seconds).
LAG_PROBE_SECONDS = 0.1
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# A loop this late is logged (once a minute at most): heartbeats wait as
# long, so an election that follows has its cause in the log.
LAG_WARN_SECONDS = 0.25
LAG_LOG_SECONDS = 60.0
# Counts of client connections a node sent away: status key -> help of its counter.
_CLIENT_COUNTERS = {
    "clients_turned_away": "Client connections sent away because the node held max_clients"
                           " (new ones, or ones idle without logging in closed to make room).",
    "clients_refused": "New client connections closed unread because they came faster than"
                       " connections_per_address from one IP address.",
}
# Numeric fields of the log's status() become gauges paxchat_<key>; these have their own.
_NOT_GAUGES = {"node", "leader", "ballot", "leader_ballot", "clients", "running", "role", "peers",
               "refused_peers", "refused_by_peers", "rebuilding",
               *_CLIENT_COUNTERS}
_METRIC_NAME = re.compile(r"[a-z_][a-z0-9_]*\Z")
_GAUGE_HELP = {
    "commit_index": "Highest slot of the contiguous chosen prefix.",
    "applied_index": "Last log index applied to the local state.",
    "snapshot_index": "Index of the latest snapshot the log is compacted to.",
    "pending_proposals": "Submits of this node waiting to be decided and applied.",
    "held_commands": "Commands waiting for a leader to be known.",
    "pending_reads": "Linearizable reads waiting for their read index.",
    "log_bytes": "Size of the Paxos log's current segment, in bytes.",
    "connections": "Client connections open on this node, logged in or not (max_clients caps it).",
}


def node_status(node):
    """What the node knows about itself, as plain JSON-able values.

    The command log's ``status()`` when it has one (the replicated log);
    otherwise what a LocalLog tells: it is the only node, so it leads.
    Adds ``clients`` (logged-in connections), ``connections`` (all open
    ones), ``clients_turned_away`` (at ``max_clients``), ``clients_refused``
    (over ``connections_per_address``) and, from the peer
    transport, ``peers`` when the log does not give them.
    """
    log_ = node.log
    status = {}
    if log_ is not None and callable(getattr(log_, "status", None)):
        status = dict(log_.status())
    elif log_ is not None:
        leader = _call(getattr(log_, "leader_id", None))
        applied = getattr(log_, "applied_index", None)
        status = {"role": "standalone", "leader": leader, "ballot": None,
                  "commit_index": applied, "applied_index": applied,
                  "snapshot_index": None, "pending": None}
    status.setdefault("node", node.node_id)
    status["ballot"] = _plain_ballot(status.get("ballot"))
    if not status.get("peers"):
        transport = find_service(node, "peer_state")
        if transport is not None:
            status["peers"] = {str(peer): transport.peer_state(peer)
                               for peer in sorted(getattr(transport, "peer_ids", ()))}
    status["peers"] = {str(k): _peer_state(v) for k, v in _items(status.get("peers"))}
    factory = getattr(node, "factory", None)
    registry = getattr(factory, "registry", None)
    status["clients"] = len(registry) if registry is not None else None
    connections = getattr(factory, "connections", None)
    status["connections"] = len(connections) if connections is not None else None
    status["clients_turned_away"] = getattr(factory, "turned_away_total", None)
    status["clients_refused"] = getattr(factory, "refused_total", None)
    versions = getattr(node, "versions", None)
    status["apply_version"] = versions.status() if versions is not None else None
    status["running"] = bool(node.running)
    return status


def find_service(parent, attribute):
    """The first service under ``parent`` (depth first) that has ``attribute``."""
    for child in parent:
        if hasattr(child, attribute):
            return child
        if isinstance(child, service.MultiService):
            found = find_service(child, attribute)
            if found is not None:
                return found
    return None


def _call(fn):
    return fn() if callable(fn) else None


def _plain_ballot(ballot):
    """A ballot as ``[round, node]`` (or what it is, if already plain)."""
    if ballot is None or isinstance(ballot, (int, float, str)):
        return ballot
    if hasattr(ballot, "round"):
        return [ballot.round, getattr(ballot, "node", None)]
    if isinstance(ballot, (tuple, list)):
        return list(ballot)
    return str(ballot)


def _items(peers):
    if isinstance(peers, dict):
        return peers.items()
    if isinstance(peers, (list, tuple)):
        return [(p.get("id", p.get("node")), p) if isinstance(p, dict) else (p, "connected")
                for p in peers]
    return []


def _peer_state(value):
    """'connected' / 'disconnected' from whatever shape the log reports a peer in."""
    if isinstance(value, dict):
        for key in ("state", "connected", "up"):
            if key in value:
                return _peer_state(value[key])
        return "unknown"
    if isinstance(value, bool):
        return "connected" if value else "disconnected"
    return str(value)


def _number(value):
    return value if isinstance(value, Real) and not isinstance(value, bool) else None


class _StatusCollector:
    """Reads the node at scrape time: role, ballot, indexes, peers, clients."""

    def __init__(self, node):
        self._node = node

    def describe(self):
        return []  # collected lazily; nothing to check at registration

    def collect(self):
        node = self._node
        try:
            status = node_status(node)
        except Exception:
            log.failure("reading node {node} status for metrics failed", node=node.node_id)
            return
        up = GaugeMetricFamily("paxchat_node_running", "1 while the node serves.")
        up.add_metric([], 1 if status["running"] else 0)
        yield up
        role = GaugeMetricFamily("paxchat_role", "1 for the role this node has now.",
                                 labels=["role"])
        current = status.get("role") or "unknown"
        for name in sorted(set(ROLES) | {current}):
            role.add_metric([name], 1 if name == current else 0)
        yield role
        versions = status.get("apply_version")
        if isinstance(versions, dict):
            gauge = GaugeMetricFamily(
                "paxchat_apply_version", "Apply version this node's build knows (of=build) and the"
                " cluster's as this node's state has it (of=cluster); they differ while an upgrade runs.",
                labels=["of"])
            for of in ("build", "cluster"):
                if _number(versions.get(of)) is not None:
                    gauge.add_metric([of], versions[of])
            yield gauge
        if "rebuilding" in status:
            gauge = GaugeMetricFamily(
                "paxchat_rebuilding", "1 while this node rebuilds on new data (its disk was lost):"
                " it votes for nothing until every other node has answered it and it caught up.")
            gauge.add_metric([], 1 if status["rebuilding"] else 0)
            yield gauge
        leader = _number(status.get("leader"))
        gauge = GaugeMetricFamily("paxchat_leader", "Node id of the known leader (0: none known).")
        gauge.add_metric([], leader or 0)
        yield gauge
        expires = getattr(node, "certificate_expires", None)
        if expires is not None:
            gauge = GaugeMetricFamily(
                "paxchat_certificate_expiry_timestamp_seconds", "When this node's certificate expires"
                " (Unix time): past it, peers and clients refuse it, and it does not start.")
            gauge.add_metric([], expires.timestamp())
            yield gauge
        ballot = status.get("ballot")
        round_ = _number(ballot[0]) if isinstance(ballot, list) and ballot else _number(ballot)
        if round_ is not None:
            gauge = GaugeMetricFamily("paxchat_ballot_round", "Round of the highest ballot promised.")
            gauge.add_metric([], round_)
            yield gauge
        for key in sorted(status):
            value = _number(status[key])
            if key in _NOT_GAUGES or value is None or not _METRIC_NAME.match(key):
                continue
            gauge = GaugeMetricFamily(f"paxchat_{key}", _GAUGE_HELP.get(
                key, f"The command log's status()[{key!r}]."))
            gauge.add_metric([], value)
            yield gauge
        clients = _number(status.get("clients"))
        if clients is not None:
            gauge = GaugeMetricFamily("paxchat_clients", "Client connections logged in on this node.")
            gauge.add_metric([], clients)
            yield gauge
        for key, help_text in _CLIENT_COUNTERS.items():
            value = _number(status.get(key))
            if value is not None:
                counter = CounterMetricFamily(f"paxchat_{key}", help_text)
                counter.add_metric([], value)
                yield counter
        if status["peers"]:
            gauge = GaugeMetricFamily("paxchat_peer_up", "1 while the link to that peer is up.",
                                      labels=["peer"])
            for peer, state in sorted(status["peers"].items()):
                gauge.add_metric([peer], 1 if state == "connected" else 0)
            yield gauge
        yield from self._store_counters()

    def _store_counters(self):
        """The Paxos store's own counts (DurableLog.batches, .records_written), if it has them."""
        store = getattr(self._node.log, "store", None)
        for attribute, name, doc in (
                ("batches", "paxchat_log_fsyncs", "Write+fsync rounds of the Paxos log."),
                ("records_written", "paxchat_log_records_written", "Records appended to the Paxos log."),
                ("fsync_seconds_total", "paxchat_log_fsync_seconds",
                 "Time spent in write+fsync of the Paxos log.")):
            value = _number(getattr(store, attribute, None))
            if value is not None:
                counter = CounterMetricFamily(name, doc)
                counter.add_metric([], value)
                yield counter


class NodeMetrics:
    """The metrics registry of one node, and the calls that feed it.

    ``observe_*`` are cheap and safe to call from the reactor thread any
    time (also with no endpoint configured).
    """

    def __init__(self, node, reactor):
        self._reactor = reactor
        self.registry = CollectorRegistry(auto_describe=False)
        self.proposals = Counter(
            "paxchat_proposals", "Commands submitted to the log on this node.",
            registry=self.registry)
        self.proposal_failures = Counter(
            "paxchat_proposal_failures", "Submitted commands that failed, by error type.",
            ["error"], registry=self.registry)
        self.commit_latency = Histogram(
            "paxchat_commit_latency_seconds",
            "From submit on this node to the command applied here (what a client waits).",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.fsync_latency = Histogram(
            "paxchat_fsync_latency_seconds", "One write+fsync of the Paxos log (group commit).",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.event_loop_lag = Histogram(
            "paxchat_event_loop_lag_seconds",
            f"How late the event loop ran a timer due every {LAG_PROBE_SECONDS:g} s: one piece"
            " of work that held it (a long callback, a big copy) or no CPU to run on.",
            buckets=LAG_BUCKETS, registry=self.registry)
        self.registry.register(_StatusCollector(node))
        try:
            ProcessCollector(registry=self.registry)
        except Exception:  # no /proc: the process metrics are a bonus
            pass

    # The observer interface the command log and the store may call.

    def observe_proposal(self, count=1):
        self.proposals.inc(count)

    def observe_commit(self, seconds):
        self.commit_latency.observe(max(0.0, seconds))

    def observe_fsync(self, seconds):
        self.fsync_latency.observe(max(0.0, seconds))

    def observe_failure(self, error):
        self.proposal_failures.labels(error=error).inc()

    def observe_lag(self, seconds):
        self.event_loop_lag.observe(max(0.0, seconds))

    def instrument(self, command_log):
        """Count and time every ``submit`` of ``command_log`` (this one instance).

        Commit latency is measured where clients feel it: from submit on
        this node (forwarding to a leader included) until applied here.
        A log that measures itself sets ``measures_commits = True`` and
        calls ``observe_proposal`` / ``observe_commit`` on its own.
        """
        if command_log is None or getattr(command_log, "measures_commits", False):
            return
        submit = command_log.submit
        seconds = self._reactor.seconds

        def timed_submit(command):
            self.proposals.inc()
            started = seconds()
            d = submit(command)

            def applied(response):
                self.observe_commit(seconds() - started)
                return response

            def failed(failure):
                self.observe_failure(type(failure.value).__name__)
                return failure

            return d.addCallbacks(applied, failed)

        timed_submit.__doc__ = submit.__doc__
        command_log.submit = timed_submit

    def exposition(self):
        """The current metrics in Prometheus text format (bytes)."""
        return generate_latest(self.registry)


class MetricsService(service.Service):
    """The node's metrics: always counted; served over HTTP when ``metrics`` is set.

    A child of NodeService: it starts once the command log exists (so it
    can instrument it) and before clients are served.
    """

    name = "metrics"

    def __init__(self, node):
        self.node = node
        self.metrics = NodeMetrics(node, node.reactor)
        self.port = None
        self._lag_call = None
        self._lag_due = None
        self._stalls = Occasional(node.reactor, LAG_LOG_SECONDS)

    @property
    def address(self):
        return self.node.node.metrics

    def startService(self):
        self.metrics.instrument(self.node.log)
        if hasattr(self.node.log, "fsync_observer"):
            # A log that can report each fsync of its store: feed the histogram.
            self.node.log.fsync_observer = self.metrics.observe_fsync
        if self.address is not None:
            from paxchat.httpsite import MetricsResource, listen_http
            self.port = listen_http(self.node.reactor, self.address,
                                    MetricsResource(self.metrics))
            log.info("node {node} serving metrics on http://{address}/metrics",
                     node=self.node.node_id, address=str(self.address))
        super().startService()
        self._schedule_lag_probe()

    def _schedule_lag_probe(self):
        reactor = self.node.reactor
        self._lag_due = reactor.seconds() + LAG_PROBE_SECONDS
        self._lag_call = reactor.callLater(LAG_PROBE_SECONDS, self._probe_lag)

    def _probe_lag(self):
        self._lag_call = None
        lag = self.node.reactor.seconds() - self._lag_due
        self.metrics.observe_lag(lag)
        if lag >= LAG_WARN_SECONDS:
            self._note_stall(lag)
        if self.running:
            self._schedule_lag_probe()

    def _note_stall(self, lag):
        count = self._stalls.happened()
        if count:
            log.warn("node {node}'s event loop was {ms:.0f} ms late ({count} time(s) over"
                     " {limit:.0f} ms since the last report): clients and peers waited as long;"
                     " the node is short of CPU or one task held it",
                     node=self.node.node_id, ms=lag * 1000, count=count,
                     limit=LAG_WARN_SECONDS * 1000)

    def stopService(self):
        super().stopService()
        call, self._lag_call = self._lag_call, None
        if call is not None and call.active():
            call.cancel()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None
