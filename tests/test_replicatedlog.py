"""ReplicatedLog: three (or one) nodes in one process, on a Clock, over an in-memory network.

Each node has a real ChatState (SQLite in tmp_path) behind a synchronous
worker, an in-memory durable log that survives a "restart", and a transport
that delivers frames after a small delay unless the link is cut.
"""

import dataclasses
import json
import sqlite3

import pytest
from twisted.application import service
from twisted.internet import defer, task

from paxchat.interfaces import ICommandLog, Unavailable
from paxchat.paxos import messages as M
from paxchat.paxos.core import CannotTransfer
from paxchat.replicatedlog import IDLE_COMMIT_SECONDS, ReplicatedLog, ReplicationSettings
from paxchat.state.chat import ChatState

SETTINGS = ReplicationSettings(heartbeat_interval=0.05, election_timeout=0.5,
                               request_timeout=2.0, snapshot_interval=10000)
# The same, compacting every 5 applied slots.
COMPACTING = dataclasses.replace(SETTINGS, snapshot_interval=5)
LATENCY = 0.002


class SyncWorker:
    """The StateWorker's interface, running each call at once (the Clock has no threads)."""

    def __init__(self, state):
        self.state = state
        self.calls = []

    def call(self, fn, *args, **kwargs):
        self.calls.append(fn if isinstance(fn, str) else getattr(fn, "__name__", "?"))
        target = getattr(self.state, fn) if isinstance(fn, str) else fn
        return defer.maybeDeferred(target, *args, **kwargs)

    def call_aside(self, fn, *args, **kwargs):
        self.calls.append(("aside", getattr(fn, "__name__", "?")))
        return defer.maybeDeferred(fn, *args, **kwargs)


class MemoryStore:
    """A DurableLog whose records live in a list that outlives the log object."""

    def __init__(self, records):
        self.records = records
        self.failed = None

    @property
    def size_bytes(self):
        return sum(map(len, self.records))

    def append(self, record):
        if self.failed is not None:
            return defer.fail(self.failed)
        self.records.append(bytes(record))
        return defer.succeed(None)

    def rewrite(self, records):
        self.records[:] = [bytes(r) for r in records]
        return defer.succeed(None)

    def close(self):
        return defer.succeed(None)


class Network:
    def __init__(self, clock):
        self.clock = clock
        self.nodes = {}       # node id -> on_message
        self.cut = set()      # node ids cut off from everyone

    def up(self, a, b):
        return a in self.nodes and b in self.nodes and a not in self.cut and b not in self.cut

    def transport(self, node_id):
        return lambda on_message: MemoryTransport(self, node_id, on_message)


class MemoryTransport(service.Service):
    def __init__(self, network, node_id, on_message):
        self.network = network
        self.node_id = node_id
        self.on_message = on_message
        network.nodes[node_id] = on_message
        self.sent = []

    def send(self, to, frame):
        net = self.network
        if not self.running or not net.up(self.node_id, to):
            return False
        self.sent.append((to, M.decode(frame)))

        def deliver():
            if net.up(self.node_id, to):
                net.nodes[to](self.node_id, frame)

        net.clock.callLater(LATENCY, deliver)
        return True

    def peer_state(self, node_id):
        return "connected" if self.network.up(self.node_id, node_id) else "disconnected"

    def add_state_observer(self, observer):
        self.observers = getattr(self, "observers", []) + [observer]

    def connected_peers(self):
        return {n for n in self.network.nodes if n != self.node_id and self.network.up(self.node_id, n)}


class RealTime:
    """A monotonic clock beside a Cluster's Clock, which stands for the wall clock:
    both advance together, but stepping the wall clock back leaves this one be."""

    def __init__(self, wall):
        self.wall = wall
        self.stepped_back = 0.0

    def seconds(self):
        return self.wall.seconds() + self.stepped_back

    def step_wall_clock_back(self, seconds):
        self.wall.rightNow -= seconds
        self.stepped_back += seconds


class Cluster:
    def __init__(self, tmp_path, size=3, settings=SETTINGS, make_worker=SyncWorker,
                 real_time=False):
        self.make_worker = make_worker
        self.clock = task.Clock()
        self.clock.advance(1000)
        # The logs read time from the Clock itself, unless given a RealTime beside it.
        self.real_time = RealTime(self.clock) if real_time else None
        self.network = Network(self.clock)
        self.tmp_path = tmp_path
        self.settings = settings
        self.members = list(range(1, size + 1))
        self.records = {n: [] for n in self.members}
        self.states = {}
        self.logs = {}
        self.applied = {n: [] for n in self.members}   # (node, op, username) as observers saw them
        self.fatal = []
        for n in self.members:
            self.start(n)

    def start(self, n):
        state = self.states.get(n) or ChatState.open(str(self.tmp_path / f"state-{n}.sqlite3"))
        self.states[n] = state
        worker = self.make_worker(state)
        store = MemoryStore(self.records[n])
        rl = ReplicatedLog(
            self.clock, n, self.members, worker, self.settings,
            open_store=lambda: defer.succeed((store, list(store.records))),
            make_transport=self.network.transport(n) if len(self.members) > 1 else None,
            on_fatal=self.fatal.append, jitter=lambda: (n * 0.37) % 1,
            **({"clock": self.real_time} if self.real_time else {}))
        rl.worker = worker
        rl.add_observer(lambda c, r, n=n: self.applied[n].append((c["op"], c.get("username"))))
        for part in rl.services():
            part.startService()
        rl.start()
        self.logs[n] = rl
        return rl

    def stop(self, n):
        rl = self.logs.pop(n)
        self.network.nodes.pop(n, None)
        rl.stop()

    def run(self, seconds):
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end:
            self.clock.advance(0.005)

    def until(self, condition, seconds=10.0, what="the condition"):
        end = self.clock.seconds() + seconds
        while not condition():
            assert self.clock.seconds() < end, f"no {what} within {seconds} s"
            self.clock.advance(0.005)

    def leader(self):
        leaders = [n for n, rl in self.logs.items() if rl.replica is not None and rl.replica.is_leader
                   and n not in self.network.cut]
        return leaders[0] if len(leaders) == 1 else None

    def wait_leader(self):
        self.until(lambda: self.leader() is not None
                   and all(rl.leader_id() == self.leader() for n, rl in self.logs.items()
                           if n not in self.network.cut), what="leader")
        return self.leader()

    def result(self, d, seconds=10.0):
        out = []
        d.addBoth(out.append)
        self.until(lambda: out, seconds, "result")
        return out[0]

    def close(self):
        for n in list(self.logs):
            self.stop(n)
        for state in self.states.values():
            state.close()


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    yield c
    c.close()


def create(name):
    return {"op": "create_account", "username": name, "pw_hash": "h", "ts": 1.0}


def test_is_a_command_log(cluster):
    assert ICommandLog.providedBy(cluster.logs[1])


def test_a_single_node_leads_at_once_and_applies(tmp_path):
    c = Cluster(tmp_path, size=1)
    try:
        c.run(0.01)
        assert c.logs[1].replica.is_leader
        response = c.result(c.logs[1].submit(create("solo")))
        assert response["ok"], response
        assert c.result(c.logs[1].read_barrier()) is None
        assert c.states[1].account("solo") is not None
    finally:
        c.close()


def test_applies_share_a_state_transaction_committed_once_the_log_is_quiet(cluster):
    leader = cluster.wait_leader()
    assert cluster.result(cluster.logs[leader].submit(create("grouped")))["ok"]
    state = cluster.states[leader]
    assert state.kv.group_open                      # applied and readable, not committed yet
    assert state.account("grouped") is not None
    cluster.run(IDLE_COMMIT_SECONDS + 0.05)
    for n, other in cluster.states.items():
        assert not other.kv.group_open, n
        reader = sqlite3.connect(other.kv.path)     # what a crash would keep
        assert reader.execute("SELECT count(*) FROM kv WHERE k = 'a/grouped'").fetchone()[0] == 1
        reader.close()


def test_a_follower_forwards_and_answers_after_its_own_apply(cluster):
    leader = cluster.wait_leader()
    follower = next(n for n in cluster.members if n != leader)
    rl = cluster.logs[follower]
    seen = []
    rl.add_observer(lambda c, r: seen.append("observer" if "rid" not in c else "rid leaked"))
    d = rl.submit(create("alice"))
    d.addCallback(lambda r: seen.append(("answer", r["ok"], cluster.states[follower].account("alice") is not None)))
    cluster.until(lambda: ("answer", True, True) in seen, what="answer")
    assert seen == ["observer", ("answer", True, True)]
    assert any(isinstance(m, M.ForwardProposals) for _, m in rl.transport.sent)
    cluster.until(lambda: all(("create_account", "alice") in cluster.applied[n] for n in cluster.members),
                  what="every node to apply")
    assert rl.status()["pending_proposals"] == 0
    assert len({cluster.states[n].digest() for n in cluster.members}) == 1


def test_observers_see_every_command_in_log_order_on_every_node(cluster):
    cluster.wait_leader()
    ds = [cluster.logs[1 + i % 3].submit(create(f"u{i}")) for i in range(30)]
    for d in ds:
        assert cluster.result(d)["ok"]
    cluster.until(lambda: all(len(cluster.applied[n]) == 30 for n in cluster.members), what="apply")
    assert cluster.applied[1] == cluster.applied[2] == cluster.applied[3]
    assert len({cluster.states[n].digest() for n in cluster.members}) == 1


def test_read_barrier_on_a_follower_waits_for_the_leaders_read_index(cluster):
    leader = cluster.wait_leader()
    follower = next(n for n in cluster.members if n != leader)
    assert cluster.result(cluster.logs[leader].submit(create("bob")))["ok"]
    # The write is acknowledged on the leader; the follower's barrier must
    # not fire before the follower has applied it.
    d = cluster.logs[follower].read_barrier()
    cluster.result(d)
    assert cluster.states[follower].account("bob") is not None
    assert any(isinstance(m, M.ReadIndexRequest) for _, m in cluster.logs[follower].transport.sent)


def test_a_wall_clock_stepped_back_does_not_stretch_the_leaders_read_lease(tmp_path):
    # The reactor's clock is the wall clock (Twisted's seconds() is time.time):
    # NTP or an operator may step it back. The lease must still end after its
    # length of real time, or a leader cut off from the others would go on
    # answering reads from its own state while they elect another and commit.
    cluster = Cluster(tmp_path, real_time=True)
    try:
        leader = cluster.wait_leader()
        rl = cluster.logs[leader]
        assert cluster.result(rl.read_barrier()) is None         # served, from the lease
        cluster.run(SETTINGS.heartbeat_interval)                  # a heartbeat acked: a fresh lease
        assert rl.replica._lease_valid(rl.replica._now)
        cluster.network.cut = {leader}
        cluster.real_time.step_wall_clock_back(60.0)
        cluster.run(SETTINGS.election_timeout)                    # longer than any lease
        outcome = cluster.result(rl.read_barrier(), seconds=2 * SETTINGS.request_timeout)
        assert isinstance(outcome.value, Unavailable), "a read served from an expired lease"
    finally:
        cluster.close()


def test_a_node_counts_time_on_a_clock_no_one_steps(tmp_path):
    import time
    from paxchat import config as configmod
    from paxchat.devcluster import write_local_config
    from paxchat.replicatedlog import MONOTONIC
    cfg = configmod.load(write_local_config(tmp_path, nodes=1))
    rl = ReplicatedLog.from_config(task.Clock(), cfg, 1, SyncWorker(None),
                                   recovered=(MemoryStore([]), []))
    assert rl._clock is MONOTONIC and MONOTONIC.seconds is time.monotonic


def test_a_cut_off_minority_answers_unavailable_in_time(cluster):
    leader = cluster.wait_leader()
    follower = next(n for n in cluster.members if n != leader)
    cluster.network.cut.add(follower)
    rl = cluster.logs[follower]
    started = cluster.clock.seconds()
    write = cluster.result(rl.submit(create("lost")))
    read = cluster.result(rl.read_barrier())
    assert isinstance(write.value, Unavailable) and isinstance(read.value, Unavailable)
    assert cluster.clock.seconds() - started <= 2 * SETTINGS.request_timeout + 0.1
    # The old leader, alone, can neither write nor read once its lease is gone.
    cluster.network.cut = {leader}
    cluster.run(SETTINGS.election_timeout * 2)
    old = cluster.logs[leader]
    assert isinstance(cluster.result(old.read_barrier()).value, Unavailable)
    # The other two elect a leader and go on.
    cluster.network.cut = {leader}
    new = cluster.wait_leader()
    assert new != leader
    assert cluster.result(cluster.logs[new].submit(create("after")))["ok"]


def test_a_restarted_node_recovers_from_its_store_and_catches_up(cluster):
    cluster.wait_leader()
    for i in range(5):
        assert cluster.result(cluster.logs[1 + i % 3].submit(create(f"a{i}")))["ok"]
    victim = 3 if cluster.leader() != 3 else 2
    cluster.stop(victim)
    for i in range(5):
        alive = next(n for n in cluster.logs)
        assert cluster.result(cluster.logs[alive].submit(create(f"b{i}")))["ok"]
    rl = cluster.start(victim)
    cluster.until(lambda: rl.applied_index is not None
                  and rl.applied_index == cluster.logs[cluster.leader()].applied_index,
                  what="catch-up")
    assert cluster.result(rl.submit(create("back")))["ok"]
    cluster.until(lambda: len({cluster.states[n].digest() for n in cluster.members}) == 1,
                  what="equal states")


def test_a_leader_heartbeats_a_peer_whose_link_just_opened_at_once(cluster):
    leader = cluster.wait_leader()
    assert cluster.result(cluster.logs[leader].submit(create("alice")))["ok"]
    peer = next(n for n in cluster.members if n != leader)
    transport = cluster.logs[leader].transport
    transport.sent.clear()
    for observer in transport.observers:
        observer(peer, "inbound", True)              # no clock advance: not the schedule
    beats = [m for to, m in transport.sent if to == peer and isinstance(m, M.Heartbeat)]
    assert beats and beats[-1].commit == cluster.logs[leader].replica.commit_index
    follower = cluster.logs[peer].transport
    follower.sent.clear()
    for observer in follower.observers:
        observer(leader, "outbound", True)           # a follower has nothing to say
    assert not follower.sent


def _one_cut_off_while_the_others_compact(c):
    """``(leader, lagging)``: 40 writes while ``lagging`` is cut off, and the
    others compacted past slot 30 (the cut stays)."""
    leader = c.wait_leader()
    lagging = next(n for n in c.members if n != leader)
    c.network.cut.add(lagging)
    for i in range(40):
        assert c.result(c.logs[leader].submit(create(f"s{i}")))["ok"]
    c.until(lambda: all(c.logs[n].replica.snapshot_index >= 30
                        for n in c.members if n != lagging), what="compaction")
    return leader, lagging


class SlowDiskWorker(SyncWorker):
    """Stores received snapshot parts only when the test says so."""

    def __init__(self, state):
        super().__init__(state)
        self.storing = []            # Deferreds of parts handed over, not yet stored

    def call(self, fn, *args, **kwargs):
        if fn != "receive_snapshot_part":
            return super().call(fn, *args, **kwargs)
        self.calls.append(fn)
        d = defer.Deferred()
        d.addCallback(lambda _: self.state.receive_snapshot_part(*args))
        self.storing.append(d)
        return d


def test_a_node_receiving_a_snapshot_asks_for_more_only_as_its_disk_stores_it(tmp_path, monkeypatch):
    core_config = ReplicationSettings.core_config
    monkeypatch.setattr(ReplicationSettings, "core_config",
                        lambda self: dataclasses.replace(core_config(self), snapshot_chunk_bytes=2048))
    c = Cluster(tmp_path, settings=COMPACTING, make_worker=SlowDiskWorker)
    try:
        leader, lagging = _one_cut_off_while_the_others_compact(c)
        worker = c.logs[lagging].worker

        def chunks():
            return sum(isinstance(m, M.SnapshotChunk) for log_ in c.logs.values()
                       for to, m in log_.transport.sent if to == lagging)
        c.network.cut.clear()
        c.until(lambda: chunks() == 2, what="two chunks")
        c.run(10 * SETTINGS.heartbeat_interval)
        # The first is being stored, the second waits its turn: nothing more is asked for.
        assert len(worker.storing) == 1 and chunks() == 2
        worker.storing[0].callback(None)
        c.until(lambda: chunks() == 3, what="a third chunk once one part is stored")
        assert len(worker.storing) == 2
        while c.logs[lagging].applied_index != c.logs[leader].applied_index:
            pending = [d for d in worker.storing if not d.called]
            if pending:
                pending[0].callback(None)
            c.run(SETTINGS.heartbeat_interval)
        assert len(worker.storing) > 3 and all(d.called for d in worker.storing)
        assert c.states[lagging].digest() == c.states[leader].digest()
        assert not c.fatal
    finally:
        c.close()


def test_a_node_behind_the_compaction_point_is_restored_by_snapshot(tmp_path):
    c = Cluster(tmp_path, settings=COMPACTING)
    try:
        leader, lagging = _one_cut_off_while_the_others_compact(c)
        lrl = c.logs[leader]
        # The leader's durable log was rewritten: nothing below the snapshot is left.
        kept = [M.decode(r) for r in c.records[leader]]
        assert any(isinstance(r, M.CompactRecord) for r in kept)
        assert all(r.first_slot > lrl.replica.snapshot_index - 40 for r in kept
                   if isinstance(r, M.AcceptRecord))
        assert len(c.records[leader]) < 40
        # Compacting serialized nothing: no peer had needed a snapshot yet.
        assert not any("snapshot" in c.logs[n].worker.calls for n in c.members)
        c.network.cut.clear()
        c.until(lambda: c.logs[lagging].applied_index == lrl.applied_index, what="catch-up")
        # Stored part by part on the worker, then restored from what was stored.
        calls = c.logs[lagging].worker.calls
        assert calls.index("receive_snapshot_part") < calls.index("restore_received")
        # A peer made one when the lagging node asked, reading the state beside its worker.
        served = [n for n in c.members if n != lagging and "snapshot" in c.logs[n].worker.calls]
        assert served and ("aside", "as_file") in c.logs[served[0]].worker.calls
        # Served from its file: each chunk read beside the worker, not on the reactor.
        assert ("aside", "read") in c.logs[served[0]].worker.calls
        assert c.states[lagging].digest() == c.states[leader].digest()
        # And it keeps applying new writes afterwards.
        assert c.result(c.logs[lagging].submit(create("later")))["ok"]
        c.until(lambda: len({c.states[n].digest() for n in c.members}) == 1, what="equal states")
        assert not c.fatal
    finally:
        c.close()


def test_a_peer_that_cannot_make_a_snapshot_logs_it_once_a_minute_and_tries_again(tmp_path):
    from twisted.logger import formatEvent, globalLogPublisher
    from paxchat.replicatedlog import BACKGROUND_LOG_SECONDS
    from paxchat.state.kv import StoreError
    c = Cluster(tmp_path, settings=COMPACTING)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        leader, lagging = _one_cut_off_while_the_others_compact(c)
        tries = []

        def full_disk():
            tries.append(1)
            raise StoreError("cannot make a snapshot file beside state.sqlite3: disk full")
        for n in c.members:
            if n != lagging:
                c.states[n].snapshot = full_disk
        c.network.cut.clear()
        failed = lambda: [formatEvent(e) for e in events  # noqa: E731
                          if "making a snapshot for a peer failed" in formatEvent(e)]
        c.until(lambda: len(tries) >= 20, what="the lagging node to ask again and again")
        assert 1 <= len(failed()) <= 2          # once per node that was asked, not once per ask
        assert all("(1 time(s) since the last report)" in line for line in failed())
        c.clock.advance(BACKGROUND_LOG_SECONDS)
        # A minute on, the next failure is reported with those in between.
        c.until(lambda: any("(1 time(s)" not in line for line in failed()),
                what="a report that counts the failures since the last")
        assert not c.fatal
    finally:
        globalLogPublisher.removeObserver(events.append)
        c.close()


def test_snapshot_now_compacts_at_the_applied_index(cluster):
    leader = cluster.wait_leader()
    rl = cluster.logs[leader]
    for i in range(5):
        assert cluster.result(rl.submit(create(f"n{i}")))["ok"]
    applied = rl.applied_index
    assert rl.replica.snapshot_index < applied
    assert cluster.result(rl.snapshot_now()) == applied
    assert rl.replica.snapshot_index == applied
    assert any(isinstance(M.decode(r), M.CompactRecord) for r in cluster.records[leader])
    # The state was made durable before the log forgot it, and was not
    # serialized: no peer asked for a snapshot.
    assert "sync" in rl.worker.calls and "snapshot" not in rl.worker.calls
    # Nothing applied since: the same index again, without another sync.
    syncs = rl.worker.calls.count("sync")
    assert cluster.result(rl.snapshot_now()) == applied
    assert rl.worker.calls.count("sync") == syncs


def test_a_compaction_cut_short_by_the_node_stopping_is_not_logged_as_a_failure(cluster):
    from twisted.logger import LogLevel, globalLogPublisher
    from paxchat.state.worker import StateWorkerStopped
    leader = cluster.wait_leader()
    rl = cluster.logs[leader]
    assert cluster.result(rl.submit(create("late")))["ok"]
    before = rl.replica.snapshot_index
    call = rl.worker.call

    def sync_fails_with(error):
        def fake(fn, *args, **kwargs):
            return defer.fail(error) if fn == "sync" else call(fn, *args, **kwargs)
        rl.worker.call = fake

    sync_fails_with(StateWorkerStopped("the state worker is stopped"))
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert cluster.result(rl.snapshot_now()) == before
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert not [e for e in events if e.get("log_level") in (LogLevel.error, LogLevel.critical)], events
    # Any other failure still is.
    sync_fails_with(OSError("disk gone"))
    globalLogPublisher.addObserver(events.append)
    try:
        cluster.result(rl.snapshot_now())
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [e for e in events if e.get("log_level") == LogLevel.critical
            and e.get("what") == "compacting the log"]


def test_a_storage_failure_stops_the_node_and_fails_what_waits(cluster):
    leader = cluster.wait_leader()
    rl = cluster.logs[leader]
    rl.store.failed = OSError("disk on fire")
    d = rl.submit(create("doomed"))
    failure = cluster.result(d)
    assert isinstance(failure.value, Unavailable)
    assert cluster.fatal and "cannot be written" in cluster.fatal[0]
    assert rl.status()["role"] == "failed"
    assert isinstance(cluster.result(rl.submit(create("later"))).value, Unavailable)


def test_bad_frames_and_forged_senders_are_dropped(cluster):
    leader = cluster.wait_leader()
    rl = cluster.logs[leader]
    before = rl.replica.commit_index
    rl._on_frame(2, b"\xff garbage")
    rl._on_frame(2, M.encode(M.ForwardProposals(3, (b"{}",))))   # claims to be node 3
    rl._on_frame(2, M.encode(M.CompactRecord(5)))                  # a record, not a message
    cluster.run(0.2)
    assert rl.status()["held_commands"] == 0 and rl.replica.is_leader
    assert rl.replica.commit_index == before


def test_step_down_gracefully_hands_leadership_over(cluster):
    leader = cluster.wait_leader()
    assert cluster.result(cluster.logs[leader].submit(create("x")))["ok"]
    done = cluster.result(cluster.logs[leader].step_down_gracefully())
    assert done is True
    new = cluster.wait_leader()
    assert new != leader
    status = cluster.logs[new].status()
    assert status["role"] == "leader" and status["leader"] == new
    assert set(status["peers"]) == set(cluster.members) - {new}


def test_a_follower_back_from_a_restart_names_the_ballot_of_the_leader_it_follows(cluster):
    """Its promise rises only when the leader's next write reaches it; the leader's
    ballot, as its heartbeats say, is what status shows beside the leader (``leader_ballot``)."""
    leader = cluster.wait_leader()
    assert cluster.result(cluster.logs[leader].submit(create("x")))["ok"]
    victim = next(n for n in cluster.members if n != leader)
    cluster.stop(victim)
    assert cluster.result(cluster.logs[leader].step_down_gracefully()) is True
    new = cluster.wait_leader()
    ballot = cluster.logs[new].replica.ballot
    rl = cluster.start(victim)
    cluster.until(lambda: rl.leader_id() == new, what="the restarted node to follow the new leader")
    status = rl.status()
    assert status["role"] == "follower" and status["leader"] == new
    assert status["leader_ballot"] == [ballot.round, ballot.node]
    assert status["ballot"] != status["leader_ballot"]     # its promise: still the earlier leader's
    assert cluster.logs[new].status()["leader_ballot"] == cluster.logs[new].status()["ballot"]


def test_stop_fails_pending_requests(cluster):
    cluster.wait_leader()
    cluster.network.cut = set(cluster.members)
    rl = cluster.logs[1]
    d = rl.submit(create("never"))
    r = rl.read_barrier()
    cluster.stop(1)
    assert isinstance(cluster.result(d).value, Unavailable)
    assert isinstance(cluster.result(r).value, Unavailable)


def test_commands_forwarded_by_the_leader_we_follow_are_not_sent_back(cluster):
    # Two nodes that each think the other leads must not bounce commands
    # between them: they wait for the leadership to change.
    leader = cluster.wait_leader()
    follower, other = [n for n in cluster.members if n != leader]
    rl = cluster.logs[follower]
    sent = []
    send = rl.transport.send
    rl.transport.send = lambda to, frame: sent.append((to, type(M.decode(frame)))) or send(to, frame)
    command = json.dumps(dict(create("bounced"), rid="x:y:1")).encode()
    rl._on_frame(leader, M.encode(M.ForwardProposals(leader, (command,))))
    cluster.run(0.3)
    assert (leader, M.ForwardProposals) not in sent
    assert rl.status()["held_commands"] == 1
    # Once another ballot leads, the command goes there and is applied everywhere.
    cluster.logs[leader].transfer_leadership(other)
    cluster.until(lambda: all(s.account("bounced") for s in cluster.states.values()),
                  what="the held command applied")
    assert rl.status()["held_commands"] == 0


def test_forwarded_commands_dropped_for_want_of_room_are_logged_once_a_minute(tmp_path):
    from twisted.logger import formatEvent, globalLogPublisher
    from paxchat.replicatedlog import BACKGROUND_LOG_SECONDS
    c = Cluster(tmp_path, settings=dataclasses.replace(SETTINGS, max_held=3))
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        leader = c.wait_leader()
        follower = next(n for n in c.members if n != leader)
        rl = c.logs[follower]

        def forward(first, count=50):
            # From the leader it follows: the follower holds them (they are not sent back).
            commands = tuple(json.dumps(dict(create(f"f{i}"), rid=f"x:y:{i}")).encode()
                             for i in range(first, first + count))
            rl._on_frame(leader, M.encode(M.ForwardProposals(leader, commands)))

        dropped = lambda: [formatEvent(e) for e in events  # noqa: E731
                           if "forwarded by node" in formatEvent(e)]
        forward(0)
        forward(50)
        assert rl.status()["held_commands"] == 3
        # One line, not one per command dropped.
        assert dropped() == [f"dropped commands forwarded by node {leader}: 3 wait for a leader"
                             " already (1 dropped since the last report); their clients retry"]
        c.clock.advance(BACKGROUND_LOG_SECONDS)     # those held expire meanwhile
        forward(100)
        assert rl.status()["held_commands"] == 3
        # A minute on, the next line counts every drop since the first: 46 + 50, and this one.
        assert len(dropped()) == 2 and "(97 dropped since the last report)" in dropped()[1]
    finally:
        globalLogPublisher.removeObserver(events.append)
        c.close()


def test_no_transfer_to_a_node_that_is_not_linked_and_the_leader_keeps_leading(cluster):
    leader = cluster.wait_leader()
    down = next(n for n in cluster.members if n != leader)
    cluster.stop(down)
    rl = cluster.logs[leader]
    ballot = rl.replica.ballot
    with pytest.raises(CannotTransfer, match=f"node {down} is not linked to node {leader} "
                                             r"\(disconnected\)"):
        rl.transfer_leadership(down)
    cluster.run(3 * SETTINGS.election_timeout)
    assert cluster.leader() == leader and rl.replica.ballot == ballot
    assert cluster.result(rl.submit(create("still")))["ok"]


def test_after_a_full_restart_a_node_missing_compacted_slots_gets_a_snapshot_made_for_it(tmp_path):
    # A restarted node has no snapshot in memory, and slots its state
    # already holds are not applied again. A peer that needs a slot below
    # the log's snapshot index (which only a snapshot holds) must still be
    # served: a whole cluster restarted at once once waited for ever, with
    # nodes compacted at different indexes.
    c = Cluster(tmp_path, settings=COMPACTING)
    try:
        leader = c.wait_leader()
        for i in range(12):
            assert c.result(c.logs[leader].submit(create(f"s{i}")))["ok"]
        c.until(lambda: len({rl.applied_index for rl in c.logs.values()}) == 1, what="applied")
        for n in c.members:
            c.stop(n)
        for n in c.members:
            c.start(n)
        c.wait_leader()
        # A node whose log lost its tail catches up from them.
        lagging = next(n for n in c.members if n != c.leader())
        c.stop(lagging)
        c.records[lagging][:] = [r for r in c.records[lagging]
                                 if not isinstance(M.decode(r), M.AcceptRecord)]
        c.start(lagging)
        c.until(lambda: c.states[lagging].digest() == c.states[c.leader()].digest(), what="catch-up")
        assert not c.fatal
    finally:
        c.close()


def test_settings_carry_the_election_timeout_range_of_cluster_ini(tmp_path):
    from paxchat import config as configmod
    from paxchat.devcluster import write_local_config
    cfg = configmod.load(write_local_config(tmp_path, nodes=3, election_timeout_min=0.4,
                                            election_timeout_max=1.5))
    core = ReplicationSettings.from_config(cfg).core_config()
    assert (core.election_timeout, core.election_timeout_max) == (0.4, 1.5)


def test_a_node_that_stops_hearing_its_leader_names_none_until_one_is_elected(cluster):
    """``hello`` must not name a leader that may be dead: a node running for
    election (the leader and the other node gone) says there is none."""
    leader = cluster.wait_leader()
    alone = next(n for n in cluster.members if n != leader)
    assert cluster.logs[alone].leader_id() == leader
    cluster.network.cut = {n for n in cluster.members if n != alone}
    cluster.until(lambda: cluster.logs[alone].replica.role != "follower",
                  what="an election started by the node left alone")
    assert cluster.logs[alone].replica.leader_id == leader   # the core keeps it as a hint
    assert cluster.logs[alone].leader_id() is None
    assert cluster.logs[alone].status()["leader"] is None
    cluster.network.cut = set()
    assert cluster.wait_leader() is not None
    assert cluster.logs[alone].leader_id() == cluster.leader()


def test_leader_observers_hear_each_change_of_leader_id_as_it_happens(cluster):
    """What ``hello`` answers is told to leader observers whenever it changes:
    to None as soon as a node runs for election (which the core's LeaderChange
    does not report), then to the leader elected; never the same value twice."""
    heard = {n: [] for n in cluster.members}
    for n, rl in cluster.logs.items():
        rl.add_leader_observer(heard[n].append)

    def step_until(condition, what):
        end = cluster.clock.seconds() + 10
        while not condition():
            assert cluster.clock.seconds() < end, f"no {what}"
            cluster.clock.advance(0.001)
            for n, rl in cluster.logs.items():   # told within the input that changed it
                assert (heard[n] or [None])[-1] == rl.leader_id(), (n, heard[n])

    step_until(lambda: cluster.leader() is not None and all(
        rl.leader_id() == cluster.leader() for rl in cluster.logs.values()), "leader")
    leader = cluster.leader()
    assert all(h == [leader] for h in heard.values()), heard
    alone = next(n for n in cluster.members if n != leader)
    cluster.network.cut = {n for n in cluster.members if n != alone}
    step_until(lambda: cluster.logs[alone].replica.role != "follower", "election")
    assert heard[alone] == [leader, None]
    cluster.network.cut = set()
    step_until(lambda: cluster.leader() is not None and all(
        rl.leader_id() == cluster.leader() for rl in cluster.logs.values()), "new leader")
    assert heard[alone][:2] == [leader, None] and heard[alone][-1] == cluster.leader()
    for h in heard.values():
        assert all(a != b for a, b in zip(h, h[1:])), heard


def test_a_lone_local_log_leads_for_ever_and_never_tells_a_change(tmp_path):
    from paxchat.locallog import LocalLog
    local = LocalLog(task.Clock(), SyncWorker(None), node_id=4)
    local.add_leader_observer(lambda leader: pytest.fail("a LocalLog's leader never changes"))
    assert local.leader_id() == 4


def _logged_in_sender(cluster, node):
    """Account ``amy`` logged in with session ``s-amy``, through ``node``."""
    rl = cluster.logs[node]
    assert cluster.result(rl.submit(create("amy")))["ok"]
    login = {"op": "login", "username": "amy", "pw_hash": "h", "session": "s-amy",
             "ts": 1.0, "expires": 10.0 ** 12}
    assert cluster.result(rl.submit(login))["ok"]


def _send(body, client_msg_id):
    return {"op": "send_message", "session": "s-amy", "from": "amy", "to": "amy", "body": body,
            "ts": 2.0, "client_msg_id": client_msg_id}


def _forwarded(cluster, command):
    """``command`` submitted on a follower of ``amy``'s, until its forward to the
    leader is on its way: ``(leader, follower, answer Deferred, when submitted)``."""
    leader = cluster.wait_leader()
    follower = next(n for n in cluster.members if n != leader)
    _logged_in_sender(cluster, follower)
    rl = cluster.logs[follower]
    sent = len(rl.transport.sent)
    started = cluster.clock.seconds()
    d = rl.submit(command)
    while not any(isinstance(m, M.ForwardProposals) for _, m in rl.transport.sent[sent:]):
        cluster.clock.advance(0.0005)
    return leader, follower, d, started


def _forward_then_lose_the_leader(cluster, command):
    """Submit ``command`` on a follower, let its forward reach the leader, and cut
    the leader off at once (before its Accept reaches anyone). The follower's id
    and the answer, with the time it took."""
    leader, follower, d, started = _forwarded(cluster, command)
    cluster.clock.advance(LATENCY)                 # delivered to the leader, which proposes it
    cluster.network.cut = {leader}
    answer = cluster.result(d, seconds=2 * SETTINGS.request_timeout)
    return follower, answer, cluster.clock.seconds() - started


def test_a_send_forwarded_to_a_leader_that_dies_goes_to_the_next_one_at_once(cluster):
    follower, answer, took = _forward_then_lose_the_leader(cluster, _send("hi", "c-1"))
    assert answer["ok"], answer
    # Elected and committed well before the request timeout (which it waited before).
    assert took < SETTINGS.request_timeout * 0.75, took
    cluster.run(0.2)                               # the other live node applies it too
    sends = [n for n in cluster.members if n not in cluster.network.cut
             and cluster.applied[n].count(("send_message", None)) == 1]
    assert len(sends) == 2, cluster.applied


def test_a_write_the_state_could_apply_twice_is_not_forwarded_again(cluster):
    """A send with no client_msg_id would be stored twice if both copies
    committed: it waits for its own fate, and fails after request_timeout."""
    command = dict(_send("no id", None))
    del command["client_msg_id"]
    follower, answer, took = _forward_then_lose_the_leader(cluster, command)
    assert isinstance(answer.value, Unavailable)
    assert took >= SETTINGS.request_timeout


def test_a_send_committed_by_the_old_leader_and_forwarded_again_is_stored_once(cluster):
    """The old leader's copy reached a majority before it was cut off; the new
    leader commits it and the copy forwarded again: the state answers the
    second from its dedup table, with the same message."""
    leader = cluster.wait_leader()
    follower = next(n for n in cluster.members if n != leader)
    third = next(n for n in cluster.members if n not in (leader, follower))
    _logged_in_sender(cluster, follower)
    rl = cluster.logs[follower]
    d = rl.submit(_send("once", "c-2"))
    # Until the third node accepted it: chosen, but no Commit has gone out yet.
    accepted = lambda: any(isinstance(m, M.Accepted) and m.count
                           for _, m in cluster.logs[third].transport.sent)
    before = len(cluster.logs[third].transport.sent)
    while not any(isinstance(m, M.Accepted) for _, m in cluster.logs[third].transport.sent[before:]):
        cluster.clock.advance(0.0005)
    assert accepted()
    cluster.network.cut = {leader}
    answer = cluster.result(d, seconds=2 * SETTINGS.request_timeout)
    assert answer["ok"], answer
    cluster.network.cut = set()
    cluster.wait_leader()
    cluster.run(0.5)
    for n in cluster.members:
        history = cluster.states[n].history_page("amy", None, None, 10)
        bodies = [m["body"] for m in history["messages"]]
        assert bodies == ["once"], (n, history)
    # Both copies committed: the path this test is about was taken.
    assert cluster.applied[follower].count(("send_message", None)) == 2, cluster.applied


def test_a_send_lost_with_the_link_to_the_leader_goes_again_once_the_link_is_back(cluster):
    leader, follower, d, started = _forwarded(cluster, _send("lost once", "c-3"))
    rl = cluster.logs[follower]
    cluster.network.cut = {follower}               # the link drops with the forward on it
    cluster.clock.advance(LATENCY)
    cluster.network.cut = set()
    cluster.run(SETTINGS.request_timeout / 4)
    assert not d.called                            # lost: nothing would send it again
    rl._link_changed(leader, "outbound", True)     # the transport says the link is back
    answer = cluster.result(d)
    assert answer["ok"] and cluster.clock.seconds() - started < SETTINGS.request_timeout / 2


def test_a_send_proposed_by_a_leader_cut_off_before_anyone_accepted_it_goes_to_the_next_leader(cluster):
    """The leader's own client: proposed, its Accepts lost as the leader is cut
    off (or paused). Once back, it hears of the new leader and sends it there
    instead of leaving it to time out."""
    leader = cluster.wait_leader()
    _logged_in_sender(cluster, leader)
    rl = cluster.logs[leader]
    sent = len(rl.transport.sent)
    started = cluster.clock.seconds()
    d = rl.submit(_send("from the leader", "c-4"))
    while not any(isinstance(m, M.Accept) and m.values for _, m in rl.transport.sent[sent:]):
        cluster.clock.advance(0.0005)
    cluster.network.cut = {leader}                 # its Accepts are lost on the way
    others = [n for n in cluster.members if n != leader]
    cluster.until(lambda: any(cluster.logs[n].replica.is_leader for n in others),
                  what="a new leader among the others")
    cluster.network.cut = set()
    answer = cluster.result(d)
    assert answer["ok"], answer
    assert cluster.clock.seconds() - started < SETTINGS.request_timeout, cluster.clock.seconds() - started


def test_a_node_whose_votes_went_with_a_snapshot_its_state_never_stored_rebuilds_before_it_votes(cluster):
    """A received snapshot's CompactRecord is on the disk, the state's restore is
    not (a crash in between): the node's votes for those slots are gone. It must
    not vote until every peer has said what it holds, or a value chosen with a
    quorum counting on its vote could be chosen again differently."""
    leader = cluster.wait_leader()
    for i in range(4):
        assert cluster.result(cluster.logs[leader].submit(create(f"a{i}")))["ok"]
    victim = next(n for n in cluster.members if n != leader)
    other = next(n for n in cluster.members if n not in (leader, victim))
    cluster.until(lambda: cluster.logs[victim].applied_index == cluster.logs[leader].applied_index,
                  what="the victim applying everything")
    cluster.stop(victim)
    applied = cluster.states[victim].applied_index()
    cluster.records[victim].append(M.encode(M.CompactRecord(applied + 3)))   # votes up to there dropped
    cluster.stop(other)                      # one peer down: the victim cannot hear from every one
    rl = cluster.start(victim)
    cluster.run(SETTINGS.election_timeout * 4)
    assert rl.replica.rebuilding and rl.status()["rebuilding"] is not None
    assert rl.replica.role != "leader"
    cluster.start(other)
    cluster.until(lambda: not rl.replica.rebuilding, what="the rebuild once every peer answered")
    assert cluster.result(rl.submit(create("back")))["ok"]
    cluster.until(lambda: len({cluster.states[n].digest() for n in cluster.members}) == 1,
                  what="equal states")
