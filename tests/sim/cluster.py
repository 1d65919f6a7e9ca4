"""A deterministic simulation of a paxchat Paxos cluster in one process.

``run_seed(seed)`` builds 3 or 5 replicas (``paxchat.paxos.core.Replica``, or
a subclass with a planted bug), a network, disks, clocks and clients, all
driven by one ``random.Random(seed)`` and one event queue, so a seed always
replays the same run. Each seed draws its own knobs: drop, duplicate and
long-delay (reorder) rates, partitions, crash and restart rates, fsync
latency, clock drift, pipeline window, batch size, compaction period,
snapshot chunk size, how often a crashed node comes back on an empty
disk and rebuilds (core.py, "Rebuilding a node"; one node at a time, as an
operator would: two rebuilding at once wait for each other), and whether a
snapshot received from a peer is durable in the application at once or
only at its next sync (a crash in between leaves the state below the log's
compaction point: the node rebuilds, as the node glue does).

A run has two phases. During the *fault* phase clients write and read while
the network misbehaves and nodes crash (losing whatever their disk had not
fsynced) and restart from their durable records, or from nothing as a
rebuilding node. A node that lost its disk is a new life of it: messages
addressed to the old life are lost with its links, and once a peer hears
from the new life it hears nothing more from the old (the transport cuts
the old links at the new one's hello). Then faults stop: the
network heals and every node but a random minority restarts; every
outstanding client operation must complete within ``LIVENESS_BOUND`` (plus
the time the drawn world needs for snapshot transfers, see
``Simulation.transfer_allowance``) and all live nodes must converge.

Checked during and after the run (``SimFailure`` says which and when):
- no slot is decided two ways, on any node, ever (across restarts);
- each node decides slots contiguously, and its state digest at each
  applied index equals every other node's at that index (so every
  decided sequence is a prefix of the longest);
- nothing decided was never proposed;
- an acceptor's promise never drops below any ballot it revealed in a
  Promise or Accepted reply, across restarts too;
- every acknowledged write is applied exactly once (the application dedups
  retries by command id) and is in every converged node's state;
- the client history (appends and read-index / lease reads over a few
  append-only lists) is linearizable;
- liveness after faults stop.
"""

import dataclasses
import heapq
import json
import random
import zlib

from paxchat.paxos import messages as M
from paxchat.paxos.core import CannotTransfer, Config, DurableState, NotLeader, Replica

__all__ = ["SimFailure", "Simulation", "run_seed"]

FAULT_TIME = 6.0            # seconds of simulated time with faults
LIVENESS_BOUND = 8.0        # after faults stop, everything pending completes within this
# ... plus this many full snapshot transfers at the world's slowest chunk round
# trip: the leader may finish a transfer pinned during the faults, then fetch
# the chosen prefix, and only then can a laggard fetch the final state.
TRANSFERS_ALLOWED = 3
# In one world of three, the share of the windows (a received snapshot's
# CompactRecord durable, its state not yet) in which the nemesis crashes
# the node, and the peer that sent it the snapshot, within 5 ms, before its
# state may store the snapshot: left to the random crashes, a forgotten
# vote that a chosen quorum needed, then a quorum without its other
# holders, is rare.
WINDOW_CRASH = 1.0
KEYS = ("a", "b", "c")


class SimFailure(AssertionError):
    def __init__(self, seed, time, what):
        super().__init__(f"seed {seed} at t={time:.4f}: {what}")
        self.seed = seed
        self.time = time
        self.what = what


class App:
    """The replicated state machine: a few append-only lists, dedup by command id."""

    __slots__ = ("applied", "lists", "seen", "digest")

    def __init__(self):
        self.applied = 0
        self.lists = {k: [] for k in KEYS}
        self.seen = set()
        self.digest = 0

    def apply(self, cmd):
        """Apply one command; returns its id. A repeated id changes nothing."""
        cid, key, _ = cmd.split(b"|", 2)
        if cid in self.seen:
            return cid
        self.seen.add(cid)
        self.lists[key.decode()].append(cid.decode())
        self.digest = zlib.crc32(cmd, self.digest)
        return cid

    def snapshot(self):
        return json.dumps({"applied": self.applied, "lists": self.lists, "digest": self.digest,
                           "seen": sorted(s.decode() for s in self.seen)}).encode()

    @classmethod
    def restore(cls, data):
        d = json.loads(data)
        app = cls()
        app.applied = d["applied"]
        app.lists = {k: list(v) for k, v in d["lists"].items()}
        app.digest = d["digest"]
        app.seen = {s.encode() for s in d["seen"]}
        return app


class Node:
    __slots__ = ("id", "replica", "disk", "unsynced", "syncing", "app", "app_snapshot",
                 "incoming", "rate", "offset", "flush_at", "incarnation", "waiting", "reads", "offering",
                 "revealed", "revealed_acc", "paused_until", "resume_order", "storing_until",
                 "life", "heard_life", "rebuilding", "lose_disk", "log_snapshot", "snapshot_from")

    def __init__(self, nid, rate, offset):
        self.id = nid
        self.replica = None
        self.disk = []              # durable records (encoded)
        self.unsynced = []          # (token, [encoded records], CompactRecord index) written, not fsynced
        self.syncing = None         # (token, count of unsynced entries covered) of the fsync in flight
        self.app = App()
        self.app_snapshot = None    # (index, data): the application's own durable snapshot
        self.incoming = None        # [index, bytearray]: a snapshot being received, stored
        self.rate = rate
        self.offset = offset
        self.flush_at = None
        self.incarnation = 0
        self.waiting = {}           # command id -> client waiting for it here
        self.reads = {}             # read id -> client
        self.offering = False       # making a snapshot the replica asked for
        self.revealed = M.ZERO_BALLOT   # highest ballot sent in a Promise or Accepted
        self.revealed_acc = {}          # slot -> highest ballot this node said it accepted
        self.paused_until = 0.0         # a stalled process (GC pause, VM freeze) until then
        self.resume_order = {}          # input channel -> its place in the backlog after a stall
        self.storing_until = 0.0        # received snapshot parts are stored, in order, until then
        self.life = 0                   # how many times its disk was lost
        self.heard_life = {}            # peer -> the latest life of it heard from
        self.rebuilding = False         # on disk: it rebuilds at every start until told it is done
        self.lose_disk = False          # it comes back from this crash on an empty disk
        self.log_snapshot = 0           # the highest CompactRecord index on disk (fsynced)
        self.snapshot_from = None       # the peer that sent it the last snapshot chunk it received


class Client:
    __slots__ = ("id", "op", "target", "attempt", "seq", "deadline", "history_index", "done",
                 "sticky")

    def __init__(self, cid, target, sticky=False):
        self.id = cid
        self.sticky = sticky        # a reader that stays with the leader it knows
        self.op = None              # current op: dict
        self.target = target
        self.attempt = 0
        self.seq = 0
        self.deadline = None
        self.history_index = None
        self.done = False


class Simulation:
    def __init__(self, seed, replica_cls=Replica, trace=None, fault_time=FAULT_TIME, disk_loss=None):
        self.seed = seed
        self.rng = rng = random.Random(seed)
        self.replica_cls = replica_cls
        self.trace = trace
        self.n = rng.choice((3, 5))
        self.members = tuple(range(1, self.n + 1))
        # knobs
        self.p_drop = rng.choice((0.0, 0.02, 0.1, 0.25))
        self.p_dup = rng.choice((0.0, 0.02, 0.1))
        self.p_long = rng.choice((0.0, 0.02, 0.1))
        self.delay = (0.0005, rng.choice((0.002, 0.01, 0.03)))
        self.fsync = (0.0005, rng.choice((0.002, 0.01, 0.04)))
        self.crash_rate = rng.choice((0.0, 0.5, 1.5, 3.0))        # crashes per second (cluster)
        self.partition_rate = rng.choice((0.0, 0.5, 1.5))
        self.transfer_rate = rng.choice((0.0, 0.3))
        self.pause_rate = rng.choice((0.0, 0.5, 1.0))
        self.pause_leader = rng.random() < 0.5
        self.tick_every = rng.choice((0.01, 0.02))
        self.flush_delay = rng.choice((0.0, 0.001, 0.003))
        self.compact_every = rng.choice((4, 16, 64, 10 ** 9))
        self.lease_reads = rng.choice((0.3, 0.7, 1.0))
        self.read_ratio = rng.choice((0.2, 0.5))
        self.keys = KEYS[:rng.choice((1, 3))]
        self.wander = rng.choice((0.0, 0.3))
        self.client_patience = rng.choice((0.3, 1.0, 3.0))  # before a write is retried
        self.read_patience = rng.choice((0.2, 0.5, 1.0))    # before a read is given up
        self.config = Config(
            heartbeat_interval=0.05,
            election_timeout=rng.choice((0.2, 0.3, 0.5)),
            max_clock_drift=0.05,
            window=rng.choice((1, 4, 32)),
            max_batch_commands=rng.choice((1, 3, 64)),
            max_batch_bytes=rng.choice((64, 1 << 16)),
            catchup_slots=rng.choice((2, 16, 256)),
            snapshot_chunk_bytes=rng.choice((50, 400, 1 << 16)),
        )
        # Drawn from its own generator so that a seed's other knobs stay as they were.
        self.config = dataclasses.replace(
            self.config,
            snapshot_catchup_fraction=random.Random(seed ^ 0x5EED).choice((None, 0.05, 0.25)))
        # How long storing one received snapshot part takes: at once, a disk
        # like the network, or one much slower (the receiver must not ask
        # faster than it stores). Its own generator too.
        self.store_rng = random.Random(seed ^ 0x570E)
        self.part_store = self.store_rng.choice(((0.0, 0.0), (0.0005, 0.005), (0.02, 0.1)))
        # The share of crashes after which the node's disk is gone. Its own generator too.
        self.loss_rng = random.Random(seed ^ 0xD15C)
        self.disk_loss = self.loss_rng.choice((0.0, 0.3, 0.6))
        if disk_loss is not None:
            self.disk_loss = disk_loss      # a test pinning a world from before disks were lost
        # Whether a snapshot received from a peer is durable in the application
        # as soon as it is restored, or only at the application's next sync,
        # here its next compaction (paxchat's state commits the restore without
        # an fsync). The log's CompactRecord for it is fsynced at once, so a
        # crash in between leaves a log that forgot its votes up to an index
        # its state is below: the node glue then rebuilds (see ``recover``).
        # In one world of three it is at once; in one, at the next sync; in
        # one, at the next sync, and the nemesis aims a crash at that window.
        # Its own generator too.
        self.install_rng = random.Random(seed ^ 0x1A57)
        self.install_saved_at_once, self.window_crash = self.install_rng.choice(
            ((True, 0.0), (False, 0.0), (False, WINDOW_CRASH)))
        self.fault_time = fault_time
        self.end_time = fault_time + LIVENESS_BOUND
        self.now = 0.0
        self.events = []
        self.seq = 0
        self.nodes = {}
        for nid in self.members:
            drift = self.config.max_clock_drift * 0.9
            self.nodes[nid] = Node(nid, 1 + rng.uniform(-drift, drift), rng.uniform(0, 100))
        self.cut = set()            # (a, b) pairs that cannot talk
        self.faults = True
        self.decided = {}           # slot -> value, decided anywhere
        self.digest_at = {}         # applied index -> app digest
        self.proposed = set()
        self.acked = {}             # command id -> first ack time
        self.history = []           # [call, ret, (key, input), output]
        self.clients = [Client(i, rng.choice(self.members)) for i in range(rng.choice((2, 3, 5)))]
        for i in range(rng.choice((1, 2))):
            self.clients.append(Client(len(self.clients), rng.choice(self.members), sticky=True))
        self.read_seq = 0
        self.stats = {"msgs": 0, "crashes": 0, "elections": 0, "decided": 0, "snapshots": 0,
                      "offers": 0, "disks_lost": 0, "rebuilt": 0, "behind_log": 0}

    # ---- event queue -------------------------------------------------------
    def at(self, t, fn, *args):
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, fn, args))

    def log(self, *parts):
        if self.trace:
            self.trace(f"{self.now:9.4f} " + " ".join(str(p) for p in parts))

    def fail(self, what):
        raise SimFailure(self.seed, self.now, what)

    def local(self, node):
        return node.offset + self.now * node.rate

    # ---- running -------------------------------------------------------------
    def run(self):
        rng = self.rng
        for node in self.nodes.values():
            self.start(node)
        for c in self.clients:
            self.at(rng.uniform(0, 0.3), self.client_next, c)
        self.schedule_faults()
        self.at(self.fault_time, self.stop_faults)
        events = self.events
        extended = False
        while events:
            if events[0][0] > self.end_time:
                if extended:
                    break
                extended = True
                self.end_time += self.transfer_allowance()
                continue
            t, _, fn, args = heapq.heappop(events)
            self.now = t
            fn(*args)
            if self.done_after_faults():
                break
        self.final_checks()
        return self

    def schedule_faults(self):
        rng = self.rng
        t = 0.0
        if self.crash_rate:
            while True:
                t += rng.expovariate(self.crash_rate)
                if t >= self.fault_time:
                    break
                self.at(t, self.crash, rng.choice(self.members), rng.uniform(0.01, 1.0))
        t = 0.0
        if self.partition_rate:
            while True:
                t += rng.expovariate(self.partition_rate)
                if t >= self.fault_time:
                    break
                self.at(t, self.partition, rng.uniform(0.05, 1.5))
        t = 0.0
        if self.pause_rate:
            while True:
                t += rng.expovariate(self.pause_rate)
                if t >= self.fault_time:
                    break
                longest = 3.0 if self.pause_leader else 1.0
                self.at(t, self.pause, rng.choice(self.members),
                        min(rng.uniform(0.05, longest), self.fault_time - t))
        t = 0.0
        if self.transfer_rate:
            while True:
                t += rng.expovariate(self.transfer_rate)
                if t >= self.fault_time:
                    break
                self.at(t, self.transfer)

    def pause(self, nid, duration):
        if self.pause_leader:
            # The nemesis stalls whoever leads now (where stale leaders hurt).
            leaders = [n.id for n in self.nodes.values() if n.replica and n.replica.is_leader]
            if leaders:
                nid = leaders[0]
        node = self.nodes[nid]
        self.log("PAUSE", nid, "for", round(duration, 3))
        if node.paused_until <= self.now:
            node.resume_order = {}
        node.paused_until = max(node.paused_until, self.now + duration)

    def deferred(self, node, channel, fn, *args):
        """True if ``node`` is stalled: the event waits until it resumes.

        Like sockets and timers, each input channel (the clock, each peer,
        the clients, the disk) keeps its own order, and after the stall the
        channels' backlogs are handled in a random order.
        """
        if node.paused_until > self.now:
            off = node.resume_order.get(channel)
            if off is None:
                off = node.resume_order[channel] = self.rng.uniform(0, 0.002)
            self.at(node.paused_until + off, fn, *args)
            return True
        return False

    def stop_faults(self):
        self.log("FAULTS STOP")
        self.faults = False
        self.cut.clear()
        down = self.rng.randrange(0, (self.n - 1) // 2 + 1)
        keep_down = set(self.rng.sample(self.members, down))
        if any(self.rebuild_pending(n) for n in self.nodes.values()):
            keep_down = set()   # a rebuild needs every other node: an operator brings them back
        for nid, node in self.nodes.items():
            if node.replica is None and nid not in keep_down:
                self.restart(node)
            elif node.replica is not None and nid in keep_down:
                self.crash(nid, None)
        self.stop_time = self.now

    def transfer_allowance(self):
        """Extra time after ``LIVENESS_BOUND`` for snapshot transfers still under way.

        A transfer is stop-and-wait, one chunk per round trip, so with 50-byte
        chunks a few-KiB state takes ~75 round trips (~3 s here), and a
        recovery may need several in a row (``TRANSFERS_ALLOWED``). Sized from
        the largest state now held, at the slowest round trip after the
        faults, storing each part at the slowest the world's disk does; a
        node that is stuck or restarts its transfer forever still fails, it
        only gets longer to show it. A world that never compacts still sends
        snapshots to peers missing enough of the log, unless that is off.
        """
        if self.compact_every >= 10 ** 9 and self.config.snapshot_catchup_fraction is None:
            return 0.0
        size = max((len(n.app.snapshot()) for n in self.nodes.values() if n.replica), default=0)
        chunks = -(-size // self.config.snapshot_chunk_bytes)
        round_trip = 2 * (self.delay[1] + self.flush_delay) + self.part_store[1]
        return TRANSFERS_ALLOWED * chunks * round_trip

    def done_after_faults(self):
        if self.faults or not all(c.done for c in self.clients):
            return False
        # Every live node has caught up with the highest decided slot.
        top = max(self.decided, default=0)
        return all(n.replica is None or (n.app.applied >= top and not n.replica.rebuilding)
                   for n in self.nodes.values())

    # ---- nodes ---------------------------------------------------------------
    def start(self, node, durable=None, rebuilding=False):
        node.incarnation += 1
        node.replica = self.replica_cls(
            node.id, self.members, now=self.local(node), config=self.config,
            seed=self.seed * 7919 + node.incarnation, durable=durable, rebuilding=rebuilding)
        node.offering = False
        self.note_state_bytes(node)
        if node.revealed > node.replica.promised:
            self.fail(f"node {node.id} restarted with promise {node.replica.promised} "
                      f"below the {node.revealed} it revealed")
        self.at(self.now + self.rng.uniform(0, self.tick_every), self.tick, node, node.incarnation)

    def crash(self, nid, downtime):
        node = self.nodes[nid]
        if node.replica is None or (downtime is not None and not self.faults):
            return      # (a crash aimed during the faults that comes after they stop)
        others_rebuild = any(self.rebuild_pending(n) for n in self.nodes.values() if n is not node)
        if downtime is not None and others_rebuild and self.behind_log(node):
            # It would come back rebuilding while another node rebuilds: the
            # two would wait for each other until an operator restored the
            # cluster. The nemesis spares it, as it loses no second disk.
            self.log("SPARED", nid, "state", node.app_snapshot and node.app_snapshot[0],
                     "log", node.log_snapshot)
            return
        self.log("CRASH", nid)
        self.stats["crashes"] += 1
        node.replica = None
        node.unsynced = []
        node.syncing = None
        node.flush_at = None
        node.waiting.clear()
        node.reads.clear()
        node.incoming = None        # the node removes it when it starts again
        if (downtime is not None and self.disk_loss and not others_rebuild
                and self.loss_rng.random() < self.disk_loss):
            node.lose_disk = True
        if downtime is not None:
            self.at(self.now + downtime, self.restart, node)

    def restart(self, node):
        if node.replica is not None:
            return
        if node.lose_disk:
            # A new, empty disk: records, state, and what the checks knew it said.
            self.log("DISK LOST", node.id)
            self.stats["disks_lost"] += 1
            node.lose_disk = False
            node.rebuilding = True
            node.life += 1
            node.heard_life = {}
            node.disk = []
            node.app = App()
            node.app_snapshot = None
            node.revealed = M.ZERO_BALLOT
            node.revealed_acc = {}
            node.log_snapshot = 0
        records = [M.decode(r) for r in node.disk]
        durable = DurableState.from_records(records)
        node.disk = [M.encode(r) for r in durable.to_records()]
        node.app = App.restore(node.app_snapshot[1]) if node.app_snapshot else App()
        if durable.snapshot_index != node.log_snapshot:
            self.fail(f"node {node.id}'s log is compacted to {durable.snapshot_index}, "
                      f"not {node.log_snapshot}")
        for slot, b in node.revealed_acc.items():
            if slot > durable.snapshot_index:
                e = durable.accepted.get(slot)
                if e is None or e[0] < b:
                    self.fail(f"node {node.id} restarted without the acceptance of slot {slot} "
                              f"at {b} that it had acknowledged")
        self.log("RESTART", node.id, "promised", durable.promised, "snap", durable.snapshot_index,
                 "app", node.app.applied)
        durable, rebuilding = self.recover(node, durable)
        self.start(node, durable, rebuilding)
        self.links_up((p, node.id) for p in self.members if p != node.id)

    def recover(self, node, durable):
        """What the node glue starts the replica with, from its log and its state.

        A state below the log's snapshot index means a crash after the
        CompactRecord of a received snapshot was fsynced but before the state
        stored the snapshot: the log forgot the node's votes up to there.
        The node claims only what its state holds and rebuilds (votes for
        nothing until every peer has reported), as paxchat/replicatedlog.py
        does. It says nothing of it to its peers: its links and life stay.
        Returns ``(durable, rebuilding)``.
        """
        applied = node.app.applied
        if applied < durable.snapshot_index:
            self.log("BEHIND LOG", node.id, "state", applied, "log", durable.snapshot_index,
                     "rebuilds")
            self.stats["behind_log"] += 1
            return DurableState(durable.promised, durable.accepted, applied), True
        return durable, node.rebuilding

    def behind_log(self, node):
        """True if the node's durable state is below its durable log's snapshot index."""
        return node.log_snapshot > (node.app_snapshot[0] if node.app_snapshot else 0)

    def rebuild_pending(self, node):
        """True if the node rebuilds, or will when it starts again.

        Two nodes rebuilding at once wait for each other (core.py), so the
        nemesis loses no disk while another node rebuilds, and never crashes
        a node whose state is behind its log while another does (see ``crash``).
        """
        if node.rebuilding or node.lose_disk:
            return True
        if node.replica is not None:
            return node.replica.rebuilding
        return self.behind_log(node)

    def tick(self, node, inc):
        if node.replica is None or node.incarnation != inc:
            return
        if self.deferred(node, "tick", self.tick, node, inc):
            return
        node.replica.tick(self.local(node))
        self.flush(node)
        self.at(self.now + self.tick_every, self.tick, node, inc)

    def poke(self, node):
        """Process the replica's Ready soon (inputs at the same instant share one)."""
        if node.flush_at is None:
            node.flush_at = self.now + self.flush_delay
            self.at(node.flush_at, self.flush_event, node, node.incarnation)

    def flush_event(self, node, inc):
        if node.replica is None or node.incarnation != inc:
            return
        if self.deferred(node, "tick", self.flush_event, node, inc):
            return
        node.flush_at = None
        self.flush(node)

    def flush(self, node):
        r = node.replica
        rd = r.ready()
        if not rd:
            return
        if rd.records:
            compacted = max((x.index for x in rd.records if type(x) is M.CompactRecord), default=0)
            node.unsynced.append((rd.token, [M.encode(x) for x in rd.records], compacted))
            if node.syncing is None:
                self.begin_fsync(node)
        if rd.rebuilt:
            self.log("REBUILT", node.id)
            self.stats["rebuilt"] += 1
            node.rebuilding = False
        for to, msg in rd.messages:
            t = type(msg)
            if t is M.Promise or t is M.Accepted:
                if msg.ballot > node.revealed:
                    node.revealed = msg.ballot
                if t is M.Accepted:
                    # Slots above the commit index must have been stored
                    # durably (at or below it the acceptor may ack a value
                    # it already knows chosen without storing it again).
                    acc = node.revealed_acc
                    b = msg.ballot
                    for s in range(max(msg.first_slot, r.commit_index + 1), msg.first_slot + msg.count):
                        if acc.get(s, M.ZERO_BALLOT) < b:
                            acc[s] = b
            self.send(node.id, to, msg)
        if rd.leader is not None:
            self.log("LEADER", node.id, "sees", rd.leader)
            if rd.leader.leader == node.id:
                self.stats["elections"] += 1
        for index, offset, part in rd.snapshot_parts:
            if offset == 0:
                node.incoming = [index, bytearray()]
            if node.incoming is None or node.incoming[0] != index \
                    or len(node.incoming[1]) != offset:
                self.fail(f"node {node.id} got part {index}@{offset} of a snapshot out of order")
                return
            node.incoming[1] += part
            done = max(node.storing_until, self.now) + self.store_rng.uniform(*self.part_store)
            node.storing_until = done
            self.at(done, self.part_stored, node, node.incarnation)
        if rd.snapshot is not None:
            index = rd.snapshot
            if node.incoming is None or node.incoming[0] != index:
                self.fail(f"node {node.id} is to restore snapshot {index}, not the one it received")
                return
            data = bytes(node.incoming[1])
            node.incoming = None
            self.stats["snapshots"] += 1
            self.log("INSTALL", node.id, "snapshot", index, len(data), "bytes")
            app = App.restore(data)
            if app.applied != index:
                self.fail(f"node {node.id} got a snapshot for {index} holding {app.applied}")
            if index > node.app.applied:
                node.app = app
                if self.install_saved_at_once:
                    node.app_snapshot = (index, data)
                self.check_digest(node)
                self.note_state_bytes(node)
        for slot, value in rd.decided:
            self.decide(node, slot, value)
        if node.replica is None:
            return
        if rd.want_snapshot and not node.offering:
            # Serializing the state takes a while, during which the node goes on.
            node.offering = True
            self.at(self.now + self.rng.uniform(0, 0.1), self.offer_snapshot, node, node.incarnation)
        for rs in rd.reads:
            self.serve_read(node, rs)
        for rid in rd.failed_reads:
            c = node.reads.pop(rid, None)
            if c is not None:
                self.client_retry(c, "read failed")
        self.maybe_compact(node)
        if r.has_ready():
            self.poke(node)

    def part_stored(self, node, inc):
        if node.replica is None or node.incarnation != inc:
            return
        if self.deferred(node, "disk", self.part_stored, node, inc):
            return
        node.replica.snapshot_part_stored()
        self.poke(node)

    def begin_fsync(self, node):
        if not node.unsynced:
            return
        token = node.unsynced[-1][0]
        node.syncing = (token, len(node.unsynced))
        lo, hi = self.fsync
        self.at(self.now + self.rng.uniform(lo, hi), self.end_fsync, node, node.incarnation)

    def end_fsync(self, node, inc):
        if node.replica is None or node.incarnation != inc or node.syncing is None:
            return
        if self.deferred(node, "disk", self.end_fsync, node, inc):
            return
        token, count = node.syncing
        behind = self.behind_log(node)
        for _, recs, compacted in node.unsynced[:count]:
            node.disk.extend(recs)
            if compacted > node.log_snapshot:
                node.log_snapshot = compacted
        if (self.window_crash and self.faults and self.crash_rate and not behind
                and self.behind_log(node) and self.install_rng.random() < self.window_crash):
            # The nemesis aims a crash at the window before the state stores
            # it, and at the peer that sent the snapshot: a value chosen with
            # a vote this node forgot may be held by that peer alone.
            irng = self.install_rng
            self.at(self.now + irng.uniform(0, 0.005), self.crash, node.id, irng.uniform(0.01, 1.0))
            if node.snapshot_from is not None:
                self.at(self.now + irng.uniform(0, 0.005), self.crash, node.snapshot_from,
                        irng.uniform(0.01, 1.0))
        del node.unsynced[:count]
        node.syncing = None
        node.replica.persisted(token)
        self.begin_fsync(node)
        self.flush(node)

    def decide(self, node, slot, value):
        app = node.app
        prev = self.decided.get(slot)
        if prev is None:
            for cmd in value:
                if cmd not in self.proposed:
                    self.fail(f"node {node.id} decided slot {slot} = {cmd!r}, which nobody proposed")
            self.decided[slot] = value
            self.stats["decided"] += 1
        elif prev != value:
            self.fail(f"slot {slot} decided two ways: {prev!r} and {value!r} (node {node.id})")
        if slot <= app.applied:
            return
        if slot != app.applied + 1:
            self.fail(f"node {node.id} decided slot {slot} after {app.applied}: a gap")
        for cmd in value:
            cid = app.apply(cmd)
            c = node.waiting.pop(cid, None)
            if c is not None:
                self.client_write_done(c, cid)
        app.applied = slot
        self.check_digest(node)
        if slot % 8 == 0:
            self.note_state_bytes(node)

    def note_state_bytes(self, node):
        """Tell the replica what a snapshot of its state would weigh, as the node glue does."""
        node.replica.note_state_bytes(len(node.app.snapshot()))

    def check_digest(self, node):
        app = node.app
        d = self.digest_at.setdefault(app.applied, app.digest)
        if d != app.digest:
            self.fail(f"node {node.id} state at index {app.applied} differs from another node's")

    def maybe_compact(self, node):
        r = node.replica
        app = node.app
        if app.applied > r.commit_index or app.applied <= 0:
            return
        if app.applied >= r.snapshot_index + self.compact_every:
            # The state is made durable there; the log behind it goes. No
            # snapshot is handed over: the replica asks when a peer needs one.
            node.app_snapshot = (app.applied, app.snapshot())
            r.compact(app.applied)
            self.poke(node)

    def offer_snapshot(self, node, inc):
        if node.replica is None or node.incarnation != inc:
            return
        if self.deferred(node, "snapshot", self.offer_snapshot, node, inc):
            return
        node.offering = False
        app = node.app
        taken = node.replica.offer_snapshot(app.applied, app.snapshot())
        self.stats["offers"] += 1
        self.log("OFFER", node.id, "snapshot", app.applied, "taken" if taken else "stale")
        self.poke(node)

    # ---- network -------------------------------------------------------------
    def send(self, src, dst, msg):
        self.stats["msgs"] += 1
        if (src, dst) in self.cut:
            return
        rng = self.rng
        data = M.encode(msg)
        if self.faults and rng.random() < self.p_drop:
            return
        copies = 2 if self.faults and rng.random() < self.p_dup else 1
        for _ in range(copies):
            lo, hi = self.delay
            d = rng.uniform(lo, hi)
            if self.faults and rng.random() < self.p_long:
                d += rng.uniform(0.05, 0.5)
            self.at(self.now + d, self.deliver, src, dst, data,
                    self.nodes[src].life, self.nodes[dst].life)

    def deliver(self, src, dst, data, src_life, dst_life):
        if (src, dst) in self.cut:
            return
        node = self.nodes[dst]
        if node.replica is None:
            return
        if self.deferred(node, src, self.deliver, src, dst, data, src_life, dst_life):
            return
        if dst_life != node.life or src_life < node.heard_life.get(src, 0):
            return      # its link went with the disk: to the old life, or from it after the new one spoke
        node.heard_life[src] = src_life
        msg = M.decode(data)
        if type(msg) is M.SnapshotChunk:
            node.snapshot_from = src
        if self.trace:
            self.log(f"{src}->{dst}", _short(msg))
        node.replica.receive(msg, self.local(node))
        self.poke(node)

    def partition(self, duration):
        rng = self.rng
        members = list(self.members)
        rng.shuffle(members)
        k = rng.randrange(1, self.n)
        side = set(members[:k])
        one_way = rng.random() < 0.2
        cut = set()
        for a in self.members:
            for b in self.members:
                if (a in side) != (b in side) and (not one_way or a in side):
                    cut.add((a, b))
        self.log("PARTITION", sorted(side), "one-way" if one_way else "", "for", round(duration, 3))
        self.cut |= cut
        self.at(self.now + duration, self.heal, frozenset(cut))

    def heal(self, cut):
        if self.faults:
            self.cut -= cut
            self.links_up(cut)

    def links_up(self, pairs):
        """Links that reopened: the replica at ``a`` of each ``(a, b)`` hears of it,
        as the node glue tells it when its transport reports a link up."""
        for a, b in sorted(pairs):
            node = self.nodes[a]
            if node.replica is not None and (a, b) not in self.cut:
                quiet = not node.replica.has_ready()
                node.replica.peer_connected(b)
                if quiet and node.replica.has_ready():
                    self.poke(node)

    def transfer(self):
        for node in self.nodes.values():
            r = node.replica
            if r is not None and r.is_leader:
                target = self.rng.choice(r.peers)
                self.log("TRANSFER", node.id, "->", target)
                try:
                    r.transfer_leadership(target)
                except (NotLeader, CannotTransfer):
                    pass
                self.poke(node)
                return

    # ---- clients ---------------------------------------------------------------
    def client_next(self, c):
        if not self.faults:
            c.done = True
            return
        rng = self.rng
        key = rng.choice(self.keys)
        c.seq += 1
        if c.sticky or rng.random() < self.read_ratio:
            c.op = {"kind": "read", "key": key, "lease": rng.random() < self.lease_reads}
        else:
            cid = f"c{c.id}.{c.seq}"
            c.op = {"kind": "write", "key": key, "cid": cid.encode(),
                    "cmd": f"{cid}|{key}|v".encode()}
        c.history_index = len(self.history)
        self.history.append([self.now, None, (key, ("read",) if c.op["kind"] == "read"
                                              else ("append", cid)), None])
        c.attempt = 0
        if not c.sticky and rng.random() < self.wander:
            c.target = rng.choice(self.members)   # clients may talk to any node
        self.client_send(c)

    def client_send(self, c):
        op = c.op
        if op is None:
            return
        c.attempt += 1
        attempt = c.attempt
        node = self.nodes[c.target]
        patience = self.read_patience if op["kind"] == "read" else self.client_patience
        self.at(self.now + patience, self.client_timeout, c, attempt)
        self.at(self.now + self.rng.uniform(0.0002, 0.002), self.client_arrive, c, attempt, node)

    def client_arrive(self, c, attempt, node):
        if c.attempt != attempt or c.op is None:
            return
        if node.replica is not None and self.deferred(node, "clients", self.client_arrive, c, attempt, node):
            return
        op = c.op
        r = node.replica
        if r is None:
            self.client_retry(c, "down")
            return
        try:
            if op["kind"] == "write":
                self.proposed.add(op["cmd"])
                r.propose(op["cmd"])
                node.waiting[op["cid"]] = c
                if op["cid"] in node.app.seen:
                    node.waiting.pop(op["cid"])
                    self.client_write_done(c, op["cid"])
                    return
            else:
                self.read_seq += 1
                rid = self.read_seq
                op["rid"] = rid
                node.reads[rid] = c
                r.read(rid, lease=op["lease"], now=self.local(node))
        except NotLeader as e:
            if op["kind"] == "read":
                node.reads.pop(op["rid"], None)
            hint = e.leader_hint
            c.target = hint if hint is not None and hint != c.target else self.rng.choice(self.members)
            self.at(self.now + self.rng.uniform(0.005, 0.05), self.client_send_attempt, c, attempt)
            return
        self.poke(node)

    def client_send_attempt(self, c, attempt):
        if c.attempt == attempt:
            self.client_send(c)

    def client_retry(self, c, why):
        attempt = c.attempt
        if not (c.sticky and why == "timeout"):
            c.target = self.rng.choice(self.members)
        self.at(self.now + self.rng.uniform(0.01, 0.1), self.client_send_attempt, c, attempt)

    def client_timeout(self, c, attempt):
        if c.op is not None and c.attempt == attempt:
            self.log("client", c.id, "timeout", c.op.get("cid") or "read")
            if c.op["kind"] == "read":
                # A read that got no answer had no effect: give it up (it
                # stays out of the history) and start afresh.
                for node in self.nodes.values():
                    node.reads.pop(c.op.get("rid"), None)
                self.client_finish(c)
                return
            self.client_retry(c, "timeout")

    def client_write_done(self, c, cid):
        op = c.op
        if op is None or op["kind"] != "write" or op["cid"] != cid:
            return
        self.acked.setdefault(cid, self.now)
        self.history[c.history_index][1] = self.now
        self.client_finish(c)

    def serve_read(self, node, rs):
        c = node.reads.pop(rs.read_id, None)
        if c is None or c.op is None or c.op.get("rid") != rs.read_id:
            return
        if node.app.applied < rs.index:
            self.fail(f"node {node.id} released read {rs.read_id} at {rs.index} "
                      f"before applying it ({node.app.applied})")
        value = tuple(node.app.lists[c.op["key"]])
        h = self.history[c.history_index]
        h[1] = self.now
        h[3] = value
        self.client_finish(c)

    def client_finish(self, c):
        c.op = None
        c.attempt += 1
        self.at(self.now + self.rng.uniform(0.0, 0.05), self.client_next, c)

    # ---- final checks ------------------------------------------------------------
    def final_checks(self):
        from .linearizability import OrderedAppendModel, Op, SearchTooLarge, check_by_key
        pending = [c.id for c in self.clients if not c.done]
        if pending:
            self.fail(f"clients {pending} still waiting {self.end_time - self.fault_time:.1f}s after faults stopped "
                      f"(leaders: {[n.id for n in self.nodes.values() if n.replica and n.replica.is_leader]})")
        top = max(self.decided, default=0)
        live = [n for n in self.nodes.values() if n.replica is not None]
        for n in live:
            if n.replica.rebuilding:
                self.fail(f"node {n.id} still rebuilding after faults stopped "
                          f"(waits for {n.replica.rebuild_waits_for()})")
            if n.app.applied < top:
                self.fail(f"node {n.id} applied only {n.app.applied} of {top} after faults stopped")
        for n in live:
            for key, values in n.app.lists.items():
                if len(values) != len(set(values)):
                    self.fail(f"node {n.id} applied a command twice in {key}")
            present = {v.encode() for vals in n.app.lists.values() for v in vals}
            for cid in self.acked:
                if cid not in present:
                    self.fail(f"acknowledged write {cid!r} missing on node {n.id}")
        # A final read of every list on a converged node ends the history; its
        # order is then the only possible order of the appends, which keeps
        # the search small. Appends that never returned and are absent from
        # it never took effect.
        final = live[0].app.lists if live else {}
        t = self.now
        applied = {v for vals in final.values() for v in vals}
        history = [Op(h[0], h[1], h[2], h[3]) for h in self.history
                   if h[1] is not None or (h[2][1][0] == "append" and h[2][1][1] in applied)]
        history += [Op(t + 1, t + 2, (k, ("read",)), tuple(v)) for k, v in final.items()]
        try:
            bad = check_by_key(history, lambda k: OrderedAppendModel(final.get(k, ())))
        except SearchTooLarge as e:
            self.fail(f"linearizability check gave up: {e}")
        if bad is not None:
            self.fail(f"client history on key {bad!r} is not linearizable")


def _short(msg):
    t = type(msg).__name__
    if isinstance(msg, (M.Accept, M.Learn)):
        return f"{t}(first={msg.first_slot}, n={len(msg.values)}, " + ", ".join(
            f"{k}={getattr(msg, k)}" for k in ("ballot", "commit") if hasattr(msg, k)) + ")"
    if isinstance(msg, M.Promise):
        return f"Promise({msg.ballot}, upto={msg.chosen_upto}, {len(msg.accepted)} accepted)"
    if isinstance(msg, M.SnapshotChunk):
        return f"SnapshotChunk(index={msg.index}, off={msg.offset}/{msg.total})"
    return repr(msg)


def run_seed(seed, replica_cls=Replica, trace=None, fault_time=FAULT_TIME, disk_loss=None):
    """Run one seed; raises SimFailure if any check fails, else returns the Simulation."""
    return Simulation(seed, replica_cls, trace, fault_time, disk_loss).run()
