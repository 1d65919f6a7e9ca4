"""VersionReporter: each node commits its build's apply version, retrying until it can."""

from twisted.internet import defer, task
from twisted.logger import capturedLogs

from paxchat.interfaces import Unavailable
from paxchat.locallog import LocalLog
from paxchat.state import chat
from paxchat.state.chat import ChatState
from paxchat.upgrades import MAX_RETRY_SECONDS, VersionReporter
from tests.server_support import SyncWorker


def reporters_on_one_log(tmp_path, builds):
    """One reporter per node of ``builds`` ({node: version}), all over one log and state:
    each sees every report applied, as every node of a cluster does."""
    state = ChatState.open(tmp_path / "state.db")
    command_log = LocalLog(task.Clock(), SyncWorker(state))
    reporters = {node: VersionReporter(task.Clock(), node, builds, lambda: command_log,
                                       version=version)
                 for node, version in builds.items()}
    return state, reporters


def test_the_cluster_moves_when_the_last_node_reports(tmp_path):
    state, reporters = reporters_on_one_log(tmp_path, {1: 1, 2: 1, 3: 1})
    reporters[1].startService()
    reporters[2].startService()
    assert reporters[1].committed and reporters[2].committed
    assert reporters[1].status() == {"build": 1, "cluster": 0, "committed": True,
                                     "reported": {"1": 1, "2": 1, "3": None}}
    assert state.version() == 0
    with capturedLogs() as events:
        reporters[3].startService()
    assert state.version() == 1
    assert [r.cluster_version for r in reporters.values()] == [1, 1, 1]
    assert reporters[2].reported == {"1": 1, "2": 1, "3": 1}
    moved = [e for e in events if "apply version is now" in e.get("log_format", "")]
    assert len(moved) == 2          # nodes 1 and 2 saw it move; node 3 knew no version before
    state.close()


def test_a_node_of_an_older_build_holds_the_cluster_back(tmp_path, monkeypatch):
    monkeypatch.setattr(chat, "APPLY_VERSION", 2)
    state, reporters = reporters_on_one_log(tmp_path, {1: 2, 2: 1, 3: 2})
    for reporter in reporters.values():
        reporter.startService()
    assert state.version() == 1
    assert reporters[1].status()["cluster"] == 1
    reporters[2].stopService()
    reporters[2].version = 2             # node 2 upgraded and started again
    reporters[2].startService()
    assert state.version() == 2 and reporters[3].cluster_version == 2
    state.close()


class FlakyLog:
    """Fails each submit with Unavailable until told to answer."""

    def __init__(self):
        self.submitted = []
        self.answer = None
        self.observers = []
        self.leader = 1

    def leader_id(self):
        return self.leader

    def add_observer(self, observer):
        self.observers.append(observer)

    def submit(self, command):
        self.submitted.append(command)
        if self.answer is None:
            return defer.fail(Unavailable("no leader"))
        return defer.succeed(self.answer)


def test_a_report_that_cannot_commit_is_retried_with_backoff_until_it_does():
    clock, command_log = task.Clock(), FlakyLog()
    reporter = VersionReporter(clock, 2, [3, 1, 2], lambda: command_log)
    reporter.startService()
    assert command_log.submitted == [{"op": "node_version", "node": 2,
                                      "version": chat.APPLY_VERSION, "members": [1, 2, 3]}]
    waits = []
    for _ in range(7):
        waits.append(clock.getDelayedCalls()[0].getTime() - clock.seconds())
        clock.advance(waits[-1])
    assert waits == [1, 2, 4, 8, 16, MAX_RETRY_SECONDS, MAX_RETRY_SECONDS]
    assert len(command_log.submitted) == 8 and not reporter.committed
    command_log.answer = {"ok": True, "result": {"version": 0, "reported": {}}}
    clock.advance(MAX_RETRY_SECONDS)
    assert reporter.committed and clock.getDelayedCalls() == []
    assert len(command_log.observers) == 1


def test_no_report_is_made_while_no_leader_is_known():
    """A node alone (no quorum yet) keeps nothing in its log: a stop would wait for it."""
    clock, command_log = task.Clock(), FlakyLog()
    command_log.leader = None
    reporter = VersionReporter(clock, 1, [1, 2, 3], lambda: command_log)
    reporter.startService()
    for _ in range(5):
        assert clock.getDelayedCalls()[0].getTime() - clock.seconds() == 1
        clock.advance(1)
    assert command_log.submitted == []
    command_log.leader = 3
    command_log.answer = {"ok": True, "result": {"version": 0, "reported": {}}}
    clock.advance(1)
    assert len(command_log.submitted) == 1 and reporter.committed


def test_stopping_ends_the_retries_and_a_restart_reports_again():
    clock, command_log = task.Clock(), FlakyLog()
    reporter = VersionReporter(clock, 1, [1], lambda: command_log)
    reporter.startService()
    reporter.stopService()
    assert clock.getDelayedCalls() == []
    command_log.answer = {"ok": True, "result": {"version": 1, "reported": {"1": 1}}}
    reporter.startService()
    assert reporter.committed and len(command_log.submitted) == 2
    assert len(command_log.observers) == 1           # observed once, however often started


def test_a_refused_report_is_logged_and_not_retried():
    clock, command_log = task.Clock(), FlakyLog()
    command_log.answer = {"ok": False, "error": {"code": "unknown_op", "message": "no such op"}}
    reporter = VersionReporter(clock, 1, [1, 2, 3], lambda: command_log)
    with capturedLogs() as events:
        reporter.startService()
    assert not reporter.committed and clock.getDelayedCalls() == []
    assert any(e.get("code") == "unknown_op" for e in events)
