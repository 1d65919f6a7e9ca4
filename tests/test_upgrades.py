"""ApplyVersionKeeper: the leader moves the cluster's apply version once every build knows it."""

from twisted.internet import defer, task
from twisted.logger import capturedLogs

from paxchat.interfaces import Unavailable
from paxchat.locallog import LocalLog
from paxchat.state import chat
from paxchat.state.chat import ChatState
from paxchat.upgrades import CHECK_SECONDS, ApplyVersionKeeper
from tests.server_support import SyncWorker


class FakeLog:
    """Leads as told; answers each submit as told (Unavailable while ``answer`` is None)."""

    def __init__(self, leader=1):
        self.leader = leader
        self.submitted = []
        self.answer = {"ok": True, "result": {"version": 1}}
        self.pending = None
        self.observers = []

    def leader_id(self):
        return self.leader

    def add_observer(self, observer):
        self.observers.append(observer)

    def submit(self, command):
        self.submitted.append(command)
        if self.answer is None:
            return defer.fail(Unavailable("no quorum"))
        if self.answer == "hold":
            self.pending = defer.Deferred()
            return self.pending
        return defer.succeed(self.answer)


def keeper(builds, node_id=1, members=(1, 2, 3), version=1, cluster=0, command_log=None):
    clock = task.Clock()
    command_log = command_log or FakeLog(leader=node_id)
    k = ApplyVersionKeeper(clock, node_id, members, lambda: command_log, lambda: builds,
                           lambda: defer.succeed(cluster), version=version)
    k.startService()
    return clock, command_log, k


def test_the_leader_proposes_the_lowest_build_once_every_member_is_known():
    builds = {2: 1}
    clock, command_log, k = keeper(builds)
    clock.advance(CHECK_SECONDS)
    assert command_log.submitted == []               # node 3 is down, or says nothing
    builds[3] = 2
    clock.advance(CHECK_SECONDS)
    assert command_log.submitted == [{"op": "set_apply_version", "version": 1}]
    assert k.status() == {"build": 1, "cluster": 0, "peers": {"2": 1, "3": 2}}


def test_only_the_leader_proposes_and_only_a_move_up():
    builds = {2: 1, 3: 1}
    clock, command_log, k = keeper(builds, node_id=2, cluster=1)
    command_log.leader = 3
    clock.advance(CHECK_SECONDS * 3)
    assert command_log.submitted == []               # not the leader
    command_log.leader = 2
    clock.advance(CHECK_SECONDS * 3)
    assert command_log.submitted == []               # the cluster is there already
    builds[1] = 0                                    # an older build: nothing to move to
    clock.advance(CHECK_SECONDS)
    assert command_log.submitted == []


def test_a_move_that_came_in_a_snapshot_is_read_from_the_state_at_the_next_check():
    state = {"version": 0}
    clock = task.Clock()
    command_log = FakeLog(leader=2)
    k = ApplyVersionKeeper(clock, 1, (1, 2, 3), lambda: command_log, lambda: {2: 1, 3: 1},
                           lambda: defer.succeed(state["version"]), version=1)
    k.startService()
    assert k.status()["cluster"] == 0
    state["version"] = 1                 # restored from a peer's snapshot: no command applied
    clock.advance(CHECK_SECONDS)
    assert k.status()["cluster"] == 1
    command_log.leader = 1
    clock.advance(CHECK_SECONDS * 3)
    assert command_log.submitted == []   # nothing to move, as the state says


def test_one_proposal_at_a_time_and_a_failed_one_is_made_again():
    clock, command_log, k = keeper({2: 1, 3: 1})
    command_log.answer = "hold"
    clock.advance(CHECK_SECONDS * 3)
    assert len(command_log.submitted) == 1
    command_log.pending.errback(Unavailable("lost the lead"))
    command_log.answer = None
    clock.advance(CHECK_SECONDS)
    assert len(command_log.submitted) == 2
    command_log.answer = {"ok": True, "result": {"version": 1}}
    clock.advance(CHECK_SECONDS)
    assert len(command_log.submitted) == 3
    command_log.observers[0](command_log.submitted[-1], command_log.answer)
    assert k.cluster_version == 1
    clock.advance(CHECK_SECONDS * 3)
    assert len(command_log.submitted) == 3


def test_stopping_ends_the_checks():
    clock, command_log, k = keeper({})
    k.stopService()
    assert clock.getDelayedCalls() == []
    k.startService()
    assert len(command_log.observers) == 1           # observed once, however often started


def test_a_refused_move_is_logged():
    clock, command_log, k = keeper({2: 1, 3: 1})
    command_log.answer = {"ok": False, "error": {"code": "internal", "message": "a bug"}}
    with capturedLogs() as events:
        clock.advance(CHECK_SECONDS)
    assert any(e.get("code") == "internal" for e in events)


def test_every_node_follows_the_move_through_the_log(tmp_path, monkeypatch):
    """Over a real state: the move is applied once, and each keeper (one per node, all
    observing one log, as every node applies every command) knows the new version."""
    monkeypatch.setattr(chat, "APPLY_VERSION", 2)
    state = ChatState.open(tmp_path / "state.db")
    clock = task.Clock()
    command_log = LocalLog(clock, SyncWorker(state))
    builds = {1: 2, 2: 2, 3: 1}
    keepers = {n: ApplyVersionKeeper(clock, n, builds, lambda: command_log,
                                     lambda n=n: {m: v for m, v in builds.items() if m != n},
                                     lambda: defer.succeed(state.version()), version=builds[n])
               for n in builds}
    for k in keepers.values():
        k.startService()
    clock.advance(CHECK_SECONDS)                     # LocalLog: node 1 leads
    assert state.version() == 1 and [k.cluster_version for k in keepers.values()] == [1, 1, 1]
    builds[3] = 2                                    # node 3 upgraded
    with capturedLogs() as events:
        clock.advance(CHECK_SECONDS)
    assert state.version() == 2 and [k.cluster_version for k in keepers.values()] == [2, 2, 2]
    assert sum("apply version is now" in e.get("log_format", "") for e in events) == 3
    state.close()
