"""Metrics: the collector reads any log's status at scrape time; submits are counted and timed."""

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.application.service import MultiService, Service
from twisted.internet import defer, task

from paxchat import metrics
from paxchat.metrics import NodeMetrics, node_status
from paxchat.node import NodeService
from tests.ops_support import connect, http_get, reactor_, write_ops_config


def samples(exposition):
    """{(name, frozenset(labels.items())): value} of a Prometheus text exposition."""
    found = {}
    for family in text_string_to_metric_families(exposition.decode("utf-8")):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found, name, **labels):
    return found[(name, frozenset(labels.items()))]


class FakeNode(MultiService):
    def __init__(self, log, node_id=1, versions=None):
        super().__init__()
        self.node_id = node_id
        self.log = log
        self.factory = None
        self.running = 1
        if versions is not None:
            self.versions = versions


class Versions:
    def __init__(self, build, cluster):
        self._status = {"build": build, "cluster": cluster, "reported": {}, "committed": True}

    def status(self):
        return self._status


class StatusLog:
    """What ReplicatedLog.status() gives."""

    def __init__(self, **status):
        self._status = {"node": 2, "role": "leader", "leader": 2, "ballot": (7, 2),
                        "commit_index": 120, "applied_index": 118, "snapshot_index": 100,
                        "peers": {1: "connected", 3: "disconnected"}, "pending_proposals": 4,
                        "log_bytes": 4096, "Odd-Key": 1, **status}

    class store:
        batches = 17
        records_written = 40
        fsync_seconds_total = 0.5

    def status(self):
        return self._status


class Bare:
    """An ICommandLog with nothing to report but the basics (LocalLog's shape)."""

    node_id = 1
    applied_index = 5

    def leader_id(self):
        return 1


def test_collector_reads_a_replicated_log_status():
    node = FakeNode(StatusLog(), node_id=2)
    found = samples(NodeMetrics(node, task.Clock()).exposition())
    assert value(found, "paxchat_role", role="leader") == 1
    assert value(found, "paxchat_role", role="follower") == 0
    assert value(found, "paxchat_leader") == 2
    assert value(found, "paxchat_ballot_round") == 7
    assert value(found, "paxchat_commit_index") == 120
    assert value(found, "paxchat_applied_index") == 118
    assert value(found, "paxchat_snapshot_index") == 100
    assert value(found, "paxchat_pending_proposals") == 4
    assert value(found, "paxchat_log_bytes") == 4096
    assert not any(name == "paxchat_Odd-Key" for name, _ in found)
    assert value(found, "paxchat_peer_up", peer="1") == 1
    assert value(found, "paxchat_peer_up", peer="3") == 0
    assert value(found, "paxchat_node_running") == 1
    assert value(found, "paxchat_log_fsyncs_total") == 17
    assert value(found, "paxchat_log_records_written_total") == 40
    assert value(found, "paxchat_log_fsync_seconds_total") == 0.5


def test_the_certificates_expiry_is_a_gauge_where_the_node_has_one():
    import datetime
    node = FakeNode(StatusLog())
    found = samples(NodeMetrics(node, task.Clock()).exposition())
    assert not any(name == "paxchat_certificate_expiry_timestamp_seconds" for name, _ in found)
    node.certificate_expires = datetime.datetime(2031, 11, 27, 12, tzinfo=datetime.timezone.utc)
    found = samples(NodeMetrics(node, task.Clock()).exposition())
    assert value(found, "paxchat_certificate_expiry_timestamp_seconds") == 1953547200


def test_the_apply_versions_are_gauges_once_known():
    found = samples(NodeMetrics(FakeNode(StatusLog(), versions=Versions(2, 1)), task.Clock()).exposition())
    assert value(found, "paxchat_apply_version", of="build") == 2
    assert value(found, "paxchat_apply_version", of="cluster") == 1
    found = samples(NodeMetrics(FakeNode(StatusLog(), versions=Versions(1, None)), task.Clock()).exposition())
    assert value(found, "paxchat_apply_version", of="build") == 1
    assert ("paxchat_apply_version", frozenset({("of", "cluster")})) not in found


def test_a_rebuilding_node_says_so_in_a_gauge():
    found = samples(NodeMetrics(FakeNode(StatusLog(rebuilding=None)), task.Clock()).exposition())
    assert value(found, "paxchat_rebuilding") == 0
    waiting = {"waiting_for": [3], "catch_up_to": None}
    found = samples(NodeMetrics(FakeNode(StatusLog(rebuilding=waiting)), task.Clock()).exposition())
    assert value(found, "paxchat_rebuilding") == 1


def test_collector_degrades_without_status():
    node = FakeNode(Bare())
    found = samples(NodeMetrics(node, task.Clock()).exposition())
    assert value(found, "paxchat_role", role="standalone") == 1
    assert value(found, "paxchat_applied_index") == 5
    assert value(found, "paxchat_leader") == 1
    assert not any(name == "paxchat_peer_up" for name, _ in found)
    assert not any(name == "paxchat_ballot_round" for name, _ in found)
    assert not any(name.startswith("paxchat_log_fsyncs") for name, _ in found)


def test_collector_survives_no_log_and_odd_shapes():
    assert samples(NodeMetrics(FakeNode(None), task.Clock()).exposition())
    odd = StatusLog(ballot=None, role=None, leader=None, commit_index="?",
                    peers={3: {"state": "connected"}, 4: True, 5: {"match_index": 3}})
    found = samples(NodeMetrics(FakeNode(odd), task.Clock()).exposition())
    assert value(found, "paxchat_role", role="unknown") == 1
    assert value(found, "paxchat_leader") == 0
    assert ("paxchat_commit_index", frozenset()) not in found
    assert value(found, "paxchat_peer_up", peer="3") == 1
    assert value(found, "paxchat_peer_up", peer="4") == 1
    assert value(found, "paxchat_peer_up", peer="5") == 0


def test_a_broken_status_is_logged_and_scrapes_go_on():
    class Broken:
        def status(self):
            raise RuntimeError("boom")

    found = samples(NodeMetrics(FakeNode(Broken()), task.Clock()).exposition())
    assert not any(name.startswith("paxchat_role") for name, _ in found)


def test_peers_come_from_the_transport_when_the_log_has_none():
    class Transport(Service):
        peer_ids = frozenset({2, 3})
        listening = None

        def peer_state(self, peer):
            return "connected" if peer == 3 else "disconnected"

    node = FakeNode(Bare())
    Transport().setServiceParent(node)
    status = node_status(node)
    assert status["peers"] == {"2": "disconnected", "3": "connected"}


def test_submits_are_counted_and_timed():
    clock = task.Clock()
    pending = []

    class Log(Bare):
        def submit(self, command):
            d = defer.Deferred()
            pending.append(d)
            return d

    log = Log()
    metrics = NodeMetrics(FakeNode(log), clock)
    metrics.instrument(log)
    results = []
    log.submit({"op": "x"}).addBoth(results.append)
    log.submit({"op": "y"}).addBoth(results.append)
    clock.advance(0.3)
    pending[0].callback({"ok": True})
    clock.advance(0.2)
    pending[1].errback(ValueError("unavailable"))
    assert results[0] == {"ok": True}
    assert results[1].check(ValueError)
    found = samples(metrics.exposition())
    assert value(found, "paxchat_proposals_total") == 2
    assert value(found, "paxchat_commit_latency_seconds_count") == 1
    assert value(found, "paxchat_commit_latency_seconds_sum") == pytest.approx(0.3)
    assert value(found, "paxchat_commit_latency_seconds_bucket", le="0.5") == 1
    assert value(found, "paxchat_commit_latency_seconds_bucket", le="0.25") == 0
    assert value(found, "paxchat_proposal_failures_total", error="ValueError") == 1


def test_a_log_that_measures_itself_is_left_alone():
    class Log(Bare):
        measures_commits = True

        def submit(self, command):
            return defer.succeed(None)

    log = Log()
    metrics = NodeMetrics(FakeNode(log), task.Clock())
    metrics.instrument(log)
    assert "submit" not in vars(log)
    metrics.observe_proposal(3)
    metrics.observe_commit(0.01)
    metrics.observe_fsync(0.002)
    found = samples(metrics.exposition())
    assert value(found, "paxchat_proposals_total") == 3
    assert value(found, "paxchat_fsync_latency_seconds_count") == 1


@pytest_twisted.inlineCallbacks
def test_a_real_node_serves_metrics_over_http(tmp_path):
    cfg = write_ops_config(tmp_path, nodes=1, client_tls="off", bcrypt_cost=4)
    node = NodeService(cfg, 1, reactor_())
    node.startService()
    client = None
    try:
        url = f"http://{cfg.node(1).metrics}/metrics"
        client = yield connect(cfg, 1)
        created = yield client.request("create_account", username="alice", password="password1")
        assert created["ok"], created
        logged = yield client.request("login", username="alice", password="password1")
        assert logged["ok"], logged
        code, body, headers = yield http_get(url)
        assert code == 200
        assert headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
        found = samples(body)
        assert value(found, "paxchat_proposals_total") >= 2
        assert value(found, "paxchat_commit_latency_seconds_count") >= 2
        assert value(found, "paxchat_applied_index") >= 2
        assert value(found, "paxchat_fsync_latency_seconds_count") >= 1
        assert value(found, "paxchat_log_fsync_seconds_total") > 0
        roles = {dict(labels)["role"] for (name, labels), v in found.items()
                 if name == "paxchat_role" and v == 1}
        assert roles == {node_status(node)["role"]} and roles <= {"standalone", "leader"}
        assert value(found, "paxchat_clients") == 1
        assert value(found, "paxchat_connections") == 1
        assert value(found, "paxchat_clients_turned_away_total") == 0
        assert value(found, "paxchat_clients_refused_total") == 0
        code, body, _ = yield http_get(f"http://{cfg.node(1).metrics}/")
        assert code == 404
    finally:
        if client is not None:
            client.transport.loseConnection()
        yield node.stopService()


def test_a_log_that_reports_fsyncs_feeds_the_histogram():
    from paxchat.metrics import MetricsService

    class Log(Bare):
        fsync_observer = None

        def submit(self, command):
            return defer.succeed(None)

    class Node(FakeNode):
        reactor = task.Clock()
        node = type("NodeConfig", (), {"metrics": None})()

    node = Node(Log())
    service = MetricsService(node)
    service.startService()
    node.log.fsync_observer(0.004)
    node.log.fsync_observer(0.2)
    found = samples(service.metrics.exposition())
    assert value(found, "paxchat_fsync_latency_seconds_count") == 2
    assert value(found, "paxchat_fsync_latency_seconds_bucket", le="0.005") == 1
    service.stopService()


def test_the_event_loop_lag_is_sampled_while_the_service_runs():
    from paxchat.metrics import LAG_PROBE_SECONDS, MetricsService

    class Node(FakeNode):
        reactor = task.Clock()
        node = type("NodeConfig", (), {"metrics": None})()

    class Log(Bare):
        def submit(self, command):
            return defer.succeed(None)

    node = Node(Log())
    service = MetricsService(node)
    service.startService()
    clock = node.reactor
    for _ in range(5):
        clock.advance(LAG_PROBE_SECONDS)                 # on time, five times
    clock.advance(LAG_PROBE_SECONDS + 0.3)               # the loop held for 0.3 s
    found = samples(service.metrics.exposition())
    assert value(found, "paxchat_event_loop_lag_seconds_count") == 6
    assert value(found, "paxchat_event_loop_lag_seconds_bucket", le="0.001") == 5
    assert value(found, "paxchat_event_loop_lag_seconds_bucket", le="0.25") == 5
    assert value(found, "paxchat_event_loop_lag_seconds_bucket", le="0.5") == 6
    assert value(found, "paxchat_event_loop_lag_seconds_sum") == pytest.approx(0.3)
    service.stopService()
    assert clock.getDelayedCalls() == []                 # stopped: nothing left scheduled
    clock.advance(10 * LAG_PROBE_SECONDS)
    found = samples(service.metrics.exposition())
    assert value(found, "paxchat_event_loop_lag_seconds_count") == 6


def test_a_stalled_event_loop_is_logged_once_a_minute_at_most():
    from twisted.logger import formatEvent, globalLogPublisher

    from paxchat.metrics import LAG_LOG_SECONDS, LAG_PROBE_SECONDS, LAG_WARN_SECONDS, MetricsService

    class Log(Bare):
        def submit(self, command):
            return defer.succeed(None)

    class Node(FakeNode):
        reactor = task.Clock()
        node = type("NodeConfig", (), {"metrics": None})()

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        node = Node(Log(), node_id=3)
        service = MetricsService(node)
        service.startService()
        clock = node.reactor

        def warnings():
            return [formatEvent(e) for e in events
                    if e.get("log_namespace") == "paxchat.metrics" and "late" in formatEvent(e)]
        clock.advance(LAG_PROBE_SECONDS + LAG_WARN_SECONDS / 2)   # late, but not by much
        assert warnings() == []
        clock.advance(LAG_PROBE_SECONDS + 0.6)
        assert warnings() == ["node 3's event loop was 600 ms late (1 time(s) over 250 ms since"
                              " the last report): clients and peers waited as long; the node is"
                              " short of CPU or one task held it"]
        for _ in range(3):
            clock.advance(LAG_PROBE_SECONDS + 0.3)             # within the minute: counted only
        assert len(warnings()) == 1
        clock.advance(LAG_LOG_SECONDS)
        assert len(warnings()) == 2 and "(4 time(s) over 250 ms" in warnings()[1]
        service.stopService()
    finally:
        globalLogPublisher.removeObserver(events.append)


@pytest_twisted.inlineCallbacks
def test_no_metrics_address_no_listener(tmp_path):
    cfg = write_ops_config(tmp_path, nodes=1, keys=(), client_tls="off", bcrypt_cost=4)
    node = NodeService(cfg, 1, reactor_())
    node.startService()
    try:
        service = node.getServiceNamed("metrics")
        assert service.port is None
        assert node.metrics is service.metrics
    finally:
        yield node.stopService()


def test_every_role_a_node_can_report_has_a_series_and_is_documented():
    import pathlib
    import re

    from paxchat.paxos import core
    reported = {core.FOLLOWER, core.PRECANDIDATE, core.CANDIDATE, core.LEADER,
                "starting", "failed",                  # replicatedlog.ReplicatedLog.status
                "standalone"}                          # node_status of a LocalLog
    assert set(metrics.ROLES) == reported
    doc = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| `paxchat_role{role}`"))
    assert set(re.findall(r"`([a-z]+)`", row.split("|")[3])) == reported
