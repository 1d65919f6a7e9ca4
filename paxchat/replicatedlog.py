"""The command log of a cluster: the Multi-Paxos replica joined to the node.

``ReplicatedLog`` is the ``ICommandLog`` of a node that is one of several.
It feeds the pure replica (``paxos/core.py``) its inputs - time from a
ticker, peer frames from the ``PeerTransport``, commands from ``submit``,
fsync acknowledgements from the ``DurableLog`` - and after every input runs
the replica's *Ready loop* in the documented order: persist records, send
messages, store the parts of a snapshot being received and restore it once
whole, apply decided slots to the state (through the ``StateWorker``, one
batch at a time, in order), note leader changes, release reads, and route
dropped proposals to the new leader.

How a write travels: ``submit`` tags the command with a request id
(``rid``), encodes it to JSON bytes and proposes it when this node leads,
else forwards it to the leader (``ForwardProposals``), which proposes it as
its own. Every node applies every slot; the node that took the client's
request answers it when *it* applies the command: observers first (they
push events), then the submitter's Deferred. A command that is not applied
within ``request_timeout`` fails with ``Unavailable`` and is never
re-proposed here (only ``dropped`` proposals are, which the core guarantees
were never given a slot): the client retries and the state dedups.

How a read is made linearizable: the leader asks its replica for a read
index (served from its lease when it holds one); a follower asks the leader
(``ReadIndexRequest``) and waits until it has applied up to that index.
Either way a node cut off from a quorum answers ``Unavailable`` in time
instead of serving stale state.

Every ``snapshot_interval`` applied slots the state is made durable (a
full commit), the replica drops its log up to the applied index
(``compact``) and the durable log is rewritten to just what is needed above
it. The state is serialized only when a peer needs what the log no longer
holds, or misses a log that weighs a good part of the state (the replica's
``want_snapshot``; the glue keeps it told the state's size), not at every
compaction: that would cost every node CPU and memory in proportion to the
whole state, each time.
A storage failure stops the node: it must never answer from state it
cannot trust.
"""

import dataclasses
import heapq
import itertools
import json
import os
import random
from collections import deque
from dataclasses import dataclass

from twisted.application.internet import TimerService
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from paxchat.clocks import MONOTONIC
from paxchat.interfaces import ICommandLog, Unavailable
from paxchat.logs import OccasionalByKind
from paxchat.paxos import messages as M
from paxchat.paxos.core import Config as CoreConfig
from paxchat.paxos.core import CANDIDATE, PRECANDIDATE, CannotTransfer, DurableState, NotLeader, Replica
from paxchat.paxos.transport import MAX_FRAME_BYTES
from paxchat.state.worker import StateWorkerStopped

__all__ = ["ReplicatedLog", "ReplicationSettings"]

log = Logger()

_CORE_MESSAGES = frozenset(M.MESSAGE_TYPES) - {
    M.ForwardProposals, M.ReadIndexRequest, M.ReadIndexReply}
_json_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

# Forwarded commands go in frames well under the transport's limit.
FORWARD_BATCH_BYTES = 4 << 20
FORWARD_BATCH_COMMANDS = 1024
# Slots applied in one state transaction at most.
APPLY_BATCH_SLOTS = 1024
# Applies share the state's group transaction (KVStore.group, which ends
# a group by size or age while applies keep coming); once they stop for
# this long, what is open is committed.
IDLE_COMMIT_SECONDS = 0.2
# How often the replica is told the state's size (see _note_state_size).
STATE_SIZE_SECONDS = 1.0
# Background work that fails (compaction, a snapshot for a peer, which the
# peer asks for again every two heartbeats) is retried; its failure is
# logged at most this often per kind, with a count.
BACKGROUND_LOG_SECONDS = 60.0


@dataclass(frozen=True)
class ReplicationSettings:
    """The knobs of the replicated log, from cluster.ini (see ``from_config``)."""

    heartbeat_interval: float = 0.1
    election_timeout: float = 1.0
    election_timeout_max: float | None = None   # None: 2 x election_timeout
    max_clock_drift: float = 0.05
    request_timeout: float = 5.0
    snapshot_interval: int = 10000
    compact_log_bytes: int = 32 << 20   # compact early when the log segment grows past this
    max_held: int = 10000               # commands waiting for a leader to be known

    @classmethod
    def from_config(cls, config):
        return cls(heartbeat_interval=config.heartbeat_interval,
                   election_timeout=config.election_timeout_min,
                   election_timeout_max=config.election_timeout_max,
                   max_clock_drift=config.max_clock_drift,
                   request_timeout=config.request_timeout,
                   snapshot_interval=config.snapshot_interval)

    def core_config(self):
        # A window of 32 full slots keeps a Promise under the peer frame limit.
        return CoreConfig(heartbeat_interval=self.heartbeat_interval,
                          election_timeout=self.election_timeout,
                          election_timeout_max=self.election_timeout_max,
                          max_clock_drift=self.max_clock_drift, window=32)


def _resendable(command):
    """Whether a command may be forwarded to a new leader while a copy sent to
    the old one might still commit: a ``send_message`` with a
    ``client_msg_id`` is stored once whatever the number of copies (the
    state's dedup table answers the others with the first one's message).
    Other writes are not sent again: a ``delete_account`` committed twice
    could delete an account of the same name made in between."""
    return command.get("op") == "send_message" and command.get("client_msg_id") is not None


class _Request:
    """A local submit or read barrier waiting for its answer."""
    __slots__ = ("deferred", "timer", "index", "asked", "asked_at", "resend")

    def __init__(self, deferred, timer, resend=None):
        self.deferred = deferred
        self.timer = timer
        self.resend = resend   # submits: the command's bytes, if safe to forward again (see _resendable)
        self.index = None      # reads: the read index once known
        self.asked = None      # reads: who was asked (node id), or None
        self.asked_at = 0.0


def _decode_command(raw):
    """(command for the state, request id) of a command as the log carries it.

    Undecodable bytes go to the state as they are (it answers invalid_request,
    the same on every node).
    """
    try:
        command = json.loads(raw)
    except (ValueError, RecursionError):
        return raw, None
    if not isinstance(command, dict):
        return raw, None
    rid = command.pop("rid", None)
    return command, rid if isinstance(rid, str) else None


@implementer(ICommandLog)
class ReplicatedLog:
    """An ``ICommandLog`` replicated by Multi-Paxos over the cluster's members.

    @param open_store: ``() -> Deferred[(DurableLog, [record bytes])]``.
    @param make_transport: ``make_transport(on_message) -> PeerTransport``-like
        (``send(to, frame) -> bool``, ``peer_state(id)``,
        ``add_state_observer(fn)``, a service), or None for a cluster of one
        node.
    @param on_fatal: ``on_fatal(reason)`` once the node must stop (storage
        failure); the node stops its process.
    @param recovered: ``(DurableLog, [record bytes])`` the caller already
        recovered (``DurableLog.open_now``), used instead of ``open_store``;
        the log owns it from here and closes it at ``stop``, started or not.
    @param clock: what time is read from (``seconds()``), for the replica's
        leases and timeouts and our deadlines; by default the reactor. A node
        passes ``MONOTONIC`` (``from_config``) whatever its reactor counts: the
        replica never lets its time go back, so on a wall clock stepped back a
        leader's read lease would outlive the real time it stands for.
    """

    def __init__(self, reactor, node_id, members, worker, settings, *, open_store=None,
                 make_transport=None, on_fatal=None, jitter=random.random,
                 rebuilding=False, on_rebuilt=None, recovered=None, clock=None):
        self._reactor = reactor
        self._clock = reactor if clock is None else clock
        self.node_id = node_id
        self.members = tuple(sorted(set(members)))
        self._worker = worker
        self.settings = settings
        self._core_config = settings.core_config()
        self._open_store = open_store
        self._on_fatal = on_fatal
        self._jitter = jitter
        # A node back on an empty disk votes for nothing until fenced
        # (paxos/core.py); on_rebuilt() once it votes again.
        self._rebuilding = rebuilding
        self._on_rebuilt = on_rebuilt
        self.transport = make_transport(self._on_frame) if make_transport else None
        if self.transport is not None:
            self.transport.add_state_observer(self._link_changed)
        self.ticker = TimerService(settings.heartbeat_interval / 2, self._tick)
        self.ticker.clock = reactor
        # Request ids must never repeat across restarts: a replayed slot of
        # an earlier run must not answer a request of this one.
        self._incarnation = os.urandom(6).hex()
        self._seq = itertools.count(1)
        self.replica = None
        self._recovered = recovered
        self.store = None if recovered is None else recovered[0]
        self.fsync_observer = None         # fn(seconds) per fsync of the store, for metrics
        self._starting = None
        self._stopped = False
        self.failed = None                 # why the node had to stop, once it did
        self._observers = []
        self._leader_observers = []
        self._leader_seen = None           # leader_id() as leader observers were last told
        self._pending = {}                 # rid -> _Request (submits)
        # (deadline, command bytes, guard): waiting for a leader. ``guard`` is
        # (node, ballot) for commands a peer forwarded to us: they are not sent
        # back to that node while we still follow the same ballot, so two
        # nodes that each think the other leads do not bounce them.
        self._held = deque()
        # Our own commands the state answers once however often they commit
        # (_resendable): bytes -> rid while pending; and those of them forwarded
        # to the leader or proposed while we led, rid -> (deadline, leader state
        # then), sent again to whoever leads next.
        self._resendable = {}
        self._forwarded = {}
        self._reads = {}                   # read id -> _Request
        self._read_ids = itertools.count(1)
        self._read_waiting = []            # heap of (index, read id) waiting for apply
        self._driving = False
        self._drive_call = None
        # applying
        self._apply_queue = deque()        # ("part", index, offset, data) | ("restore", index)
        #                                    | ("apply", [(slot, cmds)]), in order
        self._applying = False
        self._commit_call = None           # commits the state's open group once applies stop
        self._idle_waiters = []            # stop() waiting for the apply queue to drain
        self.applied_index = None          # the state's applied index, once read
        self._queued_upto = 0              # highest slot queued for the state (or in it)
        self._decided_upto = 0             # highest slot the replica handed out
        # compaction
        self._durable = None               # DurableState folded at the last rewrite
        self._unfolded = []                # records appended since
        self._compacted = 0
        self._compacting = False
        self._need_compaction = False      # snapshot_now() asked for one
        self._compaction_waiters = []      # snapshot_now() callers
        self._offering = False             # serializing the state for a peer behind the log
        self._background_failures = OccasionalByKind(reactor, BACKGROUND_LOG_SECONDS)
        self._forward_drops = OccasionalByKind(reactor, BACKGROUND_LOG_SECONDS)   # by peer
        self._sizing = False               # asking the state for its size
        self._size_due = 0.0               # when to ask again

    @classmethod
    def from_config(cls, reactor, config, node_id, worker, *, recovered, on_fatal=None,
                    peer_options=None, rebuilding=False, on_rebuilt=None):
        """The log of node ``node_id`` of a ClusterConfig (peer links only if it has peers;
        ``peer_options`` go to the PeerTransport: the lineage and identities of the node's
        data, paxchat/lineage.py; ``recovered``: its durable log, already open,
        ``DurableLog.open_now``)."""
        from paxchat.paxos.transport import PeerTransport

        make_transport = None
        if config.peers_of(node_id):
            def make_transport(on_message):
                return PeerTransport.from_config(reactor, config, node_id, on_message,
                                                 **(peer_options or {}))
        return cls(reactor, node_id, list(config.nodes), worker,
                   ReplicationSettings.from_config(config),
                   make_transport=make_transport, on_fatal=on_fatal,
                   rebuilding=rebuilding, on_rebuilt=on_rebuilt, recovered=recovered,
                   clock=MONOTONIC)

    def services(self):
        """The running parts the node must start (before clients) and stop (before ``stop``)."""
        return [s for s in (self.transport, self.ticker) if s is not None]

    # -- start and stop ---------------------------------------------------

    def start(self):
        """Recover the durable log and the applied index, then run the replica.

        Submits and reads made before it finishes wait (they may time out).
        Returns a Deferred; a failure has already stopped the node.
        """
        self._starting = d = self._start()
        return d

    @defer.inlineCallbacks
    def _start(self):
        try:
            if self._recovered is not None:
                store, records = self._recovered
                self._recovered = None
            else:
                store, records = yield self._open_store()
                if self._stopped:
                    yield store.close()
                    return
            self.store = store
            store.fsync_observer = self._observe_fsync
            applied = yield self._worker.call("applied_index")
            durable = DurableState.from_records([M.decode(r) for r in records])
        except Exception as e:
            if self._stopped or isinstance(e, StateWorkerStopped):
                log.info("node {node} stopped while its replicated log started", node=self.node_id)
            else:
                self._fatal(f"cannot start the replicated log: {e}", e)
            return
        if self._stopped:
            return
        if applied < durable.snapshot_index:
            # Crashed after persisting a received snapshot's CompactRecord but
            # before the state stored it: the log forgot this node's votes for
            # the slots up to there, and the state does not hold their values.
            # Claim only what the state holds, and vote for nothing until every
            # peer has said what it holds (the rebuild of a node whose disk was
            # lost): a value chosen with a quorum that counted on a forgotten
            # vote must not be chosen again differently with this node's help.
            log.warn("state applied index {applied} is below the log's snapshot index {index}:"
                     " the node rebuilds from its peers (every one must answer) before it"
                     " votes again", applied=applied, index=durable.snapshot_index)
            durable = DurableState(durable.promised, durable.accepted, applied)
            self._rebuilding = True
        self._durable = durable
        self.applied_index = applied
        self._queued_upto = applied
        self._decided_upto = self._compacted = durable.snapshot_index
        now = self._clock.seconds()
        if len(self.members) == 1:
            # Nobody else can hold a lease: elect ourselves at the first tick.
            now -= 2 * self.settings.election_timeout
        self.replica = Replica(self.node_id, self.members, now=now, config=self._core_config,
                               jitter=self._jitter, durable=durable,
                               rebuilding=self._rebuilding and len(self.members) > 1)
        if self.replica.rebuilding:
            log.warn("node {node} rebuilds on new data: it votes once every other node has told"
                     " it what its lost data may have promised", node=self.node_id)
        log.info("node {node} replicated log started: {count} log records, applied index"
                 " {applied}, snapshot index {index}, members {members}", node=self.node_id,
                 count=len(records), applied=applied, index=durable.snapshot_index,
                 members=list(self.members))
        self._tick()
        self._maybe_compact()
        self._note_state_size()

    @defer.inlineCallbacks
    def stop(self):
        """Stop ticking, fail what waits with Unavailable, close the transport and the log."""
        if self._stopped:
            return
        self._stopped = True
        for svc in self.services():
            if svc.running:
                yield svc.stopService()
            if svc.parent is not None:
                svc.disownServiceParent()
        if self._drive_call is not None and self._drive_call.active():
            self._drive_call.cancel()
        if self._commit_call is not None and self._commit_call.active():
            self._commit_call.cancel()    # closing the state commits
        self._fail_waiting("the node is stopping")
        if self._starting is not None:
            yield self._starting
        if self._applying or self._apply_queue:
            # Finish applying what was decided, so a stopped node's state is
            # as far along as its log says.
            idle = defer.Deferred()
            self._idle_waiters.append(idle)
            yield idle
        if self.store is not None:
            yield self.store.close()

    def _fatal(self, why, error=None):
        """Storage (or state) failed us: stop answering, stop the node.

        An ``on_fatal`` owner (the node) says why as it stops; said here too,
        it would be the same words twice in the journal.
        """
        if self.failed is not None:
            return
        self.failed = why
        if self._on_fatal is None:
            log.critical("node {node} stops: {why}", node=self.node_id, why=why)
        if self.ticker.running:
            self.ticker.stopService()
        self._fail_waiting(why)
        if self._on_fatal is not None:
            self._on_fatal(why)

    def _fail_waiting(self, why):
        pending, self._pending = self._pending, {}
        reads, self._reads = self._reads, {}
        self._held.clear()
        self._resendable.clear()
        self._forwarded.clear()
        self._read_waiting = []
        for request in list(pending.values()) + list(reads.values()):
            if request.timer.active():
                request.timer.cancel()
            request.deferred.errback(Unavailable(why))

    @property
    def _live(self):
        return self.replica is not None and not self._stopped and self.failed is None

    # -- ICommandLog --------------------------------------------------------

    def submit(self, command):
        if self._stopped or self.failed is not None:
            return defer.fail(Unavailable(self.failed or "the node is stopping"))
        rid = f"{self.node_id}:{self._incarnation}:{next(self._seq)}"
        data = _json_encode(dict(command, rid=rid)).encode("utf-8")
        if len(data) > M.MAX_COMMAND_BYTES:
            return defer.fail(ValueError(f"command of {len(data)} bytes is too large"))
        if len(self._held) >= self.settings.max_held:
            return defer.fail(Unavailable("too many commands are waiting for a leader"))
        d = defer.Deferred()
        timeout = self.settings.request_timeout
        timer = self._reactor.callLater(timeout, self._submit_timed_out, rid)
        resend = data if _resendable(command) else None
        self._pending[rid] = _Request(d, timer, resend)
        if resend is not None:
            self._resendable[data] = rid
        self._held.append((self._clock.seconds() + timeout, data, None))
        self._drive_soon()
        return d

    def read_barrier(self):
        if self._stopped or self.failed is not None:
            return defer.fail(Unavailable(self.failed or "the node is stopping"))
        read_id = next(self._read_ids)
        d = defer.Deferred()
        timer = self._reactor.callLater(self.settings.request_timeout, self._read_timed_out, read_id)
        self._reads[read_id] = _Request(d, timer)
        self._ask_read(read_id)
        self._drive_soon()
        return d

    def add_observer(self, observer):
        self._observers.append(observer)

    def add_leader_observer(self, observer):
        """Call ``observer(leader)`` each time ``leader_id()`` changes.

        Told after the replica's input that changed it has been handled (the
        Ready loop drained), on the reactor thread, with the new value: a
        number, or None when this node starts an election. The core's
        ``LeaderChange`` does not report the turn to pre-candidate, so the
        value ``hello`` answers is what is watched.
        """
        self._leader_observers.append(observer)

    def leader_id(self):
        """The leader, or None while this node is trying to elect one.

        A node that has gone a whole election timeout without hearing from its
        leader runs for election (pre-candidate, then candidate); the core keeps
        the last leader's id as a hint for forwarding, but it is no longer
        believed to lead: ``hello`` and ``status`` say there is none rather
        than name a node that may be dead.
        """
        r = self.replica
        if r is None or r.role in (PRECANDIDATE, CANDIDATE):
            return None
        return r.leader_id

    # -- operations -----------------------------------------------------------

    def status(self):
        """A snapshot of this node's replication, for operators and metrics."""
        r = self.replica
        peers, refused, refused_by = {}, {}, {}
        if self.transport is not None:
            peers = {n: self.transport.peer_state(n) for n in self.members if n != self.node_id}
            refused = getattr(self.transport, "refusals", dict)()
            refused_by = getattr(self.transport, "refused_by", dict)()
        leader = self.leader_id()
        # The ballot of the leader it follows, as its heartbeats and writes
        # say it: a follower back from a restart knows it at the first
        # heartbeat, while its promise ("ballot") rises only with a write.
        followed = r.leader_state()[1] if r is not None and leader is not None else None
        return {
            "node": self.node_id,
            "role": "failed" if self.failed else (r.role if r is not None else "starting"),
            "leader": leader,
            "ballot": [r.ballot.round, r.ballot.node] if r is not None else None,
            "leader_ballot": [followed.round, followed.node] if followed is not None else None,
            "commit_index": r.commit_index if r is not None else None,
            "applied_index": self.applied_index,
            "snapshot_index": r.snapshot_index if r is not None else None,
            "peers": peers,
            "refused_peers": refused,           # peer links refused for their data's lineage
            "refused_by_peers": refused_by,     # peers refusing our data, and why they said
            "rebuilding": self._rebuild_status(),
            "pending_proposals": len(self._pending),
            "held_commands": len(self._held),
            "pending_reads": len(self._reads),
            "log_bytes": self.store.size_bytes if self.store is not None else None,
        }

    def _rebuild_status(self):
        """None, or what a node rebuilding on new data waits for."""
        r = self.replica
        if r is None:
            return {"waiting_for": [], "catch_up_to": None} if self._rebuilding else None
        if not r.rebuilding:
            return None
        missing, upto = r.rebuild_waits_for()
        return {"waiting_for": list(missing), "catch_up_to": upto}

    def transfer_leadership(self, target):
        """Hand leadership to ``target`` (NotLeader / ValueError / CannotTransfer as the
        replica raises them). CannotTransfer too while our link to it is not up: it
        could not take over, so we keep leading rather than leave the cluster leaderless."""
        r = self.replica
        if r is None:
            raise NotLeader(None)
        if r.is_leader and target in r.peers and self.transport is not None:
            state = self.transport.peer_state(target)
            if state != "connected":
                raise CannotTransfer(f"node {target} is not linked to node {self.node_id} "
                                     f"({state})")
        r.transfer_leadership(target)
        self._drive()

    def step_down_gracefully(self, timeout=None):
        """Before a planned stop: transfer leadership to a connected peer and wait for it.

        Fires True once another node leads (or this one did not lead), False
        if none took over in ``timeout`` (default: two election timeouts).
        """
        r = self.replica
        if not self._live or not r.is_leader or not r.peers:
            return defer.succeed(True)
        connected = self.transport.connected_peers() if self.transport is not None else set()
        candidates = [p for p in r.peers if p in connected]
        if not candidates:
            return defer.succeed(False)      # none could take over; the others elect one
        try:
            self.transfer_leadership(candidates[0])
        except (NotLeader, ValueError, CannotTransfer):
            return defer.succeed(not r.is_leader)
        deadline = self._clock.seconds() + (timeout or 2 * self.settings.election_timeout)
        done = defer.Deferred()

        def check():
            leader = self.leader_id()
            if not self._live or (not self.replica.is_leader and leader not in (None, self.node_id)):
                done.callback(True)
            elif self._clock.seconds() >= deadline:
                done.callback(False)
            else:
                self._reactor.callLater(self.settings.heartbeat_interval, check)

        check()
        return done

    # -- inputs -----------------------------------------------------------------

    def _tick(self):
        if not self._live:
            return
        self.replica.tick(self._clock.seconds())
        self._retry_reads()
        self._drive()

    def _link_changed(self, peer, direction, up):
        """The transport opened a link: a leader tells that peer the commit index now;
        a follower forwards again to its leader what a link that dropped may have lost."""
        if up and self._live:
            self.replica.peer_connected(peer)
            if peer == self.replica.leader_id and self._forwarded:
                self._forward_again(link_lost=True)
                self._route_held()
            self._drive()

    def _on_frame(self, from_node_id, frame):
        """A frame from an authenticated peer; bad ones are dropped, never raised."""
        if not self._live:
            return
        try:
            msg = M.decode(frame)
        except M.DecodeError as e:
            log.debug("undecodable frame from node {peer}: {why}", peer=from_node_id, why=e)
            return
        if getattr(msg, "sender", None) != from_node_id:
            log.debug("frame from node {peer} claims sender {sender}; dropped",
                      peer=from_node_id, sender=getattr(msg, "sender", None))
            return
        kind = type(msg)
        if kind in _CORE_MESSAGES:
            self.replica.receive(msg, self._clock.seconds())
        elif kind is M.ForwardProposals:
            deadline = self._clock.seconds() + self.settings.request_timeout
            guard = (from_node_id, self.replica.ballot)
            for command in msg.commands:
                if len(self._held) < self.settings.max_held:
                    self._held.append((deadline, command, guard))
                    continue
                # A frame holds up to FORWARD_BATCH_COMMANDS: a line for each would
                # flood the journal while no leader takes them.
                count = self._forward_drops.happened(from_node_id)
                if count:
                    log.warn("dropped commands forwarded by node {peer}: {held} wait for a leader"
                             " already ({count} dropped since the last report); their clients"
                             " retry", peer=from_node_id, held=len(self._held), count=count)
        elif kind is M.ReadIndexRequest:
            self._remote_read(msg)
        elif kind is M.ReadIndexReply:
            self._read_reply(msg)
        self._drive()

    # -- the Ready loop ------------------------------------------------------------

    def _drive_soon(self):
        """Drive at the end of this reactor turn, so commands submitted together share a slot."""
        if self._drive_call is None or not self._drive_call.active():
            self._drive_call = self._reactor.callLater(0, self._drive)

    def _drive(self):
        if not self._live or self._driving:
            return
        self._driving = True
        try:
            self._route_held()
            replica = self.replica
            while self.failed is None and replica.has_ready():
                self._handle(replica.ready())
        finally:
            self._driving = False
        self._note_leader()

    def _note_leader(self):
        """Tell the leader observers if ``leader_id()`` changed with the last input.

        Every input (tick, frame, fsync, transfer) ends in ``_drive``, so no
        change of role or leader goes unseen.
        """
        leader = self.leader_id()
        if leader == self._leader_seen:
            return
        self._leader_seen = leader
        for observer in self._leader_observers:
            try:
                observer(leader)
            except Exception:
                log.failure("leader observer failed")

    def _handle(self, ready):
        if ready.records:
            self._persist(ready.records, ready.token)
        for to, msg in ready.messages:
            self._send(to, msg)
        for index, offset, data in ready.snapshot_parts:
            # Stored by the worker in order, between applies: on the disk, not in memory.
            self._apply_queue.append(("part", index, offset, data))
        if ready.snapshot is not None:
            index = ready.snapshot
            self._decided_upto = max(self._decided_upto, index)
            if index > self._queued_upto:
                self._queued_upto = index
                self._apply_queue.append(("restore", index))
        if ready.decided:
            self._decided_upto = max(self._decided_upto, ready.decided[-1][0])
            entries = [(slot, cmds) for slot, cmds in ready.decided if slot > self._queued_upto]
            if entries:
                self._queued_upto = entries[-1][0]
                self._apply_queue.append(("apply", entries))
        if ready.leader is not None:
            log.info("node {node}: leader is now {leader} (ballot {ballot})", node=self.node_id,
                     leader=ready.leader.leader, ballot=ready.leader.ballot)
            for request in self._reads.values():
                if request.index is None:
                    request.asked = None
        for state in ready.reads:
            self._read_index_known(state.read_id, state.index)
        for read_id in ready.failed_reads:
            self._core_read_failed(read_id)
        if ready.dropped:
            deadline = self._clock.seconds() + self.settings.request_timeout
            if self._forwarded:
                for c in ready.dropped:          # held again here: not twice by _forward_again
                    rid = self._resendable.get(c)
                    if rid is not None:
                        self._forwarded.pop(rid, None)
            self._held.extendleft((deadline, c, None) for c in reversed(ready.dropped))
        if ready.leader is not None:
            self._forward_again()                # older than what was dropped: goes first
        if ready.leader is not None or ready.dropped:
            self._route_held()
            self._retry_reads()
        self._kick_apply()
        if ready.want_snapshot:
            self._offer_snapshot()
        if ready.rebuilt:
            self._rebuilding = False
            if self.transport is not None:
                self.transport.rebuilding = False
            log.info("node {node} is rebuilt and votes again", node=self.node_id)
            if self._on_rebuilt is not None:
                self._on_rebuilt()

    def _persist(self, records, token):
        self._unfolded.extend(records)
        store = self.store
        last = None
        for record in records:
            if last is not None:
                # The store fails every queued append with the first error;
                # the last one's errback reports it.
                last.addErrback(lambda f: None)
            last = store.append(M.encode(record))
        last.addCallbacks(self._persisted, self._storage_failed, callbackArgs=(token,))

    def _persisted(self, _, token):
        if self._live:
            self.replica.persisted(token)
            self._drive()

    def _storage_failed(self, failure):
        self._fatal(f"the Paxos log cannot be written: {failure.getErrorMessage()}", failure.value)

    def _send(self, to, msg):
        if self.transport is None or self._stopped or self.failed is not None:
            return False
        if isinstance(msg, M.SnapshotChunk) and hasattr(msg.data, "read"):
            # A chunk of a snapshot served from its file: read beside the worker, then sent.
            d = self._worker.call_aside(msg.data.read)
            d.addCallback(lambda data: self._send(to, dataclasses.replace(msg, data=data)))
            d.addErrback(self._background_failed, "reading a snapshot chunk for a peer")
            return True
        frame = M.encode(msg)
        if len(frame) > MAX_FRAME_BYTES:
            log.error("dropped a {kind} of {size} bytes to node {peer}: over the frame limit",
                      kind=type(msg).__name__, size=len(frame), peer=to)
            return False
        return self.transport.send(to, frame)

    # -- routing commands to the leader -------------------------------------------

    def _route_held(self):
        """Propose held commands when leading, else forward them to the leader."""
        held = self._held
        if not held or not self._live:
            return
        now = self._clock.seconds()
        while held and held[0][0] < now:
            held.popleft()               # its submitter (if here) has timed out
        replica = self.replica
        if replica.is_leader:
            while held:
                try:
                    replica.propose(held[0][1])
                except NotLeader:
                    return               # transferring: wait for the new leader
                deadline, data, _ = held.popleft()
                if self._resendable:
                    self._mark_sent(data, deadline)
            return
        leader = replica.leader_id
        if leader is None or leader == self.node_id:
            return
        bounced = (leader, replica.ballot)
        kept = []                        # came from that leader under this ballot: wait
        while held:
            batch, size = [], 0
            while held and len(batch) < FORWARD_BATCH_COMMANDS:
                entry = held[0]
                if entry[2] == bounced:
                    kept.append(held.popleft())
                    continue
                if batch and size + len(entry[1]) > FORWARD_BATCH_BYTES:
                    break
                batch.append(held.popleft())
                size += len(entry[1])
            if not batch:
                break
            if not self._send(leader, M.ForwardProposals(self.node_id, tuple(e[1] for e in batch))):
                held.extendleft(reversed(batch))   # not connected: keep them for later
                break
            if self._resendable:
                for deadline, data, _ in batch:
                    self._mark_sent(data, deadline)
        held.extendleft(reversed(kept))

    def _mark_sent(self, data, deadline):
        """Our own resendable command went to a leader (forwarded, or proposed by us):
        sent again if the leader changes before it is applied (``_forward_again``)."""
        rid = self._resendable.get(data)
        if rid is not None:
            self._forwarded[rid] = (deadline, self.replica.leader_state())

    def _submit_done(self, rid):
        """The pending submit ``rid`` (or None), no longer pending."""
        request = self._pending.pop(rid, None)
        if request is not None and request.resend is not None:
            del self._resendable[request.resend]
            self._forwarded.pop(rid, None)
        return request

    def _forward_again(self, link_lost=False):
        """The leader changed: what we forwarded to the last one (or proposed
        while we led) and it did not commit (it died, paused or lost its lease
        with our commands unaccepted) goes to the next one now, instead of
        waiting out ``request_timeout``; and, with ``link_lost``, what a link
        to the leader that dropped may have lost on its way. Only
        commands the state answers once however often they commit are sent
        again; a copy the old leader did commit is then answered from the
        state's dedup table, and pushed to no one twice."""
        if not self._forwarded:
            return
        now = self.replica.leader_state()
        again = [(rid, deadline) for rid, (deadline, sent_to) in self._forwarded.items()
                 if link_lost or sent_to != now]
        for rid, _ in again:
            del self._forwarded[rid]
        self._held.extendleft((deadline, self._pending[rid].resend, None)
                              for rid, deadline in reversed(again))   # before later ones, in order

    def _submit_timed_out(self, rid):
        request = self._submit_done(rid)
        if request is not None:
            request.deferred.errback(Unavailable(
                f"not committed within {self.settings.request_timeout:g} s"))

    # -- reads ----------------------------------------------------------------------

    def _ask_read(self, read_id):
        request = self._reads.get(read_id)
        if request is None or request.index is not None or not self._live:
            return
        replica = self.replica
        if replica.is_leader:
            try:
                replica.read(("local", read_id), lease=True, now=self._clock.seconds())
            except NotLeader:
                return
            request.asked = self.node_id
        elif replica.leader_id is not None and replica.leader_id != self.node_id:
            if self._send(replica.leader_id, M.ReadIndexRequest(self.node_id, read_id)):
                request.asked = replica.leader_id
            else:
                return
        else:
            return
        request.asked_at = self._clock.seconds()

    def _retry_reads(self):
        """Ask again for reads nobody was asked for, or whose answer is overdue."""
        if not self._reads:
            return
        overdue = self._clock.seconds() - self.settings.election_timeout
        for read_id, request in list(self._reads.items()):
            if request.index is None and (request.asked is None or request.asked_at < overdue):
                request.asked = None
                self._ask_read(read_id)

    def _remote_read(self, msg):
        try:
            self.replica.read(("peer", msg.sender, msg.read_id), lease=True,
                              now=self._clock.seconds())
        except NotLeader:
            self._send(msg.sender, M.ReadIndexReply(self.node_id, msg.read_id, 0, False))

    def _read_reply(self, msg):
        request = self._reads.get(msg.read_id)
        if request is None or request.index is not None or request.asked != msg.sender:
            return
        if msg.granted:
            self._read_index_known(("local", msg.read_id), msg.index)
        else:
            request.asked = None         # asked again at the next tick

    def _read_index_known(self, read_id, index):
        if read_id[0] == "peer":
            _, peer, remote_id = read_id
            self._send(peer, M.ReadIndexReply(self.node_id, remote_id, index, True))
            return
        request = self._reads.get(read_id[1])
        if request is None or request.index is not None:
            return
        request.index = index
        heapq.heappush(self._read_waiting, (index, read_id[1]))
        self._release_reads()

    def _core_read_failed(self, read_id):
        if read_id[0] == "peer":
            self._send(read_id[1], M.ReadIndexReply(self.node_id, read_id[2], 0, False))
        else:
            request = self._reads.get(read_id[1])
            if request is not None:
                request.asked = None

    def _release_reads(self):
        waiting = self._read_waiting
        applied = self.applied_index if self.applied_index is not None else -1
        while waiting and waiting[0][0] <= applied:
            _, read_id = heapq.heappop(waiting)
            request = self._reads.pop(read_id, None)
            if request is not None:
                request.timer.cancel()
                request.deferred.callback(None)

    def _read_timed_out(self, read_id):
        request = self._reads.pop(read_id, None)
        if request is not None:
            request.deferred.errback(Unavailable(
                f"no read index from a quorum within {self.settings.request_timeout:g} s"))

    # -- applying ---------------------------------------------------------------------

    def _kick_apply(self):
        if self._applying or not self._apply_queue or self.failed is not None:
            return
        self._applying = True
        item = self._apply_queue.popleft()
        if item[0] == "part":
            _, index, offset, data = item
            if offset == 0:
                log.info("node {node} receiving a snapshot at index {index}", node=self.node_id,
                         index=index)
            d = self._worker.call("receive_snapshot_part", offset, data)
            d.addCallback(self._part_stored)
        elif item[0] == "restore":
            _, index = item
            log.info("node {node} restoring the state from a snapshot at index {index}",
                     node=self.node_id, index=index)
            d = self._worker.call("restore_received", index)
            d.addCallback(self._restored, index)
        else:
            entries = list(item[1])
            queue = self._apply_queue
            while queue and queue[0][0] == "apply" and len(entries) < APPLY_BATCH_SLOTS:
                entries.extend(queue.popleft()[1])
            decoded = [(slot, [_decode_command(c) for c in cmds]) for slot, cmds in entries]
            d = self._worker.call(
                "apply_entries", [(slot, [c for c, _ in cmds]) for slot, cmds in decoded],
                grouped=True)
            d.addCallback(self._applied, decoded)
        d.addErrback(self._apply_failed)
        d.addBoth(self._apply_done)

    def _schedule_idle_commit(self):
        """Applies join the state's group transaction (L{KVStore.group}), which
        commits by size or age as applies come; once they stop, commit it."""
        if self._commit_call is None or not self._commit_call.active():
            self._commit_call = self._reactor.callLater(IDLE_COMMIT_SECONDS, self._commit_idle)

    def _commit_idle(self):
        self._commit_call = None
        if self._applying or self.failed is not None or self._stopped:
            return                   # a later apply schedules it again
        d = self._worker.call("commit_applied")
        d.addErrback(lambda failure: failure.trap(StateWorkerStopped))
        d.addErrback(self._apply_failed)

    def _applied(self, results, decoded):
        for (slot, commands), responses in zip(decoded, results):
            if slot > self.applied_index:
                self.applied_index = slot
            if responses is None:
                continue             # already in the state (replay after a restart)
            for (command, rid), response in zip(commands, responses):
                if isinstance(command, dict):
                    self._notify(command, response)
                if rid is not None:
                    request = self._submit_done(rid)
                    if request is not None:
                        request.timer.cancel()
                        request.deferred.callback(response)

    def _part_stored(self, _):
        # The core asks for more of the snapshot only as its parts reach the disk.
        self.replica.snapshot_part_stored()
        self._drive()

    def _restored(self, _, index):
        self.applied_index = max(self.applied_index, index)

    def _notify(self, command, response):
        for observer in self._observers:
            try:
                observer(command, response)
            except Exception:
                log.failure("log observer failed on {op}", op=command.get("op"))

    def _apply_failed(self, failure):
        self._fatal(f"the state could not apply the log: {failure.getErrorMessage()}",
                    failure.value)

    def _apply_done(self, _):
        self._applying = False
        if self.failed is None:
            self._release_reads()
            self._maybe_compact()
            self._note_state_size()
            self._kick_apply()
            if not self._applying and not self._stopped:
                self._schedule_idle_commit()
        if not self._applying:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    # -- compaction and snapshots -------------------------------------------------------

    def _maybe_compact(self):
        if self._compacting or not self._live or self.store is None:
            return
        applied = self.applied_index
        if applied > self._decided_upto or applied <= self.replica.snapshot_index:
            return
        since = applied - self._compacted
        if not (self._need_compaction or since >= self.settings.snapshot_interval
                or (since > 0 and self.store.size_bytes > self.settings.compact_log_bytes)):
            return
        self._compacting = True
        # The state commits without fsyncs (the log is the durable record):
        # make it durable before the log forgets what it covers. The sync
        # answers with the index it made durable.
        d = self._worker.call("sync")
        d.addCallback(self._compact)
        d.addErrback(self._background_failed, "compacting the log")
        d.addBoth(self._compaction_done)

    def _observe_fsync(self, seconds):
        if self.fsync_observer is not None:
            self.fsync_observer(seconds)

    def _background_failed(self, failure, what):
        if failure.check(StateWorkerStopped):
            return None              # the node is stopping: nothing to retry, nothing wrong
        count = self._background_failures.happened(what)
        if count:
            log.failure("{what} failed ({count} time(s) since the last report); will retry",
                        failure, what=what, count=count)

    def _compaction_done(self, _):
        self._compacting = False
        waiters, self._compaction_waiters = self._compaction_waiters, []
        for waiter in waiters:
            waiter.callback(self.replica.snapshot_index)

    def snapshot_now(self):
        """Compact at the applied index now, for operators (``paxchat-admin snapshot``).

        Fires with the index the log now starts after; at once when nothing
        was applied since the last compaction.
        """
        if not self._live:
            return defer.fail(Unavailable(f"node {self.node_id} is not serving"))
        if not self._compacting:
            forced, self._need_compaction = self._need_compaction, True
            self._maybe_compact()
            if not self._compacting:
                self._need_compaction = forced
                return defer.succeed(self.replica.snapshot_index)
        waiter = defer.Deferred()
        self._compaction_waiters.append(waiter)
        return waiter

    def _compact(self, index):
        if not self._live or index > self._decided_upto or index <= self.replica.snapshot_index:
            return
        self.replica.compact(index)
        self._compacted = index
        self._need_compaction = False
        self._drive()                    # persists the CompactRecord first
        # The state has applied ``index`` durably (synced above), so the log
        # may forget everything up to it.
        self._durable = DurableState.from_records(self._unfolded, base=self._durable)
        self._unfolded = []
        records = [M.encode(r) for r in self._durable.to_records()]
        self.store.rewrite(records).addErrback(self._storage_failed)
        log.info("node {node} compacted its log at index {index}", node=self.node_id, index=index)

    def _offer_snapshot(self):
        """A peer needs slots the log no longer holds, or misses so much that a
        snapshot costs it less: serialize the state for it."""
        if self._offering or not self._live:
            return
        self._offering = True
        worker = self._worker
        d = worker.call("snapshot")
        # Reading the whole state takes a while: beside the worker, so applies go on.
        # Served from its file (kv.SnapshotFile): a copy in memory would weigh the state.
        d.addCallback(lambda taken: worker.call_aside(taken[1].as_file).addCallback(
            lambda data: (taken[0], data)))
        d.addCallback(self._offer)
        d.addErrback(self._background_failed, "making a snapshot for a peer")
        d.addBoth(self._offer_done)

    def _note_state_size(self):
        """Keep the replica told what a snapshot would weigh (at most every
        ``STATE_SIZE_SECONDS``): it sends one to a peer that misses a log
        of a good part of that size, as installing it costs less."""
        now = self._clock.seconds()
        if self._sizing or not self._live or now < self._size_due:
            return
        self._sizing = True
        self._size_due = now + STATE_SIZE_SECONDS
        d = self._worker.call("snapshot_bytes")
        d.addCallback(self._sized)
        d.addErrback(self._background_failed, "measuring the state")
        d.addBoth(self._sizing_done)

    def _sized(self, size):
        if self._live:
            self.replica.note_state_bytes(size)

    def _sizing_done(self, _):
        self._sizing = False

    def _offer(self, taken):
        index, data = taken
        if self._live and self.replica.offer_snapshot(index, data):
            log.info("node {node} made a snapshot at index {index} ({size} bytes) for a peer"
                     " far behind", node=self.node_id, index=index, size=len(data))
            self._drive()                # peers waiting for it get their first chunk now

    def _offer_done(self, _):
        self._offering = False
