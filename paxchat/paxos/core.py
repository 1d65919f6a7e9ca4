"""The Multi-Paxos replica as a pure state machine (no clock, no I/O).

One ``Replica`` per node plays proposer, acceptor and learner. The node glue
feeds it time (``tick``), peer messages (``receive``), client commands
(``propose``), read requests (``read``) and disk acknowledgements
(``persisted``); ``ready()`` hands back, etcd-raft style, what to persist,
what to send, what was decided, and which reads may be served. Because it
never reads a clock, a socket or a disk, a whole cluster runs
deterministically in one process (tests/sim/).

Protocol outline
- Ballots are ``(round, node)``. A node that has heard nothing from a leader
  for a randomized election timeout first runs a *pre-vote*: peers grant it
  only if they too have lost their leader for ``election_timeout`` and it
  is not behind them. Only with a quorum of grants does it raise its ballot,
  persist the promise to itself and send ``Prepare`` for every slot above
  its chosen prefix at once (phase 1 runs once per leadership, not per slot).
- With a quorum of promises it becomes the stable leader: slots that some
  promise reports accepted get the value of the highest ballot (or a no-op
  when none did), and new commands go to fresh slots. It keeps leading until
  an acceptor rejects it with a higher ballot, or it loses touch with a
  quorum for an election timeout (it then steps down on its own).
- Phase 2: commands queued by ``propose`` are batched into one slot per
  ``ready()`` (up to ``max_batch_commands`` / ``max_batch_bytes``), with up to
  ``window`` slots in flight above the chosen prefix. Acceptors persist before
  they answer; a slot is chosen when a quorum accepted it at the leader's
  ballot. The leader's chosen prefix (``commit``) rides on every Accept and
  Heartbeat; a follower marks slot ``s <= commit`` chosen when it accepted it at
  that very ballot, and otherwise pulls the chosen values (``CatchupRequest``
  -> ``Learn``), or the snapshot in ``snapshot_chunk_bytes`` chunks when the
  peer compacted past it.
- Snapshots are made on demand: ``compact(index)`` only drops the log (the
  application has made its state durable there). When a peer needs what the
  log no longer holds and no snapshot at or above the compaction point is at
  hand, ``ready()`` says ``want_snapshot`` and the glue answers with
  ``offer_snapshot(index, data)``; the peer, which asks again every two
  heartbeats, is then sent it. Serializing the whole state at every
  compaction would cost CPU and memory in proportion to the state, on every
  node, for a transfer that is rarely needed. The receiver keeps none of
  it: each chunk goes to its glue as it comes (``Ready.snapshot_parts``),
  and ``Ready.snapshot`` then names the one to restore. The glue says as
  it stores each (``snapshot_part_stored``); the receiver asks for the next
  chunk only while fewer than ``SNAPSHOT_UNSTORED_PARTS`` wait to be stored.
- Reads: ``read(id)`` takes the read index (the end of everything this
  leader recovered or chose) and confirms leadership with a heartbeat quorum
  sent after the request, then releases the read once the prefix reaches the
  index. ``read(id, lease=True)`` answers at once while the lease holds.

Lease (clock assumption)
  Clocks need not be synchronized, but every node's clock must advance at a
  rate within ``1 +- max_clock_drift`` of real time, and the glue must call
  ``tick`` at least every ``heartbeat_interval`` (or pass ``now`` to
  ``receive``). An acceptor that hears from its leader refuses ``Prepare`` of
  any other node for ``election_timeout`` after that (by its own clock; a
  restarted node refuses for ``election_timeout`` after it starts). The
  leader holds a lease until
  ``send_time + election_timeout*(1-d)/(1+d) - heartbeat_interval`` for the
  latest heartbeat acknowledged by a quorum, where ``send_time`` is its own
  clock when that heartbeat was sent. Every quorum of promises for a new
  leader therefore comes after the lease ended, so a lease read cannot miss
  a write. A leadership transfer drops the lease first; only the acceptors of
  the leader that asked for the transfer let the target's ``Prepare`` through.

Rebuilding a node whose disk was lost
  A node that lost its records may have promised ballots and accepted values
  that a quorum counted on; voting again as if it never had could let two
  values be chosen for one slot. So a replica made with ``rebuilding=True``
  (the glue knows: the operator said so) votes for nothing (no promise, no
  acceptance, no pre-vote grant, no election of its own) until it has
  fenced off its past:
  1. It asks *every* other member (``RebuildQuery``) for its promise, its
     chosen prefix and what it accepted above it, and waits until each has
     answered (a member that is itself rebuilding does not count). Every
     ballot the lost node ever promised was first promised by its
     proposer, and every value it accepted was proposed by a proposer that
     had promised that ballot (a proposer promises its own ballot, durably,
     before it sends a Prepare), so the highest promise among all the
     others is at least every promise the lost node made. The glue must
     already have cut every link of the node's previous life
     (paxos/transport.py: a rebuilding node's hello), so nothing that life
     sent can still arrive after the answer.
  2. It promises the highest ballot reported, and takes as accepted, for
     each slot above the highest chosen prefix reported, the entry of the
     highest ballot: a value some proposer really proposed at that ballot,
     so holding it is as if that Accept had reached this node. A value
     chosen with the lost node's vote is held by the other voters of its
     quorum, all of them asked, so the node now holds it (or the value of
     a higher ballot, the same one by Paxos' own invariant).
  3. Once those records are durable it learns every slot up to that
     highest chosen prefix (catch-up, as any follower). The lost node may
     have voted for those too, and a follower does not keep what it learns
     on disk (only the application's state does, at compaction), so it
     records each learnt value not yet compacted as accepted at its new
     promise: a value already chosen, which any ballot above the one that
     chose it proposes anyway. Once that is durable it votes again, and
     ``Ready.rebuilt`` tells the glue, which forgets that it was rebuilding.
     A node that crashes before that starts the rebuild over.
  Two members rebuilding at once wait for each other: bring them back by
  restoring the whole cluster (docs/operations.md).

Persisted state: ``PromiseRecord``, ``AcceptRecord``, ``CompactRecord``
(messages.py); ``DurableState.from_records`` folds them back for a restart.
"""

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from .messages import (
    MAX_BATCH_COMMANDS, MAX_COMMAND_BYTES, MAX_ENCODED_BYTES, MAX_SLOTS_PER_MESSAGE, ZERO_BALLOT, Accept, Accepted, AcceptedEntry, AcceptRecord, Ballot, CatchupRequest,
    CompactRecord, Heartbeat, HeartbeatAck, Learn, Prepare, PreVote, PreVoteReply, Promise,
    PromiseRecord, RebuildQuery, RebuildReport, Reject, SnapshotChunk, TimeoutNow,
)

__all__ = ["NotLeader", "CannotTransfer", "Config", "DurableState", "ReadState", "LeaderChange",
           "Ready", "Replica"]

FOLLOWER, PRECANDIDATE, CANDIDATE, LEADER = "follower", "precandidate", "candidate", "leader"

# A peer that the log could still serve waits at most this long (since its
# first ask) for a snapshot that would serve it better; then the log serves
# it meanwhile, so a node that cannot make a snapshot holds nobody back.
SNAPSHOT_WAIT_SECONDS = 5.0

# A snapshot at hand (made for a peer, or installed) weighs as much as the
# state. One no peer has been sent a chunk of for this long is let go; a
# peer that needs one later has it made anew.
SNAPSHOT_KEEP_SECONDS = 60.0

# A node receiving a snapshot asks for the next chunk only while fewer than
# this many of the parts it handed its glue (of any transfer) are not yet
# stored: with a disk slower than the network, chunks wait on the serving
# peer, not in memory.
SNAPSHOT_UNSTORED_PARTS = 2

# An Accept (and its AcceptRecord) carries at most this many value bytes,
# or one slot when a single slot is bigger.
ACCEPT_MESSAGE_BYTES = 4 << 20


class _Receiving:
    """A snapshot being received: how far it came, and whether its next ask waits for the disk."""
    __slots__ = ("index", "total", "received", "held")

    def __init__(self, index, total):
        self.index = index
        self.total = total
        self.received = 0          # bytes handed to the glue, in order
        self.held = False          # the next chunk is not asked for until a part is stored


class NotLeader(Exception):
    """propose()/read()/transfer_leadership() on a replica that does not lead.

    ``leader_hint`` is the node believed to lead (or None): forward there.
    """

    def __init__(self, leader_hint):
        super().__init__(f"not the leader (leader hint: {leader_hint})")
        self.leader_hint = leader_hint


class CannotTransfer(Exception):
    """transfer_leadership() to a peer that could not take over now; the leader carries on."""


@dataclass(frozen=True)
class Config:
    """Timing (seconds) and batching knobs; the same on every node."""
    heartbeat_interval: float = 0.05
    election_timeout: float = 0.5
    # Followers start an election after a random time in [election_timeout,
    # election_timeout_max]; None means 2 x election_timeout.
    election_timeout_max: float | None = None
    max_clock_drift: float = 0.05
    window: int = 64
    max_batch_commands: int = 4096
    max_batch_bytes: int = 256 << 10
    catchup_slots: int = 256
    snapshot_chunk_bytes: int = 1 << 20
    # A peer missing more than ``catchup_slots`` whose missing log is at
    # least this fraction of the state's size (``note_state_bytes``) is sent
    # a snapshot even though the log still holds what it misses: installing
    # an image costs far less per byte than applying commands. None: only
    # peers behind the compacted log get snapshots.
    snapshot_catchup_fraction: float | None = 0.125

    def __post_init__(self):
        if not 0 < self.heartbeat_interval < self.election_timeout:
            raise ValueError("need 0 < heartbeat_interval < election_timeout")
        if self.election_timeout_max is not None and not (
                self.election_timeout <= self.election_timeout_max < float("inf")):
            raise ValueError("need election_timeout <= election_timeout_max")
        if not 0 <= self.max_clock_drift < 0.5 or self.lease_duration <= 0:
            raise ValueError("max_clock_drift too large for this election_timeout: no lease left")
        if not 1 <= self.max_batch_commands <= MAX_BATCH_COMMANDS:
            raise ValueError(f"max_batch_commands must be in [1, {MAX_BATCH_COMMANDS}]")
        if not 1 <= self.window <= MAX_SLOTS_PER_MESSAGE // 2:
            raise ValueError("window out of range")
        # A promise reports up to a window of accepted slots in one message.
        slot_bytes = max(self.max_batch_bytes, MAX_COMMAND_BYTES) + 4 * self.max_batch_commands + 64
        if self.window * slot_bytes > MAX_ENCODED_BYTES // 2:
            raise ValueError("window * max_batch_bytes too large for one Promise message")
        if not 1 <= self.catchup_slots <= MAX_SLOTS_PER_MESSAGE or self.snapshot_chunk_bytes < 1:
            raise ValueError("catchup_slots / snapshot_chunk_bytes out of range")
        if self.snapshot_catchup_fraction is not None and not self.snapshot_catchup_fraction > 0:
            raise ValueError("snapshot_catchup_fraction must be positive, or None")

    @property
    def lease_duration(self):
        d = self.max_clock_drift
        return self.election_timeout * (1 - d) / (1 + d) - self.heartbeat_interval


@dataclass(frozen=True)
class DurableState:
    """What an acceptor recovers from its records after a restart."""
    promised: Ballot = ZERO_BALLOT
    accepted: Mapping = field(default_factory=dict)  # slot -> (Ballot, value)
    snapshot_index: int = 0

    @classmethod
    def from_records(cls, records, base=None):
        """Fold records, oldest first, onto ``base`` (or an empty state)."""
        base = base or cls()
        promised, snap = base.promised, base.snapshot_index
        accepted = dict(base.accepted)
        for rec in records:
            t = type(rec)
            if t is AcceptRecord:
                if rec.ballot > promised:
                    promised = rec.ballot
                for i, v in enumerate(rec.values):
                    s = rec.first_slot + i
                    if s > snap:
                        accepted[s] = (rec.ballot, v)
            elif t is PromiseRecord:
                if rec.ballot > promised:
                    promised = rec.ballot
            elif t is CompactRecord:
                if rec.index > snap:
                    snap = rec.index
                    accepted = {s: e for s, e in accepted.items() if s > snap}
            else:
                raise TypeError(f"not a paxos record: {rec!r}")
        return cls(promised, accepted, snap)

    def to_records(self):
        """The shortest record list that folds back to this state (for store rewrites)."""
        out = [PromiseRecord(self.promised)]
        if self.snapshot_index:
            out.append(CompactRecord(self.snapshot_index))
        for s in sorted(self.accepted):
            b, v = self.accepted[s]
            out.append(AcceptRecord(b, s, (v,)))
        return out


@dataclass(frozen=True)
class ReadState:
    """Serve read ``read_id`` once every slot ``<= index`` is applied."""
    read_id: object
    index: int


@dataclass(frozen=True)
class LeaderChange:
    leader: Optional[int]
    ballot: Ballot


@dataclass(frozen=True)
class Ready:
    """Everything a replica asks of its glue since the previous ``ready()``."""
    messages: tuple = ()       # ((to, msg), ...): send now
    records: tuple = ()        # persist, fsync, then persisted(token)
    token: int = 0
    snapshot: Optional[int] = None  # the index of the snapshot whose parts are all stored:
    #                                   restore the state from it before applying decided
    decided: tuple = ()        # ((slot, (command, ...)), ...) in order
    leader: Optional[LeaderChange] = None
    reads: tuple = ()          # (ReadState, ...)
    failed_reads: tuple = ()   # (read_id, ...)
    dropped: tuple = ()        # (command, ...) never given a slot
    want_snapshot: bool = False  # a peer needs one: call offer_snapshot(index, data)
    # ((index, offset, data), ...): bytes of a snapshot being received, in order, to
    # store before ``snapshot`` names it; offset 0 starts one anew. The replica keeps
    # none of it: a snapshot weighs as much as the state.
    snapshot_parts: tuple = ()
    rebuilt: bool = False      # a rebuilding replica votes again: the glue may forget it rebuilt

    def __bool__(self):
        return bool(self.messages or self.records or self.snapshot is not None or self.decided
                    or self.rebuilt
                    or self.leader or self.reads or self.failed_reads or self.dropped
                    or self.want_snapshot or self.snapshot_parts)


class _SplitMix:
    """A tiny deterministic PRNG (splitmix64), for when no jitter is supplied."""

    def __init__(self, seed):
        self.state = seed & 0xFFFFFFFFFFFFFFFF

    def __call__(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return ((z ^ (z >> 31)) >> 11) / float(1 << 53)


def _size_groups(first, values):
    """Split consecutive slots' values into runs of at most ACCEPT_MESSAGE_BYTES."""
    start = first
    group = []
    size = 0
    for v in values:
        n = sum(map(len, v))
        if group and size + n > ACCEPT_MESSAGE_BYTES:
            yield start, tuple(group)
            start += len(group)
            group = []
            size = 0
        group.append(v)
        size += n
    if group:
        yield start, tuple(group)


class _Slot:
    __slots__ = ("value", "acks", "sent")

    def __init__(self, value, sent):
        self.value = value
        self.acks = set()
        self.sent = sent


class Replica:
    """One Multi-Paxos node: proposer, acceptor and learner (see module doc)."""

    def __init__(self, node_id, members, *, now=0.0, config=Config(), jitter=None, seed=0,
                 durable=None, rebuilding=False):
        members = tuple(sorted(set(members)))
        if node_id not in members:
            raise ValueError(f"node {node_id} is not among the members {members}")
        self.node_id = node_id
        self.members = members
        self.peers = tuple(m for m in members if m != node_id)
        self.config = config
        self._jitter = jitter if jitter is not None else _SplitMix(seed * 1000003 + node_id)
        self._now = now
        d = durable or DurableState()
        # acceptor
        self.promised = d.promised
        self._accepted = {s: e for s, e in d.accepted.items() if s > d.snapshot_index}
        # learner
        self._snapshot_index = d.snapshot_index
        self._offered = None           # (index, data): a snapshot to send peers, index >= compaction
        self._snapshot_used = now      # when a snapshot at hand was last offered, installed or sent from
        self._want_snapshot = False
        self._state_bytes = None       # the application's state size, as last noted
        self._chosen = {}
        self.commit_index = d.snapshot_index
        self._decided_upto = d.snapshot_index
        self._pending_snapshot = None  # index of a received snapshot to restore
        self._snap_rx = None           # _Receiving: the snapshot being received, if any
        self._snap_parts = []          # (index, offset, data) received, for the glue to store
        self._parts_unstored = 0       # parts handed to the glue that it has not yet stored
        self._snap_out = {}            # peer -> (index, data): the snapshot it is being sent
        self._snap_waiting = {}        # peer -> (from_slot, since, last ask): asked while none was at hand
        self._catchup_target = 0       # want chosen values up to here
        self._catchup_peer = None
        self._catchup_next = now
        self._catchup_progress = False
        self._catchup_since = now      # when the current catch-up episode began
        self._last_advance = now       # when catching up last moved (commit, a chunk, a part stored)
        self._led_since = now          # when this replica last became leader
        # roles
        self._role = FOLLOWER
        self.leader_id = None
        self._block_ballot = ZERO_BALLOT     # ballot of the leader whose lease we honour
        self._block_until = now + config.election_timeout  # a restarted node keeps quiet
        self._max_round = d.promised.round
        self._election_deadline = now + self._timeout()
        self._reported_leader = (None, None)
        self._prevote_ballot = None
        self._grants = set()
        self._ballot = None            # the ballot we run or lead with
        self._promises = {}
        self._transfer_from = ZERO_BALLOT
        # leader
        self._next_slot = 0
        self._phase1_end = 0
        self._inflight = {}
        self._queue = deque()
        self._hb_seq = 0
        self._hb_sent = {}
        self._hb_acks = {}
        self._hb_due = False
        self._commit_told = 0          # the commit index last sent to the peers
        self._next_heartbeat = now
        self._confirmed_seq = 0
        self._lease_until = float("-inf")
        self._lease_min_seq = 0
        self._heard = {}
        self._read_wait = deque()      # (read_id, index, seq) waiting for a heartbeat quorum
        self._read_confirmed = deque()  # (read_id, index) waiting for commit
        self._transfer = None          # (target, deadline, sent)
        # rebuilding after a lost disk (module doc): votes for nothing until fenced
        self._rebuilding = bool(rebuilding)
        self._fence_reports = {}       # peer -> RebuildReport
        self._fence_upto = None        # once fenced: the chosen prefix to learn before voting
        self._fence_stage = None       # "fenced": its records are durable; "finishing"
        self._fence_next = now         # when to ask the peers that have not answered again
        self._rebuilt_untold = False
        # outputs
        self._out = []
        self._records = []
        self._token = 0
        self._persisted = 0
        self._held = deque()           # (token, kind, a, b)
        self._reads_ready = []
        self._failed_reads = []
        self._dropped = []

    # ---- public properties -------------------------------------------------
    @property
    def is_leader(self):
        return self._role == LEADER

    @property
    def ballot(self):
        return self.promised

    @property
    def role(self):
        return self._role

    @property
    def snapshot_index(self):
        return self._snapshot_index

    @property
    def rebuilding(self):
        """True until a replica made with ``rebuilding=True`` votes again."""
        return self._rebuilding

    def rebuild_waits_for(self):
        """While rebuilding: the peers whose answer is missing, and the chosen
        prefix to learn once all answered (None until then)."""
        if not self._rebuilding:
            return (), None
        missing = () if self._fence_upto is not None else tuple(
            p for p in self.peers if p not in self._fence_reports)
        return missing, self._fence_upto

    def quorum(self):
        """Nodes needed for a promise or pre-vote quorum."""
        return len(self.members) // 2 + 1

    def accept_quorum(self):
        """Acceptances that make a value chosen (a learner's rule)."""
        return len(self.members) // 2 + 1

    # ---- inputs ------------------------------------------------------------
    def tick(self, now):
        if now > self._now:
            self._now = now
        now = self._now
        cfg = self.config
        if self._role == LEADER:
            if self._transfer is not None and now >= self._transfer[1]:
                if self._transfer[2]:
                    # The target was told to run and did not take over: its Prepare
                    # may still be in flight, and our acceptors let it through, so
                    # our lease in this ballot is gone for good: step down.
                    self._step_down(None)
                else:
                    # Never told to run (it did not answer or catch up in time): no
                    # Prepare passes our acceptors' lease, so we keep leading, and
                    # the heartbeats acked from now on give the lease back.
                    self._transfer = None
            elif self.peers and self._lost_quorum(now):
                self._step_down(None)
            elif (self._catchup_target > self.commit_index
                  and now - max(self._last_advance, self._led_since) > 2 * cfg.election_timeout):
                # Phase 1 said slots up to the target were chosen, but nobody
                # reachable can tell us their values any more (the node that
                # knew restarted). Their accepted values are still on a quorum
                # of disks: run phase 1 again and re-propose them.
                self._become_follower()
                self._start_prepare(ZERO_BALLOT)
            else:
                if now >= self._next_heartbeat:
                    self._heartbeat()
                    self._resend_accepts(now)
        elif self._rebuilding:
            self._election_deadline = now + self._timeout()
            if self._fence_upto is None and now >= self._fence_next:
                self._ask_fence()
        elif now >= self._election_deadline:
            self._start_prevote()
        if (self._offered is not None or self._snap_out) and \
                now - self._snapshot_used > SNAPSHOT_KEEP_SECONDS:
            self._offered = None
            self._snap_out.clear()
        self._maybe_request_catchup()

    def receive(self, msg, now=None):
        if now is not None and now > self._now:
            self._now = now
        handler = self._HANDLERS.get(type(msg))
        if handler is None:
            raise TypeError(f"not a paxos message: {msg!r}")
        if msg.sender not in self.members or msg.sender == self.node_id:
            return
        handler(self, msg)

    def propose(self, command):
        """Queue ``command`` (bytes) for the next slot; ``NotLeader`` on a non-leader."""
        if self._role != LEADER or self._transfer is not None:
            raise NotLeader(self._transfer[0] if self._transfer else self.leader_id)
        if not isinstance(command, bytes):
            raise TypeError("a command is bytes")
        if len(command) > MAX_COMMAND_BYTES:
            raise ValueError(f"a command is at most {MAX_COMMAND_BYTES} bytes")
        self._queue.append(command)

    def read(self, read_id, *, lease=False, now=None):
        """Ask for a linearizable read; it comes back in ``Ready.reads``.

        A lease read needs the current time: without ``now`` (or with an
        expired lease) it runs a read-index round instead. Passing ``now``
        matters after a stall: the last tick may be long past.
        """
        if self._role != LEADER or self._transfer is not None:
            raise NotLeader(self._transfer[0] if self._transfer else self.leader_id)
        if now is not None and now > self._now:
            self._now = now
        index = max(self.commit_index, self._phase1_end)
        if (lease and now is not None and self._lease_valid(self._now)
                and self.commit_index >= self._phase1_end):
            self._reads_ready.append(ReadState(read_id, self.commit_index))
            return
        if not self.peers:
            self._read_confirmed.append((read_id, index))
            self._release_reads()
            return
        self._read_wait.append((read_id, index, self._hb_seq + 1))
        self._hb_due = True

    def persisted(self, token):
        if token > self._token:
            token = self._token
        if token <= self._persisted:
            return
        self._persisted = token
        held = self._held
        while held and held[0][0] <= token:
            _, kind, a, b = held.popleft()
            if kind == "msg":
                self._out.append((a, b))
            else:
                a(*b)

    def compact(self, index):
        """The application's state is durable at applied ``index``: drop the log up to there.

        A snapshot for peers behind the dropped part is asked for
        (``want_snapshot``) when one needs it.
        """
        if index > self._decided_upto:
            raise ValueError(f"cannot compact at {index}: only {self._decided_upto} decided")
        if index <= self._snapshot_index:
            return
        self._drop_log_upto(index)
        self._records.append(CompactRecord(index))

    def offer_snapshot(self, index, data):
        """The application's snapshot at applied ``index``, for peers behind the compacted log.

        ``data``: bytes, or anything else with ``len()`` and slices, as a
        snapshot served from a file, whose slices the glue reads before
        sending them.

        True if kept. One older than the compaction point is of no use (the
        log that would follow it is gone), and one past what this replica
        has decided cannot be continued from its log yet (a state restored
        ahead of the log after a crash): both are refused, and the next peer
        that needs a snapshot asks again.
        """
        if not self._snapshot_index <= index <= self._decided_upto:
            return False
        if self._offered is None or index >= self._offered[0]:
            self._offered = (index, bytes(data) if isinstance(data, (bytearray, memoryview)) else data)
            self._snapshot_used = self._now
        # Peers waiting for one get their first chunk now, not when they next ask.
        for peer, (from_slot, _, last) in list(self._snap_waiting.items()):
            if self._now - last > self.config.election_timeout:
                del self._snap_waiting[peer]       # stopped asking: gone, or served elsewhere
            elif self._snapshot_serves(from_slot):
                self._start_transfer(peer)
        return True

    def peer_connected(self, peer):
        """A link to ``peer`` (re)opened: a leader repeats its latest heartbeat to it now.

        A node that restarted learns the leader and the commit index at
        once, instead of at the next heartbeat, and asks for what it
        misses. The repeat carries the same sequence number, so its ack
        counts toward a lease or read no later than the original's send time.
        """
        if self._role == LEADER and peer in self.peers and self._hb_seq:
            self._send(peer, Heartbeat(self.node_id, self._ballot, self.commit_index, self._hb_seq))
        if self._rebuilding and self._fence_upto is None and peer not in self._fence_reports:
            self._send(peer, RebuildQuery(self.node_id))

    def note_state_bytes(self, size):
        """The application's state is about ``size`` bytes: what a snapshot of it would weigh.

        Until noted, peers get snapshots only when they are behind the
        compacted log (see ``Config.snapshot_catchup_fraction``).
        """
        self._state_bytes = size

    def transfer_leadership(self, target):
        """Hand over to ``target`` once it has caught up. ``CannotTransfer`` while a
        transfer is under way or when ``target`` has not answered for an election
        timeout: it could not take over, and this replica keeps leading (a transfer
        that ends with the target never told to run leaves it leading too)."""
        if self._role != LEADER:
            raise NotLeader(self.leader_id)
        if target not in self.peers:
            raise ValueError(f"cannot transfer leadership to {target}")
        if self._transfer is not None:
            raise CannotTransfer(f"node {self.node_id} is already handing leadership to "
                                 f"node {self._transfer[0]}")
        if self._now - self._heard.get(target, float("-inf")) > self.config.election_timeout:
            raise CannotTransfer(f"node {target} has not answered node {self.node_id} for over "
                                 f"an election timeout ({self.config.election_timeout:g} s)")
        self._transfer = (target, self._now + self.config.election_timeout, False)
        self._lease_until = float("-inf")
        self._lease_min_seq = self._hb_seq + 1
        self._hb_due = True

    def has_ready(self):
        return bool(self._out or self._records or self._queue and self._can_propose()
                    or self._hb_due or self._decided_upto < self.commit_index
                    or self._pending_snapshot is not None or self._snap_parts
                    or self._reads_ready or self._failed_reads
                    or self._dropped or self._leader_changed() or self._commit_untold()
                    or self._want_snapshot or self._rebuilt_untold)

    def ready(self):
        if self._role == LEADER:
            self._flush_proposals()
            if self._hb_due or self._commit_untold():
                self._heartbeat()
        token = 0
        records = ()
        if self._records:
            self._token += 1
            token = self._token
            records = tuple(self._records)
            self._records = []
        decided = ()
        if self._decided_upto < self.commit_index:
            chosen = self._chosen
            decided = tuple((s, chosen[s]) for s in range(self._decided_upto + 1, self.commit_index + 1))
            self._decided_upto = self.commit_index
        leader = None
        if self._leader_changed():
            self._reported_leader = self._leader_state()
            leader = LeaderChange(*self._reported_leader)
        parts, self._snap_parts = self._snap_parts, []
        if self._pending_snapshot is not None:
            # Parts after the last of the snapshot to restore begin another one: they
            # go in the next Ready, to be stored after this one is restored.
            last = max((k for k, part in enumerate(parts) if part[0] == self._pending_snapshot),
                       default=len(parts) - 1)
            parts, self._snap_parts = parts[:last + 1], parts[last + 1:]
        r = Ready(tuple(self._out), records, token, self._pending_snapshot, decided, leader,
                  tuple(self._reads_ready), tuple(self._failed_reads), tuple(self._dropped),
                  self._want_snapshot, tuple(parts), self._rebuilt_untold)
        self._rebuilt_untold = False
        self._out = []
        self._pending_snapshot = None
        self._want_snapshot = False
        self._reads_ready = []
        self._failed_reads = []
        self._dropped = []
        return r

    # ---- helpers: persistence and sending ----------------------------------
    def _send(self, to, msg):
        self._out.append((to, msg))

    def _send_durable(self, to, msg):
        """Send once every record issued so far is persisted (a reply that reveals state)."""
        if self._records:
            self._held.append((self._token + 1, "msg", to, msg))
        elif self._token > self._persisted:
            self._held.append((self._token, "msg", to, msg))
        else:
            self._out.append((to, msg))

    def _after_durable(self, fn, *args):
        if self._records:
            self._held.append((self._token + 1, "call", fn, args))
        elif self._token > self._persisted:
            self._held.append((self._token, "call", fn, args))
        else:
            fn(*args)

    def _commit_untold(self):
        # Followers learn the commit index from Accepts and heartbeats. When no
        # Accept is about to carry a new one, a heartbeat goes at once: a
        # follower answers its clients only once it applies, and must not
        # wait for the next periodic heartbeat to do so.
        return self._role == LEADER and self.peers and self.commit_index > self._commit_told

    def _timeout(self):
        e = self.config.election_timeout
        top = self.config.election_timeout_max
        return e + (e if top is None else top - e) * self._jitter()

    def _leader_state(self):
        return (self.leader_id, self._block_ballot if self.leader_id is not None else None)

    def leader_state(self):
        """``(leader id, its ballot)``, or ``(None, None)``: the leadership a
        command sent now goes to (the glue sends again, on a change, what it
        sent to an earlier one)."""
        return self._leader_state()

    def _leader_changed(self):
        return self._reported_leader != self._leader_state()

    def _see_round(self, ballot):
        if ballot.round > self._max_round:
            self._max_round = ballot.round

    def _new_ballot(self):
        return Ballot(max(self._max_round, self.promised.round) + 1, self.node_id)

    def _lease_valid(self, now):
        return now < self._lease_until

    def _lost_quorum(self, now):
        limit = now - self.config.election_timeout
        fresh = 1 + sum(1 for p in self.peers if self._heard.get(p, limit) > limit)
        return fresh < self.quorum()

    # ---- elections ---------------------------------------------------------
    def _start_prevote(self):
        self._election_deadline = self._now + self._timeout()
        if self._role != FOLLOWER:
            self._become_follower()
        self._role = PRECANDIDATE
        self._prevote_ballot = self._new_ballot()
        self._grants = {self.node_id}
        if len(self._grants) >= self.quorum():
            self._start_prepare(ZERO_BALLOT)
            return
        for p in self.peers:
            self._send(p, PreVote(self.node_id, self._prevote_ballot, self.commit_index))

    def _on_prevote(self, m):
        granted = (self._role != LEADER and self._now >= self._block_until
                   and m.commit >= self.commit_index and not self._rebuilding)
        # A refusal carries our promise, so a candidate learns how high to go.
        b = m.ballot if granted else max(m.ballot, self.promised)
        self._send(m.sender, PreVoteReply(self.node_id, b, granted))

    def _on_prevote_reply(self, m):
        self._see_round(m.ballot)
        if self._role != PRECANDIDATE or m.ballot != self._prevote_ballot or not m.granted:
            return
        self._grants.add(m.sender)
        if len(self._grants) >= self.quorum():
            self._start_prepare(ZERO_BALLOT)

    def _start_prepare(self, transfer_from):
        b = self._new_ballot()
        self._see_round(b)
        self._role = CANDIDATE
        self._ballot = b
        self._transfer_from = transfer_from
        self._promises = {}
        self.promised = b
        self.leader_id = None
        self._election_deadline = self._now + self._timeout()
        self._records.append(PromiseRecord(b))
        self._after_durable(self._own_promise_durable, b)

    def _own_promise_durable(self, b):
        if self._role != CANDIDATE or self._ballot != b:
            return
        self._promises[self.node_id] = self._make_promise(b, self.commit_index + 1)
        for p in self.peers:
            self._send(p, Prepare(self.node_id, b, self.commit_index + 1, self._transfer_from))
        self._maybe_lead()

    def _make_promise(self, b, from_slot):
        low = max(from_slot - 1, self.commit_index)
        entries = tuple(AcceptedEntry(s, e[0], e[1]) for s, e in sorted(self._accepted.items())
                        if s > low)
        return Promise(self.node_id, b, self.commit_index, entries)

    def _on_prepare(self, m):
        self._see_round(m.ballot)
        if self._rebuilding:
            return
        if m.ballot < self.promised:
            self._send(m.sender, Reject(self.node_id, m.ballot, self.promised))
            return
        if m.ballot > self.promised:
            authorized = (m.transfer_from != ZERO_BALLOT and m.transfer_from == self._block_ballot)
            if not authorized:
                if self._role == LEADER:
                    return  # a live leader keeps its lease
                if self._now < self._block_until and m.sender != self.leader_id:
                    return  # we still hear from our leader: stickiness and lease
            if self._role != FOLLOWER:
                self._become_follower()
            self.promised = m.ballot
            self.leader_id = None
            self._records.append(PromiseRecord(m.ballot))
            self._election_deadline = self._now + self._timeout()
        self._send_durable(m.sender, self._make_promise(m.ballot, m.from_slot))

    def _on_promise(self, m):
        if self._role != CANDIDATE or m.ballot != self._ballot:
            return
        self._promises[m.sender] = m
        self._maybe_lead()

    def _maybe_lead(self):
        if self._role != CANDIDATE or len(self._promises) < self.quorum():
            return
        if self.node_id not in self._promises:
            return
        b = self._ballot
        promises = list(self._promises.values())
        known = max(p.chosen_upto for p in promises)
        best = {}
        for p in promises:
            for e in p.accepted:
                if e.slot > known:
                    cur = best.get(e.slot)
                    if cur is None or e.ballot > cur.ballot:
                        best[e.slot] = e
        top = max(best) if best else known
        top = max(top, known)
        self._role = LEADER
        self.leader_id = self.node_id
        self._block_ballot = b
        self._promises = {}
        self._inflight = {}
        self._queue.clear()
        self._phase1_end = top
        self._next_slot = max(top, self.commit_index) + 1
        self._hb_sent.clear()
        self._hb_acks.clear()
        self._lease_until = float("-inf")
        self._lease_min_seq = self._hb_seq + 1
        self._transfer = None
        self._heard = {p: self._now for p in self.peers}
        # Not an advance: a leader that re-runs phase 1 because nothing moves
        # must not reset how long a peer has kept it waiting for a snapshot.
        self._led_since = self._now
        if known > self.commit_index:
            peer = next(p.sender for p in promises if p.chosen_upto == known)
            self._want_catchup(known, peer)
        start = max(known, self.commit_index) + 1
        if start <= top:
            values = [self._recovered_value(s, best.get(s)) for s in range(start, top + 1)]
            self._next_slot = start
            self._propose_values(values)
        self._heartbeat()

    def _recovered_value(self, slot, entry):
        """The value phase 2 must use for a slot phase 1 found (no-op when none)."""
        if slot in self._chosen:
            return self._chosen[slot]
        return entry.value if entry is not None else ()

    def _become_follower(self):
        was_leader = self._role == LEADER
        self._role = FOLLOWER
        self._promises = {}
        self._grants = set()
        self._ballot = None
        if was_leader:
            self._inflight = {}
            self._dropped.extend(self._queue)
            self._queue.clear()
            self._failed_reads.extend(r[0] for r in self._read_wait)
            self._failed_reads.extend(r[0] for r in self._read_confirmed)
            self._read_wait.clear()
            self._read_confirmed.clear()
            self._lease_until = float("-inf")
            self._transfer = None
            self._hb_due = False
            self.leader_id = None

    def _step_down(self, leader):
        self._become_follower()
        self.leader_id = leader
        self._election_deadline = self._now + self._timeout()

    def _follow(self, m):
        """A message from the leader at m.ballot (>= promised): note it, extend its lease."""
        if self._role != FOLLOWER and (self._role != LEADER or m.ballot != self._ballot):
            self._become_follower()
        self.leader_id = m.sender
        self._block_ballot = m.ballot
        self._block_until = self._now + self.config.election_timeout
        self._election_deadline = self._now + self._timeout()

    # ---- phase 2 -----------------------------------------------------------
    def _can_propose(self):
        return self._role == LEADER and self._next_slot - 1 - self.commit_index < self.config.window

    def _flush_proposals(self):
        cfg = self.config
        q = self._queue
        values = []
        while q and self._next_slot + len(values) - 1 - self.commit_index < cfg.window:
            batch = []
            size = 0
            while q and len(batch) < cfg.max_batch_commands:
                c = q[0]
                if batch and size + len(c) > cfg.max_batch_bytes:
                    break
                batch.append(q.popleft())
                size += len(c)
            values.append(tuple(batch))
        if values:
            self._propose_values(values)

    def _propose_values(self, values):
        """Phase 2a for ``values`` in slots from ``_next_slot`` at our ballot."""
        b = self._ballot
        first = self._next_slot
        now = self._now
        values = tuple(values)
        for i, v in enumerate(values):
            s = first + i
            self._inflight[s] = _Slot(v, now)
            self._accepted[s] = (b, v)
        self._next_slot = first + len(values)
        self._commit_told = self.commit_index
        for start, group in _size_groups(first, values):
            self._records.append(AcceptRecord(b, start, group))
            msg = Accept(self.node_id, b, start, group, self.commit_index)
            for p in self.peers:
                self._send(p, msg)
        self._after_durable(self._count_accepts, self.node_id, b, first, len(values))

    def _resend_accepts(self, now):
        if not self._inflight:
            return
        old = now - self.config.heartbeat_interval
        b = self._ballot
        slots = sorted(s for s, st in self._inflight.items() if st.sent <= old)
        inflight = self._inflight
        for p in self.peers:
            runs = []
            for s in slots:
                if p in inflight[s].acks:
                    continue
                if runs and s == runs[-1][-1] + 1:
                    runs[-1].append(s)
                else:
                    runs.append([s])
            for run in runs:
                for start, group in _size_groups(run[0], [inflight[x].value for x in run]):
                    self._send(p, Accept(self.node_id, b, start, group, self.commit_index))
        for s in slots:
            self._inflight[s].sent = now

    def _on_accept(self, m):
        self._see_round(m.ballot)
        if self._rebuilding:
            # No vote, but the commit index it carries says what to catch up to.
            if m.ballot >= self.promised:
                self._follow(m)
            self._learn_commit(m.commit, m.ballot, m.sender)
            return
        if m.ballot < self.promised:
            self._send(m.sender, Reject(self.node_id, m.ballot, self.promised))
            return
        raised = m.ballot > self.promised
        self.promised = m.ballot
        self._follow(m)
        commit = self.commit_index
        first, values = m.first_slot, m.values
        if first <= commit:
            skip = commit + 1 - first
            first, values = commit + 1, values[skip:]
        if values:
            b = m.ballot
            acc = self._accepted
            for i, v in enumerate(values):
                acc[first + i] = (b, v)
            self._records.append(AcceptRecord(b, first, values))
        elif raised:
            self._records.append(PromiseRecord(m.ballot))
        self._send_durable(m.sender, Accepted(self.node_id, m.ballot, m.first_slot, len(m.values)))
        self._learn_commit(m.commit, m.ballot, m.sender)

    def _on_accepted(self, m):
        if self._role != LEADER or m.ballot != self._ballot:
            return
        self._heard[m.sender] = self._now
        self._count_accepts(m.sender, m.ballot, m.first_slot, m.count)

    def _count_accepts(self, node, b, first, count):
        if self._role != LEADER or b != self._ballot:
            return
        need = self.accept_quorum()
        inflight = self._inflight
        chosen_any = False
        for s in range(first, first + count):
            st = inflight.get(s)
            if st is None:
                continue
            st.acks.add(node)
            if len(st.acks) >= need:
                self._chosen[s] = st.value
                del inflight[s]
                chosen_any = True
        if chosen_any:
            self._advance_commit()

    def _on_reject(self, m):
        self._see_round(m.promised)
        if self._role in (LEADER, CANDIDATE) and m.ballot == self._ballot and m.promised > m.ballot:
            self._step_down(None)

    # ---- learning ----------------------------------------------------------
    def _learn_commit(self, commit, b, peer):
        s = self.commit_index + 1
        chosen, acc = self._chosen, self._accepted
        while s <= commit:
            if s not in chosen:
                e = acc.get(s)
                if e is None or e[0] != b:
                    break
                chosen[s] = e[1]
            s += 1
        self._advance_commit()
        if commit > self.commit_index:
            self._want_catchup(commit, peer)

    def _advance_commit(self):
        s = self.commit_index
        chosen, acc = self._chosen, self._accepted
        while s + 1 in chosen:
            s += 1
            acc.pop(s, None)
        if s != self.commit_index:
            self.commit_index = s
            self._catchup_progress = True
            self._last_advance = self._now
            if self._read_confirmed:
                self._release_reads()
            if self._transfer is not None:
                self._hb_due = True
            if self._fence_stage == "fenced":
                self._finish_rebuild()

    def _want_catchup(self, upto, peer):
        if self._catchup_target <= self.commit_index:
            self._catchup_peer = peer      # a new episode starts with who told us
            self._catchup_progress = True
            self._catchup_since = self._now
        if upto > self._catchup_target:
            self._catchup_target = upto
        self._maybe_request_catchup()

    def _maybe_request_catchup(self):
        """Ask for missing chosen values, at most once per heartbeat interval;
        a peer that gave us nothing since the last ask is skipped for the next."""
        if self._catchup_target > self.commit_index and self._now >= self._catchup_next:
            rx = self._snap_rx
            if rx is not None and rx.held:
                return               # the glue is storing what came: it asks when done
            if not self._catchup_progress:
                self._rotate_catchup_peer()
            self._request_catchup()

    def _rotate_catchup_peer(self):
        """No progress from the peer we asked: try the next peer, in turn."""
        peers = self.peers
        if not peers:
            return
        if self._catchup_peer in peers:
            i = peers.index(self._catchup_peer)
            self._catchup_peer = peers[(i + 1) % len(peers)]
        else:
            self._catchup_peer = peers[0]

    def _request_catchup(self):
        peer = self._catchup_peer
        if peer is None or peer == self.node_id:
            return
        self._catchup_next = self._now + 2 * self.config.heartbeat_interval
        self._catchup_progress = False
        rx = self._snap_rx
        idx, off = (rx.index, rx.received) if rx else (0, 0)
        self._send(peer, CatchupRequest(self.node_id, self.commit_index + 1, idx, off))

    def _on_catchup_request(self, m):
        # A transfer keeps the snapshot it started with, even if we compact
        # again or the peer's lag looks different meanwhile, so neither
        # frequent compaction nor a changing estimate can starve it.
        pinned = self._snap_out.get(m.sender)
        if pinned is not None and pinned[0] == m.snapshot_index and m.snapshot_offset:
            self._send_chunk(m.sender, pinned, m.snapshot_offset)
            return
        compacted = m.from_slot <= self._snapshot_index
        waited_out = False
        if compacted or self._snapshot_pays(m.from_slot):
            if self._snapshot_serves(m.from_slot):
                self._start_transfer(m.sender)
                return
            # None at hand: ask the application. The peer is sent the first
            # chunk once one is offered (and asks again meanwhile). A peer
            # the log could still serve waits too, for up to
            # SNAPSHOT_WAIT_SECONDS: what it would apply meanwhile is work
            # the snapshot undoes, and its install would queue behind it.
            self._want_snapshot = True
            _, since, last = self._snap_waiting.get(m.sender, (None, self._now, self._now))
            if self._now - last > self.config.election_timeout:
                since = self._now          # it stopped asking a while ago: a new wait
            self._snap_waiting[m.sender] = (m.from_slot, since, self._now)
            if compacted or self._now - since < SNAPSHOT_WAIT_SECONDS:
                # An empty run says "being prepared: keep asking me", so the
                # peer does not turn to another, which would make a second
                # snapshot on the same machines meanwhile.
                self._send(m.sender, Learn(self.node_id, m.from_slot, ()))
                return
            waited_out = True          # still sent a snapshot once one is offered
        self._snap_out.pop(m.sender, None)
        if not waited_out:
            self._snap_waiting.pop(m.sender, None)
        values = []
        size = 0
        s = m.from_slot
        chosen = self._chosen
        while s in chosen and len(values) < self.config.catchup_slots:
            v = chosen[s]
            values.append(v)
            size += sum(len(c) for c in v)
            s += 1
            if size >= self.config.snapshot_chunk_bytes:
                break
        if values:
            self._send(m.sender, Learn(self.node_id, m.from_slot, tuple(values)))

    def _snapshot_serves(self, from_slot):
        """Does the snapshot at hand serve a peer that misses ``from_slot``..?

        Behind the compacted log, any the log continues from does; otherwise
        it must spare the peer at least half of what it misses.
        """
        offered = self._offered
        if offered is None:
            return False
        if from_slot <= self._snapshot_index:
            return offered[0] >= self._snapshot_index
        return 2 * (offered[0] - from_slot + 1) >= self.commit_index - from_slot + 1

    def _start_transfer(self, to):
        self._snap_waiting.pop(to, None)
        self._snap_out[to] = self._offered
        self._send_chunk(to, self._offered, 0)

    def _send_chunk(self, to, snapshot, off):
        index, data = snapshot
        self._snapshot_used = self._now
        if off > len(data):
            off = 0
        chunk = data[off:off + self.config.snapshot_chunk_bytes]
        self._send(to, SnapshotChunk(self.node_id, index, off, len(data), chunk))

    def _snapshot_pays(self, from_slot):
        """Would a snapshot catch up a peer that misses ``from_slot``.. cheaper than the log?

        The log it misses is estimated from up to 32 evenly spaced slots;
        a snapshot weighs what the application last noted.
        """
        fraction, state = self.config.snapshot_catchup_fraction, self._state_bytes
        missing = self.commit_index - from_slot + 1
        if fraction is None or state is None or missing <= self.config.catchup_slots:
            return False
        chosen = self._chosen
        step = max(1, missing // 32)
        sizes = [sum(len(c) for c in chosen[s])
                 for s in range(from_slot, self.commit_index + 1, step) if s in chosen]
        if not sizes:
            return False
        return missing * sum(sizes) / len(sizes) >= fraction * state

    def _on_learn(self, m):
        if not m.values:
            # The peer asked prepares what we miss (a snapshot): stay with
            # it, for as long as a peer serving us waits for one.
            moved = max(self._last_advance, self._catchup_since)
            if m.sender == self._catchup_peer and self._now - moved < SNAPSHOT_WAIT_SECONDS:
                self._catchup_progress = True
            return
        chosen = self._chosen
        c = self.commit_index
        for i, v in enumerate(m.values):
            s = m.first_slot + i
            if s > c and s not in chosen:
                chosen[s] = v
        before = self.commit_index
        self._advance_commit()
        if self.commit_index > before and self._catchup_target > self.commit_index:
            rx = self._snap_rx
            if rx is not None and rx.held:
                return       # its disk's report asks next, of the peer sending the snapshot
            self._catchup_peer = m.sender
            self._request_catchup()

    def _on_snapshot_chunk(self, m):
        if m.index <= self.commit_index:
            self._snap_rx = None
            return
        rx = self._snap_rx
        if rx is None or rx.index != m.index:
            # Start over only on the first chunk from the peer we now ask
            # (late chunks from one we asked before must not reset the transfer).
            if m.offset != 0 or (rx is not None and m.sender != self._catchup_peer):
                return
            rx = self._snap_rx = _Receiving(m.index, m.total)
        if m.offset != rx.received or m.total != rx.total:
            return
        self._snap_parts.append((m.index, m.offset, m.data))   # stored by the glue, not kept
        self._parts_unstored += 1
        rx.received += len(m.data)
        self._catchup_progress = True
        self._last_advance = self._now
        if rx.received >= rx.total:
            self._snap_rx = None
            self._install_snapshot(m.index)
            if self._catchup_target > self.commit_index:
                self._request_catchup()
        elif m.data:
            self._catchup_peer = m.sender
            if self._parts_unstored < SNAPSHOT_UNSTORED_PARTS:
                self._request_catchup()
            else:
                rx.held = True

    def snapshot_part_stored(self):
        """The glue has stored one more of the parts ``Ready.snapshot_parts``
        handed it (it stores them in the order given).

        A receiver that held back its ask for the next chunk (see
        ``SNAPSHOT_UNSTORED_PARTS``) asks for it now. Parts of an earlier
        transfer count too: until stored, they are in memory all the same.
        """
        if self._parts_unstored:
            self._parts_unstored -= 1
        rx = self._snap_rx
        if rx is not None and rx.held and self._parts_unstored < SNAPSHOT_UNSTORED_PARTS:
            rx.held = False
            self._last_advance = self._now
            if self._catchup_target > self.commit_index:
                self._request_catchup()

    def _install_snapshot(self, index):
        self._drop_log_upto(index)
        self.commit_index = index
        self._decided_upto = index
        self._pending_snapshot = index
        self._records.append(CompactRecord(index))
        for s in [s for s in self._inflight if s <= index]:
            del self._inflight[s]
        if self._role == LEADER and self._next_slot <= index:
            self._next_slot = index + 1
        self._advance_commit()
        self._catchup_progress = True
        if self._fence_stage == "fenced":
            self._finish_rebuild()

    def _drop_log_upto(self, index):
        self._snapshot_index = index
        if self._offered is not None and self._offered[0] < index:
            self._offered = None       # no longer of use: the log after it is gone
        self._chosen = {s: v for s, v in self._chosen.items() if s > index}
        self._accepted = {s: e for s, e in self._accepted.items() if s > index}

    # ---- rebuilding after a lost disk (module doc) --------------------------
    def _ask_fence(self):
        self._fence_next = self._now + 2 * self.config.heartbeat_interval
        for p in self.peers:
            if p not in self._fence_reports:
                self._send(p, RebuildQuery(self.node_id))

    def _on_rebuild_query(self, m):
        self._send(m.sender, RebuildReport(self.node_id, self.promised, self.commit_index,
                                           self._make_promise(self.promised, 0).accepted,
                                           self._rebuilding))

    def _on_rebuild_report(self, m):
        self._see_round(m.promised)
        if not self._rebuilding or self._fence_upto is not None or m.rebuilding:
            return
        self._fence_reports[m.sender] = m
        if len(self._fence_reports) == len(self.peers):
            self._fence()

    def _fence(self):
        reports = list(self._fence_reports.values())
        self._fence_reports = {}
        upto = max(r.chosen_upto for r in reports)
        best = {}
        for r in reports:
            for e in r.accepted:
                if e.slot > upto and e.slot > self.commit_index:
                    cur = best.get(e.slot)
                    if cur is None or e.ballot > cur.ballot:
                        best[e.slot] = e
        for slot, e in sorted(best.items()):
            own = self._accepted.get(slot)
            if own is None or e.ballot > own[0]:
                self._accepted[slot] = (e.ballot, e.value)
                self._records.append(AcceptRecord(e.ballot, slot, (e.value,)))
        top = max(r.promised for r in reports)
        if top > self.promised:
            self.promised = top
        self._see_round(self.promised)
        self._records.append(PromiseRecord(self.promised))
        self._fence_upto = upto
        if upto > self.commit_index:
            self._want_catchup(upto, next(r.sender for r in reports if r.chosen_upto == upto))
        self._after_durable(self._fence_persisted)

    def _fence_persisted(self):
        self._fence_stage = "fenced"
        self._finish_rebuild()

    def _finish_rebuild(self):
        if self.commit_index < self._fence_upto:
            return
        self._fence_stage = "finishing"
        first = self._snapshot_index + 1
        learnt = [self._chosen[s] for s in range(first, self._fence_upto + 1)]
        for start, group in _size_groups(first, learnt):
            self._records.append(AcceptRecord(self.promised, start, group))
        self._after_durable(self._rebuild_done)

    def _rebuild_done(self):
        self._rebuilding = False
        self._fence_stage = None
        self._rebuilt_untold = True
        self._election_deadline = self._now + self._timeout()

    # ---- heartbeats, reads, transfer ---------------------------------------
    def _heartbeat(self):
        self._hb_due = False
        self._hb_seq += 1
        seq = self._hb_seq
        self._hb_sent[seq] = self._now
        self._hb_acks[seq] = {self.node_id}
        if len(self._hb_sent) > 64:
            for old in sorted(self._hb_sent)[:-32]:
                self._hb_sent.pop(old, None)
                self._hb_acks.pop(old, None)
        self._next_heartbeat = self._now + self.config.heartbeat_interval
        msg = Heartbeat(self.node_id, self._ballot, self.commit_index, seq)
        self._commit_told = self.commit_index
        for p in self.peers:
            self._send(p, msg)

    def _on_heartbeat(self, m):
        self._see_round(m.ballot)
        if self._rebuilding and m.ballot < self.promised:
            self._learn_commit(m.commit, m.ballot, m.sender)   # a non-voter rejects no one
            return
        if m.ballot < self.promised:
            self._send(m.sender, Reject(self.node_id, m.ballot, self.promised))
            return
        self._follow(m)
        self._send(m.sender, HeartbeatAck(self.node_id, m.ballot, m.seq, self.commit_index))
        self._learn_commit(m.commit, m.ballot, m.sender)

    def _on_heartbeat_ack(self, m):
        if self._role != LEADER or m.ballot != self._ballot:
            return
        self._heard[m.sender] = self._now
        acks = self._hb_acks.get(m.seq)
        if acks is not None:
            acks.add(m.sender)
            if len(acks) >= self.quorum() and m.seq > self._confirmed_seq:
                self._confirmed_seq = m.seq
                if m.seq >= self._lease_min_seq and self._transfer is None:
                    until = self._hb_sent[m.seq] + self.config.lease_duration
                    if until > self._lease_until:
                        self._lease_until = until
                self._confirm_reads()
        t = self._transfer
        if t is not None and m.sender == t[0] and not t[2]:
            if m.commit >= self.commit_index and not self._inflight and not self._queue:
                self._transfer = (t[0], t[1], True)
                self._send(t[0], TimeoutNow(self.node_id, self._ballot))

    # Both queues are ordered: a leader's read index and heartbeat numbers
    # only grow, so releasing reads costs O(1) per read.
    def _confirm_reads(self):
        wait = self._read_wait
        while wait and wait[0][2] <= self._confirmed_seq:
            rid, idx, _ = wait.popleft()
            self._read_confirmed.append((rid, idx))
        self._release_reads()

    def _release_reads(self):
        c = self.commit_index
        pending = self._read_confirmed
        while pending and pending[0][1] <= c:
            rid, idx = pending.popleft()
            self._reads_ready.append(ReadState(rid, idx))

    def _on_timeout_now(self, m):
        if self._rebuilding:
            return
        if m.ballot != self._block_ballot or self.leader_id != m.sender or self._role != FOLLOWER:
            return
        self._start_prepare(m.ballot)

    _HANDLERS = {
        PreVote: _on_prevote,
        PreVoteReply: _on_prevote_reply,
        Prepare: _on_prepare,
        Promise: _on_promise,
        Accept: _on_accept,
        Accepted: _on_accepted,
        Reject: _on_reject,
        Heartbeat: _on_heartbeat,
        HeartbeatAck: _on_heartbeat_ack,
        CatchupRequest: _on_catchup_request,
        Learn: _on_learn,
        SnapshotChunk: _on_snapshot_chunk,
        TimeoutNow: _on_timeout_now,
        RebuildQuery: _on_rebuild_query,
        RebuildReport: _on_rebuild_report,
    }
