"""The Multi-Paxos replica's behaviour, one feature at a time, over a reliable toy network.

The deterministic simulator (tests/sim) hammers the same code with faults;
these tests pin down the API contract the node glue relies on.
"""

import pytest

from paxchat.paxos import messages as M
from paxchat.paxos.core import CannotTransfer, Config, DurableState, NotLeader, ReadState, Replica

CFG = Config(heartbeat_interval=0.05, election_timeout=0.3, window=8)


class Net:
    """Replicas on a lossless network; ``cut`` nodes hear and say nothing."""

    def __init__(self, n=3, config=CFG, auto_persist=True):
        self.ids = list(range(1, n + 1))
        self.config = config
        self.now = 0.0
        self.reps = {i: Replica(i, self.ids, config=config, seed=3, now=0.0) for i in self.ids}
        self.auto_persist = auto_persist
        self.store_parts = True                  # report each snapshot part stored at once
        self.cut = set()
        self.decided = {i: [] for i in self.ids}
        self.snapshots = {i: [] for i in self.ids}
        self.pieces = {}                         # node -> parts its last snapshot came in
        self.incoming = {}                       # node -> (index, bytes so far) being received
        self.disk = {i: [] for i in self.ids}
        self.tokens = {i: 0 for i in self.ids}
        self.reads = {i: [] for i in self.ids}
        self.wants = {i: 0 for i in self.ids}   # times ready() asked for a snapshot
        self.rebuilt = {i: 0 for i in self.ids}  # times ready() said a rebuild was done
        self.sent = []

    def handle(self, i, rd):
        if rd.records:
            self.disk[i].extend(rd.records)
            self.tokens[i] = rd.token
            if self.auto_persist:
                self.reps[i].persisted(rd.token)
        for index, offset, part in rd.snapshot_parts:     # stored as they come, in order
            if offset == 0:
                self.incoming[i] = (index, bytearray())
            assert self.incoming[i][0] == index and len(self.incoming[i][1]) == offset
            self.incoming[i][1].extend(part)
            self.pieces[i] = self.pieces.get(i, 0) + 1 if offset else 1
            if self.store_parts:
                self.reps[i].snapshot_part_stored()
        if rd.snapshot is not None:
            assert self.incoming[i][0] == rd.snapshot
            self.snapshots[i].append((rd.snapshot, bytes(self.incoming.pop(i)[1])))
        self.decided[i].extend(rd.decided)
        self.rebuilt[i] += rd.rebuilt
        self.reads[i].extend(rd.reads)
        self.wants[i] += rd.want_snapshot
        return list(rd.messages)

    def pump(self):
        for _ in range(1000):
            queue = []
            for i, r in self.reps.items():
                for to, msg in self.handle(i, r.ready()):
                    self.sent.append((i, to, msg))
                    if i not in self.cut and to not in self.cut:
                        queue.append((to, M.decode(M.encode(msg))))
            if not queue and not any(r.has_ready() for r in self.reps.values()):
                return
            for to, msg in queue:
                self.reps[to].receive(msg, self.now)
        raise AssertionError("the network never went quiet")

    def step(self, dt=0.01):
        self.now += dt
        for r in self.reps.values():
            r.tick(self.now)
        self.pump()

    def run_until(self, cond, limit=10.0):
        end = self.now + limit
        while self.now < end:
            if cond():
                return
            self.step()
        raise AssertionError("condition not reached")

    def leader(self):
        leaders = [r for i, r in self.reps.items() if r.is_leader and i not in self.cut]
        return leaders[0] if leaders else None

    def elect(self):
        self.run_until(lambda: self.leader() is not None)
        self.step()
        return self.leader()

    def commands(self, i):
        return [c for _, v in self.decided[i] for c in v]


def test_single_node_cluster_decides_alone():
    net = Net(1)
    r = net.elect()
    r.propose(b"x")
    net.step()
    assert net.commands(1) == [b"x"]


def test_propose_on_a_follower_raises_not_leader_with_a_hint():
    net = Net(3)
    leader = net.elect()
    follower = next(r for r in net.reps.values() if r is not leader)
    with pytest.raises(NotLeader) as e:
        follower.propose(b"x")
    assert e.value.leader_hint == leader.node_id
    with pytest.raises(NotLeader):
        follower.read("r1")
    with pytest.raises(TypeError):
        leader.propose("not bytes")


def test_three_nodes_elect_one_leader_and_agree():
    net = Net(3)
    leader = net.elect()
    assert sum(r.is_leader for r in net.reps.values()) == 1
    for k in range(20):
        leader.propose(b"c%d" % k)
        net.step()
    net.step(0.1)
    want = [b"c%d" % k for k in range(20)]
    for i in net.ids:
        assert net.commands(i) == want
        slots = [s for s, _ in net.decided[i]]
        assert slots == list(range(1, len(slots) + 1))


def test_commands_proposed_together_share_one_slot():
    net = Net(3)
    leader = net.elect()
    before = len(net.decided[leader.node_id])
    for k in range(100):
        leader.propose(b"c%d" % k)
    net.step()
    new = net.decided[leader.node_id][before:]
    assert len(new) == 1 and len(new[0][1]) == 100


def test_followers_learn_a_commit_at_once_not_at_the_next_heartbeat():
    # A node answers the clients it took a write from once it applies the
    # write, so a follower must hear of the commit without waiting for a tick.
    net = Net(3)
    leader = net.elect()
    leader.propose(b"only")
    net.pump()                       # no time passes: no periodic heartbeat
    for i in net.ids:
        assert net.commands(i)[-1:] == [b"only"]
    heartbeats = [m for f, _, m in net.sent if f == leader.node_id and isinstance(m, M.Heartbeat)]
    assert heartbeats and heartbeats[-1].commit == leader.commit_index
    sent = len(net.sent)
    net.pump()
    assert len(net.sent) == sent     # told once: nothing more to say


def test_pipeline_window_bounds_slots_in_flight():
    cfg = Config(heartbeat_interval=0.05, election_timeout=0.3, window=3, max_batch_commands=1)
    net = Net(3, cfg)
    leader = net.elect()
    net.cut = set(leader.peers)            # nobody acknowledges
    for k in range(10):
        leader.propose(b"c%d" % k)
    net.pump()
    accepts = [m for _, _, m in net.sent if isinstance(m, M.Accept)]
    slots = {m.first_slot + i for m in accepts for i in range(len(m.values))}
    assert len(slots) == 3
    net.cut = set()
    net.run_until(lambda: len(net.commands(leader.node_id)) == 10)


def test_acceptor_replies_only_after_its_record_is_persisted():
    net = Net(3, auto_persist=False)
    net.auto_persist = True
    leader = net.elect()
    net.auto_persist = False
    leader.propose(b"x")
    net.sent.clear()
    net.pump()
    assert not [m for _, _, m in net.sent if isinstance(m, M.Accepted)]
    assert net.commands(leader.node_id) == []          # the leader's own vote waits for its disk too
    follower = leader.peers[0]
    assert any(isinstance(rec, M.AcceptRecord) for rec in net.disk[follower])
    net.reps[follower].persisted(net.tokens[follower])
    net.pump()
    assert [m for _, _, m in net.sent if isinstance(m, M.Accepted)]
    leader.persisted(net.tokens[leader.node_id])
    net.pump()
    assert net.commands(leader.node_id) == [b"x"]


def test_restart_from_records_keeps_promise_and_accepted_values():
    net = Net(3)
    leader = net.elect()
    leader.propose(b"x")
    net.step()
    i = leader.peers[0]
    durable = DurableState.from_records(net.disk[i])
    assert durable.promised == net.reps[i].promised
    assert (durable.accepted[1][1]) == (b"x",)
    again = DurableState.from_records(durable.to_records())
    assert again == durable
    r = Replica(i, net.ids, config=CFG, durable=durable, now=net.now)
    assert r.promised == durable.promised and r.commit_index == 0
    net.reps[i] = r
    net.decided[i] = []
    leader.propose(b"y")
    net.run_until(lambda: net.commands(i) == [b"x", b"y"])


def test_from_records_folds_compaction_and_rejects_junk():
    b1, b2 = M.Ballot(1, 1), M.Ballot(2, 2)
    recs = [M.PromiseRecord(b1), M.AcceptRecord(b1, 1, ((b"a",), (b"b",), (b"c",))),
            M.AcceptRecord(b2, 3, ((b"C",),)), M.CompactRecord(1)]
    d = DurableState.from_records(recs)
    assert d.promised == b2 and d.snapshot_index == 1
    assert d.accepted == {2: (b1, (b"b",)), 3: (b2, (b"C",))}
    with pytest.raises(TypeError):
        DurableState.from_records([b"junk"])


def test_an_isolated_node_does_not_depose_a_live_leader():
    net = Net(3)
    leader = net.elect()
    ballot = leader.promised
    loner = leader.peers[0]
    net.cut = {loner}
    net.run_until(lambda: False if net.now < 3.0 else True, limit=4.0)
    assert net.reps[loner].promised == ballot        # pre-vote kept it from raising its ballot
    net.cut = set()
    for _ in range(50):
        net.step()
    assert leader.is_leader and leader.promised == ballot


def test_a_new_leader_is_elected_when_the_leader_is_cut_off_and_keeps_chosen_values():
    net = Net(5)
    leader = net.elect()
    leader.propose(b"before")
    net.step()
    net.cut = {leader.node_id}
    net.run_until(lambda: net.leader() is not None, limit=5.0)
    new = net.leader()
    assert new.promised > leader.promised
    assert not leader.is_leader                        # stepped down: lost its quorum
    new.propose(b"after")
    net.run_until(lambda: b"after" in net.commands(new.node_id))
    assert net.commands(new.node_id) == [b"before", b"after"]


def test_read_index_waits_for_a_heartbeat_quorum():
    net = Net(3)
    leader = net.elect()
    leader.propose(b"x")
    net.step()
    net.cut = set(leader.peers)
    leader.read("r1")
    for _ in range(3):
        net.step()
    assert net.reads[leader.node_id] == []
    net.cut = set()
    net.run_until(lambda: net.reads[leader.node_id], limit=0.2)   # the next heartbeat confirms it
    assert net.reads[leader.node_id] == [ReadState("r1", 1)]


def test_lease_reads_are_immediate_only_while_the_lease_holds():
    net = Net(3)
    leader = net.elect()
    net.step(0.1)
    leader.read("a", lease=True, now=net.now)
    assert leader.ready().reads == (ReadState("a", leader.commit_index),)
    leader.read("b", lease=True)                       # no time given: read-index instead
    assert leader.ready().reads == ()
    net.cut = set(leader.peers)
    net.now += CFG.lease_duration + 0.01               # no tick since: only `now` tells
    leader.read("c", lease=True, now=net.now)
    assert leader.ready().reads == ()


def _five_decided_while_one_is_cut_off():
    """(net, leader, lagger): 10-byte snapshot chunks, slots 1-5 decided without ``lagger``."""
    cfg = Config(heartbeat_interval=0.05, election_timeout=0.3, snapshot_chunk_bytes=10)
    net = Net(3, cfg)
    leader = net.elect()
    lagger = leader.peers[0]
    net.cut = {lagger}
    for k in range(5):
        leader.propose(b"c%d" % k)
        net.step()
    return net, leader, lagger


def _compact_and_offer_but_on(net, lagger, data):
    """Every node but ``lagger`` compacts at its commit index and offers ``data`` there."""
    for i in net.ids:
        if i != lagger:
            r = net.reps[i]
            r.compact(r.commit_index)
            assert r.offer_snapshot(r.commit_index, data)


def test_lagging_follower_gets_the_snapshot_in_chunks_then_the_tail():
    net, leader, lagger = _five_decided_while_one_is_cut_off()
    data = b"application snapshot bytes " * 3
    _compact_and_offer_but_on(net, lagger, data)
    with pytest.raises(ValueError):
        leader.compact(leader.commit_index + 1)
    leader.propose(b"tail")
    net.step()
    net.cut = set()
    net.run_until(lambda: b"tail" in net.commands(lagger))
    assert net.snapshots[lagger] == [(5, data)]
    chunks = [m for s, to, m in net.sent if isinstance(m, M.SnapshotChunk) and to == lagger]
    assert len({m.offset for m in chunks}) == 9 and all(len(m.data) <= 10 for m in chunks)
    assert net.pieces[lagger] == 9
    assert any(isinstance(rec, M.CompactRecord) and rec.index == 5 for rec in net.disk[lagger])
    assert net.decided[lagger][-1] == (6, (b"tail",))


def test_a_receiver_asks_for_the_next_chunk_only_while_fewer_than_two_wait_to_be_stored():
    from paxchat.paxos.core import SNAPSHOT_UNSTORED_PARTS
    assert SNAPSHOT_UNSTORED_PARTS == 2
    net, leader, lagger = _five_decided_while_one_is_cut_off()
    data = bytes(range(81))
    _compact_and_offer_but_on(net, lagger, data)
    net.store_parts = False                      # a disk slower than the network
    net.cut = set()

    def chunks():
        return [m for _, to, m in net.sent if isinstance(m, M.SnapshotChunk) and to == lagger]

    def asks():
        return [(to, m) for s, to, m in net.sent if s == lagger and isinstance(m, M.CatchupRequest)]
    net.run_until(lambda: len(chunks()) == 2)
    held_asks = len(asks())
    for _ in range(40):                          # 8 heartbeat intervals: nothing more is asked
        net.step()
    assert len(chunks()) == 2 and len(asks()) == held_asks
    assert net.incoming[lagger] == (5, bytearray(data[:20]))

    server = chunks()[-1].sender
    net.reps[lagger].snapshot_part_stored()      # the first part is on disk: one more may come
    net.pump()
    assert len(chunks()) == 3 and asks()[-1][0] == server
    assert asks()[-1][1].snapshot_offset == 20
    net.store_parts = True
    net.reps[lagger].snapshot_part_stored()      # the two parts still waiting
    net.reps[lagger].snapshot_part_stored()
    net.run_until(lambda: net.snapshots[lagger])
    assert net.snapshots[lagger] == [(5, data)]
    assert {m.sender for m in chunks()} == {server}


def _holding_two_parts_of(index):
    """A replica catching up from node 2 that got two 3-byte parts of snapshot
    ``index`` and stored neither: it holds back its next ask."""
    r = Replica(1, [1, 2, 3], config=Config(snapshot_chunk_bytes=3), now=0.0)
    r.receive(M.Heartbeat(2, M.Ballot(1, 2), 20, 1), 0.0)          # far behind: catch up from 2
    r.receive(M.SnapshotChunk(2, index, 0, 9, b"abc"), 0.0)
    r.receive(M.SnapshotChunk(2, index, 3, 9, b"def"), 0.0)
    r.ready()
    return r


def _asks(r):
    """(to, snapshot index, offset) of the catch-up requests in the replica's next Ready."""
    return [(to, m.snapshot_index, m.snapshot_offset) for to, m in r.ready().messages
            if isinstance(m, M.CatchupRequest)]


def test_parts_of_an_earlier_transfer_still_unstored_hold_back_the_next_one():
    r = _holding_two_parts_of(5)
    r.receive(M.SnapshotChunk(2, 9, 0, 9, b"ghi"), 0.0)           # the peer starts a newer one
    assert _asks(r) == []                        # three parts in memory: none of them stored
    r.snapshot_part_stored()
    assert _asks(r) == []                        # still two
    r.snapshot_part_stored()
    assert _asks(r) == [(2, 9, 3)]


def test_a_learn_while_the_receiver_waits_for_its_disk_asks_nothing_and_keeps_the_peer():
    r = _holding_two_parts_of(10)
    r.receive(M.Learn(3, 1, ((b"x",),)), 0.0)                      # a late answer from another peer
    assert r.commit_index == 1
    assert _asks(r) == []
    r.snapshot_part_stored()
    assert _asks(r) == [(2, 10, 6)]


def test_a_leader_kept_waiting_for_a_snapshot_turns_to_another_peer_though_it_keeps_being_reelected():
    """A peer that says "preparing a snapshot, keep asking me" but never sends
    one (its state is ahead of its log since it restarted, so it can offer
    none) is left after SNAPSHOT_WAIT_SECONDS. Re-running phase 1, which a
    leader that cannot catch up does every two election timeouts, is no
    progress: it used to restart that wait each time, for ever."""
    from paxchat.paxos.core import SNAPSHOT_WAIT_SECONDS
    r = Replica(1, [1, 2, 3], config=Config(heartbeat_interval=0.05, election_timeout=0.3),
                seed=3, now=0.0)
    now, asked, elections = 0.0, [], 0
    while now < SNAPSHOT_WAIT_SECONDS + 2 and not any(to == 3 for _, to in asked):
        now += 0.01
        r.tick(now)
        while r.has_ready():
            rd = r.ready()
            if rd.records:
                r.persisted(rd.token)
            replies = []
            for to, m in rd.messages:
                if isinstance(m, M.PreVote):
                    replies.append(M.PreVoteReply(to, m.ballot, True))
                elif isinstance(m, M.Prepare):           # node 2 knows slots 1-10 chosen
                    elections += 1
                    replies.append(M.Promise(to, m.ballot, 10 if to == 2 else 0, ()))
                elif isinstance(m, M.Heartbeat):
                    replies.append(M.HeartbeatAck(to, m.ballot, m.seq, 0))
                elif isinstance(m, M.CatchupRequest):
                    asked.append((now, to))
                    if to == 2:
                        replies.append(M.Learn(2, m.from_slot, ()))
            for m in replies:
                r.receive(m, now)
    first = asked[0][0]
    assert [to for _, to in asked][:3] == [2, 2, 2] and elections > 5
    assert asked[-1][1] == 3 and asked[-1][0] - first < SNAPSHOT_WAIT_SECONDS + 0.5


def test_parts_of_a_newer_snapshot_wait_for_the_ready_after_the_restore_of_the_one_they_follow():
    r = Replica(1, [1, 2, 3], now=0.0)
    r.receive(M.SnapshotChunk(2, 5, 0, 6, b"abc"), 0.0)
    r.receive(M.SnapshotChunk(2, 5, 3, 6, b"def"), 0.0)        # snapshot 5 is whole
    r.receive(M.SnapshotChunk(3, 9, 0, 8, b"ghij"), 0.0)       # and a newer one begins
    first = r.ready()
    assert first.snapshot == 5 and first.snapshot_parts == ((5, 0, b"abc"), (5, 3, b"def"))
    second = r.ready()
    assert second.snapshot is None and second.snapshot_parts == ((9, 0, b"ghij"),)
    assert not r.has_ready() or not r.ready().snapshot_parts


def test_a_snapshot_no_peer_was_sent_for_a_minute_is_let_go_and_made_anew_when_needed():
    from paxchat.paxos.core import SNAPSHOT_KEEP_SECONDS
    net, leader, lagger = _five_decided_while_one_is_cut_off()
    _compact_and_offer_but_on(net, lagger, b"application snapshot bytes " * 3)
    net.cut = set()
    net.run_until(lambda: net.snapshots[lagger])
    kept = lambda i: net.reps[i]._offered is not None or net.reps[i]._snap_out  # noqa: E731
    # The senders keep theirs (the installer kept none: it stored the parts as they came).
    assert [i for i in net.ids if kept(i)] == [i for i in net.ids if i != lagger]
    net.run_until(lambda: not any(kept(i) for i in net.ids), limit=SNAPSHOT_KEEP_SECONDS + 1)
    assert net.now > SNAPSHOT_KEEP_SECONDS
    # A peer that needs one after that has it asked for again, and gets it.
    other = next(i for i in net.ids if i not in (lagger, leader.node_id))
    net.cut = {other}
    for k in range(3):
        leader.propose(b"later%d" % k)
        net.step()
    for i in net.ids:
        if i != other:
            net.reps[i].compact(net.reps[i].commit_index)
    wants = sum(net.wants.values())
    net.cut = set()
    net.run_until(lambda: sum(net.wants.values()) > wants)


def test_a_snapshot_is_asked_for_only_when_a_peer_needs_one():
    net, leader, lagger = _five_decided_while_one_is_cut_off()
    for i in net.ids:
        if i != lagger:
            net.reps[i].compact(net.reps[i].commit_index)      # no data: the state is durable
    net.step()
    assert sum(net.wants.values()) == 0                        # compacting asks for nothing
    net.cut = set()
    net.run_until(lambda: sum(net.wants.values()) > 0)
    asker = next(net.reps[i] for i in net.ids if net.wants[i])
    assert not any(isinstance(m, M.SnapshotChunk) for _, _, m in net.sent)
    # One the log does not continue from, or one past what this replica decided, is refused.
    assert asker.snapshot_index == 5
    assert not asker.offer_snapshot(4, b"older than the compaction")
    assert not asker.offer_snapshot(asker.commit_index + 1, b"not decided here")
    data = b"application snapshot bytes " * 3
    assert asker.offer_snapshot(5, data)
    leader.propose(b"tail")
    net.run_until(lambda: b"tail" in net.commands(lagger))
    assert net.snapshots[lagger] == [(5, data)]
    # Compacting past an offered snapshot lets it go: a peer needing one asks anew.
    asker.compact(asker.commit_index)
    assert asker._offered is None


def _twenty_slots_missed(**config):
    """(net, leader, lagger): 20 slots of 50-byte commands decided without ``lagger``."""
    cfg = Config(**{"heartbeat_interval": 0.05, "election_timeout": 0.3, "catchup_slots": 4,
                    "snapshot_chunk_bytes": 400, **config})
    net = Net(3, cfg)
    leader = net.elect()
    lagger = leader.peers[0]
    net.cut = {lagger}
    for k in range(20):
        leader.propose(b"%02d" % k + b"x" * 48)
        net.step()
    return net, leader, lagger


def _ask(leader, lagger, at, index=0, offset=0):
    """``lagger`` asks ``leader`` for slot 1 on (and a snapshot from ``offset``): what it is sent."""
    leader.receive(M.CatchupRequest(lagger, 1, index, offset), at)
    return [m for to, m in leader.ready().messages if to == lagger]


def _learns_to(net, node):
    """Runs of the log sent to ``node`` (not the empty "being prepared" answers)."""
    return [m for _, to, m in net.sent if isinstance(m, M.Learn) and to == node and m.values]


def _waits_to(net, node):
    """Empty runs sent to ``node``: "what you miss is being prepared, keep asking me"."""
    return [m for _, to, m in net.sent if isinstance(m, M.Learn) and to == node and not m.values]


def _kinds(messages):
    return ["wait" if isinstance(m, M.Learn) and not m.values else type(m).__name__
            for m in messages]


def test_a_peer_missing_much_of_the_state_is_sent_a_snapshot_while_the_log_still_holds_it():
    net, leader, lagger = _twenty_slots_missed(snapshot_catchup_fraction=0.5)
    data = b"an image of the state " * 40                 # 880 bytes; 1,000 of log are missed
    for i in net.ids:
        if i != lagger:
            r = net.reps[i]
            r.note_state_bytes(len(data))
            assert r.offer_snapshot(r.commit_index, data)
    sent_before = len(net.sent)
    net.cut = set()
    leader.propose(b"tail")
    net.run_until(lambda: b"tail" in net.commands(lagger))
    index = net.snapshots[lagger][0][0]
    assert net.snapshots[lagger] == [(index, data)] and index >= 20
    assert not [m for _, to, m in net.sent[sent_before:]
                if isinstance(m, M.Learn) and to == lagger and m.first_slot <= index]
    assert leader.snapshot_index == 0                         # nothing was compacted


def test_a_transfer_under_way_goes_on_though_the_estimate_turns_against_it():
    net, leader, lagger = _twenty_slots_missed(snapshot_catchup_fraction=0.5)
    data = b"an image of the state " * 40                 # three 400-byte chunks
    leader.note_state_bytes(len(data))
    assert leader.offer_snapshot(leader.commit_index, data)
    leader.ready()

    def ask(index, offset):
        return _ask(leader, lagger, net.now, index, offset)

    first = ask(0, 0)
    assert [(type(m), m.offset) for m in first] == [(M.SnapshotChunk, 0)]
    leader.note_state_bytes(100 * len(data))             # the log would now look cheaper
    assert [(type(m), m.offset) for m in ask(first[0].index, 400)] == [(M.SnapshotChunk, 400)]
    assert [type(m) for m in ask(0, 0)] == [M.Learn]       # a new request gets the log


@pytest.mark.parametrize("case", ["size unknown", "state too big", "turned off", "few slots"])
def test_otherwise_a_peer_that_the_log_can_serve_gets_the_log(case):
    net, leader, lagger = _twenty_slots_missed(
        snapshot_catchup_fraction=None if case == "turned off" else 0.5,
        **({"catchup_slots": 32} if case == "few slots" else {}))
    data = b"an image of the state " * 40
    for i in net.ids:
        if i != lagger:
            r = net.reps[i]
            if case != "size unknown":
                r.note_state_bytes(10 * len(data) if case == "state too big" else len(data))
            assert r.offer_snapshot(r.commit_index, data)
    net.cut = set()
    leader.propose(b"tail")
    net.run_until(lambda: b"tail" in net.commands(lagger))
    assert net.snapshots[lagger] == [] and _learns_to(net, lagger)
    assert [c for c in net.commands(lagger) if c != b"tail"] == net.commands(leader.node_id)[:20]


def test_a_peer_far_behind_waits_for_a_fresh_snapshot_rather_than_replay_the_log():
    net, leader, lagger = _twenty_slots_missed(snapshot_catchup_fraction=0.5)
    servers = [net.reps[i] for i in net.ids if i != lagger]
    for r in servers:
        r.note_state_bytes(880)
        # Spares the peer 2 of the 20 slots it misses: too little to be worth sending.
        assert r.offer_snapshot(2, b"old image")
    net.cut = set()
    healed = len(net.sent)
    net.run_until(lambda: sum(net.wants[r.node_id] for r in servers) > 0)
    for _ in range(20):
        net.step()
    assert net.snapshots[lagger] == [] and not _learns_to(net, lagger)
    assert net.reps[lagger].commit_index == 0
    # Told to wait, it kept asking the peer that prepares its snapshot, so
    # only that one makes one.
    asked_peers = {to for sender, to, m in net.sent[healed:]
                   if sender == lagger and isinstance(m, M.CatchupRequest)}
    assert len(asked_peers) == 1 and _waits_to(net, lagger)
    assert [r.node_id for r in servers if net.wants[r.node_id]] == list(asked_peers)
    data = b"an image of the state " * 40
    asked = [r for r in servers if net.wants[r.node_id]]
    for r in servers:
        assert r.offer_snapshot(r.commit_index, data)
    # Whoever was asked sends the first chunk at once, without being asked again.
    first = [(to, m) for r in asked for to, m in r.ready().messages
             if isinstance(m, M.SnapshotChunk)]
    assert first and all(to == lagger and m.offset == 0 for to, m in first)
    leader.propose(b"tail")
    net.run_until(lambda: b"tail" in net.commands(lagger))
    assert [d for _, d in net.snapshots[lagger]] == [data]


def test_a_peer_far_behind_is_served_from_the_log_when_no_snapshot_comes_in_time():
    from paxchat.paxos.core import SNAPSHOT_WAIT_SECONDS
    net, leader, lagger = _twenty_slots_missed(snapshot_catchup_fraction=0.5)
    for i in net.ids:
        if i != lagger:
            net.reps[i].note_state_bytes(880)          # but no snapshot is ever offered
    net.cut = set()
    start = net.now
    net.run_until(lambda: sum(net.wants[i] for i in net.ids if i != lagger) > 0)
    net.run_until(lambda: net.now >= start + SNAPSHOT_WAIT_SECONDS - 0.2)
    assert not _learns_to(net, lagger) and net.reps[lagger].commit_index == 0
    leader.propose(b"tail")
    net.run_until(lambda: b"tail" in net.commands(lagger), limit=2.0)
    assert net.snapshots[lagger] == [] and _learns_to(net, lagger)


def test_a_peer_that_comes_back_far_behind_waits_anew():
    from paxchat.paxos.core import SNAPSHOT_WAIT_SECONDS
    net, leader, lagger = _twenty_slots_missed(snapshot_catchup_fraction=0.5)
    leader.note_state_bytes(880)                           # and no snapshot is offered
    leader.ready()
    now = net.now

    def ask(at):
        return _kinds(_ask(leader, lagger, at))

    steps = int(SNAPSHOT_WAIT_SECONDS / 0.1)
    assert all(ask(now + 0.1 * k) == ["wait"] for k in range(steps))   # asking every 0.1 s
    assert ask(now + 0.1 * steps + 0.05) == ["Learn"]              # waited out: the log
    later = now + 0.1 * steps + 2 * leader.config.election_timeout
    assert ask(later) == ["wait"]                            # silent since: a new wait
    assert leader.offer_snapshot(leader.commit_index, b"image")
    assert [type(m) for to, m in leader.ready().messages if to == lagger] == [M.SnapshotChunk]


def test_a_peer_told_to_wait_too_long_turns_to_another():
    """Behind the compacted log, with no snapshot ever offered: the peer
    asked keeps saying "wait"; after SNAPSHOT_WAIT_SECONDS the asker tries
    the next peer, as it would if nobody answered."""
    from paxchat.paxos.core import SNAPSHOT_WAIT_SECONDS
    net, leader, lagger = _five_decided_while_one_is_cut_off()
    for i in net.ids:
        if i != lagger:
            net.reps[i].compact(net.reps[i].commit_index)   # and never offer a snapshot
    net.cut = set()
    healed, start = len(net.sent), net.now

    def asked():
        return {to for sender, to, m in net.sent[healed:]
                if sender == lagger and isinstance(m, M.CatchupRequest)}
    net.run_until(lambda: net.now >= start + SNAPSHOT_WAIT_SECONDS - 0.2)
    assert len(asked()) == 1 and _waits_to(net, lagger)
    net.run_until(lambda: len(asked()) == 2, limit=1.0)


def test_snapshot_catchup_fraction_is_checked():
    with pytest.raises(ValueError, match="snapshot_catchup_fraction"):
        Config(snapshot_catchup_fraction=0)


def test_a_leader_repeats_its_latest_heartbeat_to_a_peer_that_connects():
    net = Net(3)
    leader = net.elect()
    leader.propose(b"x")
    net.step()
    peer = leader.peers[0]
    leader.peer_connected(peer)
    leader.peer_connected(99)                               # not a member: nothing
    out = leader.ready().messages
    assert [(to, type(m)) for to, m in out] == [(peer, M.Heartbeat)]
    beat = out[0][1]
    assert beat.commit == leader.commit_index and beat.seq == leader._hb_seq
    follower = net.reps[peer]
    follower.peer_connected(leader.node_id)
    assert not follower.ready().messages


def test_leadership_transfer_hands_over_to_the_target():
    net = Net(3)
    leader = net.elect()
    leader.propose(b"x")
    net.step()
    target = leader.peers[1]
    leader.transfer_leadership(target)
    with pytest.raises(NotLeader) as e:
        leader.propose(b"y")
    assert e.value.leader_hint == target
    net.run_until(lambda: net.reps[target].is_leader, limit=1.0)
    assert not leader.is_leader
    net.reps[target].propose(b"y")
    net.run_until(lambda: net.commands(leader.node_id) == [b"x", b"y"])
    with pytest.raises(ValueError):
        net.reps[target].transfer_leadership(99)


def test_a_transfer_to_a_target_that_never_answers_leaves_the_leader_leading():
    net = Net(3)
    leader = net.elect()
    ballot = leader.ballot
    target, other = leader.peers
    net.cut.add(target)                     # went down a moment ago: still heard lately
    leader.transfer_leadership(target)
    with pytest.raises(CannotTransfer, match=f"already handing leadership to node {target}"):
        leader.transfer_leadership(other)   # one at a time
    end = net.now + 3 * CFG.election_timeout
    while net.now < end:                    # past the transfer's deadline: no leaderless gap
        net.step()
        assert leader.is_leader and leader.ballot == ballot
        assert not net.reps[other].is_leader
    leader.propose(b"after")
    net.run_until(lambda: net.commands(other) == [b"after"])
    # The lease is back once heartbeats are acked again: a lease read answers at once.
    leader.read("r", lease=True, now=net.now)
    assert [r.read_id for r in leader.ready().reads] == ["r"]


def test_no_transfer_to_a_target_not_heard_for_an_election_timeout():
    net = Net(3)
    leader = net.elect()
    target = leader.peers[0]
    net.cut.add(target)
    cut_at = net.now
    net.run_until(lambda: net.now - cut_at > 2 * CFG.election_timeout)
    assert leader.is_leader
    with pytest.raises(CannotTransfer, match=f"node {target} has not answered node "
                                             f"{leader.node_id} for over an election timeout"):
        leader.transfer_leadership(target)
    leader.propose(b"x")                    # still leading, and taking proposals
    net.run_until(lambda: net.commands(leader.node_id) == [b"x"])


def test_leader_changes_are_reported():
    net = Net(3)
    leader = net.elect()
    # Each node saw the change once, naming the leader and its ballot.
    seen = []
    r = Replica(1, [1], config=CFG)
    r.tick(1.0)
    rd = r.ready()
    r.persisted(rd.token)
    rd = r.ready()
    seen.append(rd.leader)
    assert seen[0].leader == 1 and seen[0].ballot == r.promised
    assert not r.ready()
    assert leader.leader_id == leader.node_id


def test_receive_rejects_non_messages_and_ignores_strangers():
    r = Replica(1, [1, 2, 3], config=CFG)
    with pytest.raises(TypeError):
        r.receive(object())
    r.receive(M.Heartbeat(9, M.Ballot(5, 9), 3, 1))     # not a member
    assert r.leader_id is None
    with pytest.raises(ValueError):
        Replica(4, [1, 2, 3])


def test_big_batches_are_split_into_bounded_accept_messages(monkeypatch):
    from paxchat.paxos import core
    monkeypatch.setattr(core, "ACCEPT_MESSAGE_BYTES", 1000)
    cfg = Config(heartbeat_interval=0.05, election_timeout=0.3, max_batch_commands=1)
    net = Net(3, cfg)
    leader = net.elect()
    net.sent.clear()
    for k in range(10):
        leader.propose(bytes([k]) * 400)
    net.pump()
    accepts = [m for s, to, m in net.sent if isinstance(m, M.Accept) and to == leader.peers[0]]
    assert [len(m.values) for m in accepts] == [2, 2, 2, 2, 2]
    assert [m.first_slot for m in accepts] == [1, 3, 5, 7, 9]
    net.run_until(lambda: len(net.commands(leader.peers[0])) == 10, limit=0.2)


def test_config_and_command_size_are_checked():
    with pytest.raises(ValueError):
        Config(heartbeat_interval=1.0, election_timeout=0.5)
    with pytest.raises(ValueError):
        Config(window=1000, max_batch_bytes=1 << 20)
    with pytest.raises(ValueError):
        Config(max_clock_drift=0.6)
    net = Net(1)
    leader = net.elect()
    with pytest.raises(ValueError):
        leader.propose(b"x" * (M.MAX_COMMAND_BYTES + 1))


def test_prevote_is_refused_while_the_leader_is_heard_or_by_a_node_that_knows_more():
    r = Replica(2, [1, 2, 3], config=CFG, now=0.0)
    r.receive(M.Heartbeat(1, M.Ballot(1, 1), 0, 1), 1.0)
    r.ready()
    r.receive(M.PreVote(3, M.Ballot(2, 3), 0), 1.1)
    (to, reply), = r.ready().messages
    assert to == 3 and not reply.granted
    assert r.promised == M.ZERO_BALLOT             # a pre-vote changes nothing
    r.tick(1.0 + CFG.election_timeout)
    r.ready()
    r.receive(M.Learn(1, 1, ((b"x",),)), 1.0 + CFG.election_timeout)
    r.receive(M.PreVote(3, M.Ballot(2, 3), 0), 1.0 + CFG.election_timeout)
    (_, reply), = [m for m in r.ready().messages if isinstance(m[1], M.PreVoteReply)]
    assert not reply.granted                        # the candidate is behind us
    r.receive(M.PreVote(3, M.Ballot(2, 3), 1), 1.0 + CFG.election_timeout)
    (_, reply), = [m for m in r.ready().messages if isinstance(m[1], M.PreVoteReply)]
    assert reply.granted


def test_a_restarted_acceptor_promises_nobody_for_an_election_timeout():
    durable = DurableState(M.Ballot(3, 1), {}, 0)
    r = Replica(2, [1, 2, 3], config=CFG, durable=durable, now=10.0)
    r.receive(M.Prepare(3, M.Ballot(4, 3), 1, M.ZERO_BALLOT), 10.1)
    assert r.promised == M.Ballot(3, 1) and not r.ready()
    r.receive(M.Prepare(3, M.Ballot(2, 3), 1, M.ZERO_BALLOT), 10.1)
    (_, reject), = r.ready().messages                # below the promise: refused outright
    assert reject == M.Reject(2, M.Ballot(2, 3), M.Ballot(3, 1))
    r.receive(M.Prepare(3, M.Ballot(4, 3), 1, M.ZERO_BALLOT), 10.0 + CFG.election_timeout)
    rd = r.ready()
    assert rd.records == (M.PromiseRecord(M.Ballot(4, 3)),) and rd.messages == ()
    r.persisted(rd.token)
    (_, promise), = r.ready().messages               # released once durable
    assert isinstance(promise, M.Promise) and promise.ballot == M.Ballot(4, 3)


def test_election_timeouts_are_drawn_from_the_configured_range():
    for top, want in ((None, (0.3, 0.6)), (0.45, (0.3, 0.45))):
        config = Config(heartbeat_interval=0.05, election_timeout=0.3, election_timeout_max=top)
        seen = [Replica(1, [1, 2, 3], config=config, jitter=lambda j=j: j)._timeout()
                for j in (0.0, 0.5, 1.0)]
        assert seen[0] == pytest.approx(want[0]) and seen[-1] == pytest.approx(want[1])
        assert want[0] < seen[1] < want[1]
    with pytest.raises(ValueError):
        Config(heartbeat_interval=0.05, election_timeout=0.3, election_timeout_max=0.2)


# ---- rebuilding a node whose disk was lost ----------------------------------

def _lose_disk(net, i):
    """Node i comes back on an empty disk, as a rebuilding replica."""
    net.reps[i] = Replica(i, net.ids, config=net.config, seed=5, now=net.now, rebuilding=True)
    net.disk[i] = []
    net.decided[i] = []


def test_a_node_on_a_new_disk_asks_every_peer_catches_up_then_votes_again():
    net = Net(3)
    leader = net.elect()
    for k in range(5):
        leader.propose(b"c%d" % k)
        net.step()
    lost = leader.peers[0]
    _lose_disk(net, lost)
    r = net.reps[lost]
    assert r.rebuilding
    net.run_until(lambda: not r.rebuilding)
    assert net.rebuilt[lost] == 1 and net.commands(lost) == [b"c%d" % k for k in range(5)]
    # Its promise is the highest any peer had, and what it learnt is on its
    # disk as accepted there: the votes its lost disk may have cast.
    top = max(net.reps[p].promised for p in r.peers)
    durable = DurableState.from_records(net.disk[lost])
    assert durable.promised == top
    assert {s: e[1] for s, e in durable.accepted.items()} == dict(net.decided[leader.node_id])
    assert {e[0] for e in durable.accepted.values()} == {top}
    # It votes again: with the leader gone, it and the other peer carry on.
    net.cut.add(leader.node_id)
    new = net.elect()
    new.propose(b"after")
    net.run_until(lambda: net.commands(lost)[-1:] == [b"after"])
    assert net.rebuilt[lost] == 1


def test_in_a_cluster_of_two_the_other_node_alone_answers_and_both_vote_again():
    net = Net(2)
    leader = net.elect()
    leader.propose(b"x")
    net.step()
    lost = leader.peers[0]
    _lose_disk(net, lost)
    net.run_until(lambda: not net.reps[lost].rebuilding)
    leader = net.elect()
    leader.propose(b"y")            # two nodes: chosen only with the rebuilt node's vote
    net.run_until(lambda: net.commands(lost) == [b"x", b"y"])


def test_a_rebuilding_node_votes_for_nothing_and_waits_for_every_peer():
    net = Net(3)
    leader = net.elect()
    leader.propose(b"x")
    net.step()
    lost, other = leader.peers
    _lose_disk(net, lost)
    before = len(net.sent)
    net.cut.add(other)
    r = net.reps[lost]
    for _ in range(100):            # 1 s: three election timeouts
        net.step()
    assert r.rebuilding and r.rebuild_waits_for() == ((other,), None)
    # Its vote would make a quorum with the leader's: nothing is chosen.
    leader.propose(b"y")
    for _ in range(20):
        net.step()
    assert net.commands(leader.node_id) == [b"x"]
    sent = {type(m) for i, _, m in net.sent[before:] if i == lost}
    assert sent <= {M.RebuildQuery, M.HeartbeatAck, M.CatchupRequest, M.PreVoteReply}
    net.cut.clear()
    net.run_until(lambda: net.commands(lost) == [b"x", b"y"] and not r.rebuilding)


def _report(sender, ballot, upto, entries=(), rebuilding=False):
    return M.RebuildReport(sender, ballot, upto,
                           tuple(M.AcceptedEntry(s, b, v) for s, b, v in entries), rebuilding)


def test_the_fence_takes_the_highest_promise_and_the_highest_accepted_value_of_each_slot():
    r = Replica(1, [1, 2, 3, 4, 5], config=CFG, now=0.0, rebuilding=True)
    r.tick(0.01)
    asked = {to for to, m in r.ready().messages if type(m) is M.RebuildQuery}
    assert asked == {2, 3, 4, 5}
    b = M.Ballot
    r.receive(_report(2, b(4, 2), 3, [(4, b(3, 2), (b"a",)), (5, b(3, 2), (b"x",))]), 0.02)
    r.receive(_report(3, b(7, 3), 2, [(3, b(2, 3), (b"old",)), (4, b(2, 3), (b"b",))]), 0.02)
    r.receive(_report(4, b(9, 9), 9, rebuilding=True), 0.02)    # vouches for nothing
    r.receive(_report(5, b(5, 5), 3, [(5, b(6, 5), (b"y",))]), 0.02)
    assert r.rebuilding and r.rebuild_waits_for() == ((4,), None)
    assert not r.ready().records
    r.receive(_report(4, b(6, 4), 1), 0.03)
    rd = r.ready()
    durable = DurableState.from_records(rd.records)
    assert durable.promised == b(7, 3)
    # Slot 3 is within a chosen prefix reported (3): learnt, not adopted.
    assert durable.accepted == {4: (b(3, 2), (b"a",)), 5: (b(6, 5), (b"y",))}
    assert r.rebuild_waits_for() == ((), 3) and r.rebuilding


def test_a_rebuilding_node_answers_no_prepare_accept_prevote_or_transfer():
    r = Replica(2, [1, 2, 3], config=CFG, now=0.0, rebuilding=True)
    r.ready()
    b = M.Ballot(3, 1)
    r.receive(M.Prepare(1, b, 1, M.ZERO_BALLOT), 5.0)
    r.receive(M.Accept(1, b, 1, ((b"x",),), 0), 5.0)
    r.receive(M.PreVote(3, M.Ballot(4, 3), 10), 5.0)
    r.receive(M.TimeoutNow(1, b), 5.0)
    rd = r.ready()
    kinds = [type(m) for _, m in rd.messages]
    assert M.Promise not in kinds and M.Accepted not in kinds and not rd.records
    assert [m.granted for _, m in rd.messages if type(m) is M.PreVoteReply] == [False]
    r.tick(10.0)
    assert r.role == "follower" and r.leader_id == 1


def test_a_peer_answers_a_rebuild_query_with_its_promise_and_accepted_values():
    net = Net(3)
    leader = net.elect()
    leader.propose(b"x")
    net.step()
    peer = net.reps[leader.peers[0]]
    peer.receive(M.RebuildQuery(leader.peers[1]), net.now)
    (to, rep), = [(to, m) for to, m in peer.ready().messages if type(m) is M.RebuildReport]
    assert to == leader.peers[1]
    assert rep == M.RebuildReport(peer.node_id, peer.promised, peer.commit_index, (), False)
