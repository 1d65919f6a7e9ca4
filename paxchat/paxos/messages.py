"""Peer messages and durable records of the Multi-Paxos core, with their codec.

Every message a replica sends to another, and every record it asks its store
to persist, is a small frozen dataclass here. ``encode(obj) -> bytes`` and
``decode(data) -> obj`` turn them into a compact binary form (one tag byte,
then fixed-width big-endian fields) and back. ``decode`` checks everything:
unknown tag, truncation, trailing bytes, sizes above the bounds below, and
raises ``DecodeError`` with a message that says what was wrong; it never
returns a half-built object.

A slot's *value* is a batch: a tuple of commands, each opaque ``bytes``. The
empty tuple is the no-op a new leader writes into a slot nobody filled.
"""

import struct
from dataclasses import dataclass

__all__ = [
    "Ballot", "ZERO_BALLOT", "Value", "AcceptedEntry", "DecodeError",
    "PreVote", "PreVoteReply", "Prepare", "Promise", "Accept", "Accepted",
    "Reject", "Heartbeat", "HeartbeatAck", "CatchupRequest", "Learn",
    "SnapshotChunk", "TimeoutNow", "RebuildQuery", "RebuildReport", "ForwardProposals", "ReadIndexRequest", "ReadIndexReply",
    "PromiseRecord", "AcceptRecord", "CompactRecord",
    "MESSAGE_TYPES", "RECORD_TYPES", "encode", "decode",
    "MAX_COMMAND_BYTES", "MAX_BATCH_COMMANDS", "MAX_SLOTS_PER_MESSAGE",
    "MAX_CHUNK_BYTES", "MAX_ENCODED_BYTES",
]

# Bounds enforced on decode (a peer can never make us allocate more).
MAX_COMMAND_BYTES = 1 << 18          # one command (paxchat's are under 70 KiB)
MAX_BATCH_COMMANDS = 1 << 16         # commands in one slot
MAX_SLOTS_PER_MESSAGE = 1 << 16      # slots (or accepted entries) in one message
MAX_CHUNK_BYTES = 1 << 22            # one snapshot chunk
MAX_ENCODED_BYTES = 1 << 26          # a whole encoded message or record
_MAX_U64 = (1 << 63) - 1             # slots, rounds, offsets stay below 2**63
_MAX_NODE = (1 << 32) - 1

Value = tuple  # tuple[bytes, ...]: the batch of commands decided in one slot


class DecodeError(ValueError):
    """The bytes are not a well-formed message or record."""


@dataclass(frozen=True, order=True, slots=True)
class Ballot:
    """A proposal number: ``(round, node)``, ordered by round then node id.

    Round 0 is never used by a proposer, so ``ZERO_BALLOT`` is below all.
    """
    round: int
    node: int


ZERO_BALLOT = Ballot(0, 0)


@dataclass(frozen=True, slots=True)
class AcceptedEntry:
    """What an acceptor reports in a promise: it accepted ``value`` at ``ballot`` for ``slot``."""
    slot: int
    ballot: Ballot
    value: Value


# ---- peer messages ---------------------------------------------------------
# Every message carries ``sender``: the node id of the replica that sent it.

@dataclass(frozen=True, slots=True)
class PreVote:
    """"Would you support me if I ran with ``ballot``?" Changes no state (stickiness)."""
    sender: int
    ballot: Ballot
    commit: int


@dataclass(frozen=True, slots=True)
class PreVoteReply:
    sender: int
    ballot: Ballot
    granted: bool


@dataclass(frozen=True, slots=True)
class Prepare:
    """Phase 1a for every slot >= ``from_slot`` at once.

    ``transfer_from``: the ballot of the leader that asked for this election
    (leadership transfer), else ``ZERO_BALLOT``. Only an acceptor that follows
    exactly that leader lets it through its lease (see core.py)."""
    sender: int
    ballot: Ballot
    from_slot: int
    transfer_from: Ballot


@dataclass(frozen=True, slots=True)
class Promise:
    """Phase 1b. Slots <= ``chosen_upto`` are chosen and known to the sender;
    ``accepted`` lists what it accepted above that (and >= from_slot)."""
    sender: int
    ballot: Ballot
    chosen_upto: int
    accepted: tuple  # tuple[AcceptedEntry, ...]


@dataclass(frozen=True, slots=True)
class Accept:
    """Phase 2a for slots ``first_slot .. first_slot+len(values)-1``; ``commit``
    is the leader's chosen prefix (slots <= commit are chosen)."""
    sender: int
    ballot: Ballot
    first_slot: int
    values: tuple  # tuple[Value, ...]
    commit: int


@dataclass(frozen=True, slots=True)
class Accepted:
    """Phase 2b: the sender accepted (durably) slots ``first_slot .. first_slot+count-1`` at ``ballot``."""
    sender: int
    ballot: Ballot
    first_slot: int
    count: int


@dataclass(frozen=True, slots=True)
class Reject:
    """A Prepare or Accept at ``ballot`` was refused: the sender promised ``promised``."""
    sender: int
    ballot: Ballot
    promised: Ballot


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The leader is alive at ``ballot``; ``seq`` numbers rounds for read-index and lease."""
    sender: int
    ballot: Ballot
    commit: int
    seq: int


@dataclass(frozen=True, slots=True)
class HeartbeatAck:
    """The sender has promised nothing above ``ballot``; ``commit`` is its chosen prefix."""
    sender: int
    ballot: Ballot
    seq: int
    commit: int


@dataclass(frozen=True, slots=True)
class CatchupRequest:
    """Send me chosen values from ``from_slot``; or, if you compacted past it, your
    snapshot (``snapshot_index``/``snapshot_offset``: the transfer I am in the middle of, or 0/0)."""
    sender: int
    from_slot: int
    snapshot_index: int
    snapshot_offset: int


@dataclass(frozen=True, slots=True)
class Learn:
    """Chosen values of slots ``first_slot ..`` (a bounded run).

    An empty run answers a catch-up request whose answer is being prepared
    (a snapshot): the asker keeps asking this peer rather than another."""
    sender: int
    first_slot: int
    values: tuple  # tuple[Value, ...]


@dataclass(frozen=True, slots=True)
class SnapshotChunk:
    """Bytes ``offset .. offset+len(data)`` of the snapshot at ``index`` (``total`` bytes long)."""
    sender: int
    index: int
    offset: int
    total: int
    data: bytes


@dataclass(frozen=True, slots=True)
class TimeoutNow:
    """Leadership transfer: the leader at ``ballot`` asks the receiver to run now, skipping pre-vote."""
    sender: int
    ballot: Ballot


@dataclass(frozen=True, slots=True)
class RebuildQuery:
    """A node rebuilding after its disk was lost asks what the receiver has
    promised and accepted (core.py, "Rebuilding a node"). Changes nothing."""
    sender: int


@dataclass(frozen=True, slots=True)
class RebuildReport:
    """Answer to ``RebuildQuery``: the sender's promise, its chosen prefix, and
    what it accepted above that. ``rebuilding``: the sender is itself
    rebuilding, so its answer cannot vouch for anything."""
    sender: int
    promised: Ballot
    chosen_upto: int
    accepted: tuple  # tuple[AcceptedEntry, ...]
    rebuilding: bool


# ---- node glue messages -----------------------------------------------------
# The replica core never sees these: the node handles them itself.

@dataclass(frozen=True, slots=True)
class ForwardProposals:
    """A follower hands commands its clients submitted to the node it believes leads.

    The receiver proposes them as its own; they were never given a slot, so a
    receiver that does not lead may pass them on."""
    sender: int
    commands: Value


@dataclass(frozen=True, slots=True)
class ReadIndexRequest:
    """A follower asks the leader for a read index (linearizable read)."""
    sender: int
    read_id: int


@dataclass(frozen=True, slots=True)
class ReadIndexReply:
    """Answer to ``ReadIndexRequest`` ``read_id``: once the asker has applied every
    slot ``<= index`` it may serve the read; ``granted`` False: ask again elsewhere."""
    sender: int
    read_id: int
    index: int
    granted: bool


# ---- durable records --------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PromiseRecord:
    """The acceptor promised ``ballot`` (never goes back)."""
    ballot: Ballot


@dataclass(frozen=True, slots=True)
class AcceptRecord:
    """The acceptor accepted ``values`` for slots from ``first_slot`` at ``ballot``
    (implies a promise of ``ballot``)."""
    ballot: Ballot
    first_slot: int
    values: tuple  # tuple[Value, ...]


@dataclass(frozen=True, slots=True)
class CompactRecord:
    """Slots <= ``index`` are covered by the application's snapshot; older records may be dropped."""
    index: int


# ---- codec ------------------------------------------------------------------
# Field kinds: u64 (slot, round, offset...), node (u32), bool, ballot, chunk (bytes),
# value (batch), values (tuple of batches), entries (AcceptedEntry tuple).

_SCHEMA = {
    PreVote: (1, (("sender", "node"), ("ballot", "ballot"), ("commit", "u64"))),
    PreVoteReply: (2, (("sender", "node"), ("ballot", "ballot"), ("granted", "bool"))),
    Prepare: (3, (("sender", "node"), ("ballot", "ballot"), ("from_slot", "u64"), ("transfer_from", "ballot"))),
    Promise: (4, (("sender", "node"), ("ballot", "ballot"), ("chosen_upto", "u64"), ("accepted", "entries"))),
    Accept: (5, (("sender", "node"), ("ballot", "ballot"), ("first_slot", "u64"), ("values", "values"),
                 ("commit", "u64"))),
    Accepted: (6, (("sender", "node"), ("ballot", "ballot"), ("first_slot", "u64"), ("count", "u64"))),
    Reject: (7, (("sender", "node"), ("ballot", "ballot"), ("promised", "ballot"))),
    Heartbeat: (8, (("sender", "node"), ("ballot", "ballot"), ("commit", "u64"), ("seq", "u64"))),
    HeartbeatAck: (9, (("sender", "node"), ("ballot", "ballot"), ("seq", "u64"), ("commit", "u64"))),
    CatchupRequest: (10, (("sender", "node"), ("from_slot", "u64"), ("snapshot_index", "u64"),
                          ("snapshot_offset", "u64"))),
    Learn: (11, (("sender", "node"), ("first_slot", "u64"), ("values", "values"))),
    SnapshotChunk: (12, (("sender", "node"), ("index", "u64"), ("offset", "u64"), ("total", "u64"),
                         ("data", "chunk"))),
    TimeoutNow: (13, (("sender", "node"), ("ballot", "ballot"))),
    RebuildQuery: (17, (("sender", "node"),)),
    RebuildReport: (18, (("sender", "node"), ("promised", "ballot"), ("chosen_upto", "u64"),
                         ("accepted", "entries"), ("rebuilding", "bool"))),
    ForwardProposals: (14, (("sender", "node"), ("commands", "value"))),
    ReadIndexRequest: (15, (("sender", "node"), ("read_id", "u64"))),
    ReadIndexReply: (16, (("sender", "node"), ("read_id", "u64"), ("index", "u64"), ("granted", "bool"))),
    PromiseRecord: (64, (("ballot", "ballot"),)),
    AcceptRecord: (65, (("ballot", "ballot"), ("first_slot", "u64"), ("values", "values"))),
    CompactRecord: (66, (("index", "u64"),)),
}
_BY_TAG = {tag: (cls, fields) for cls, (tag, fields) in _SCHEMA.items()}
MESSAGE_TYPES = tuple(c for c, (t, _) in _SCHEMA.items() if t < 64)
RECORD_TYPES = tuple(c for c, (t, _) in _SCHEMA.items() if t >= 64)

_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_BALLOT = struct.Struct(">QI")


def _check_u64(v, what):
    if type(v) is not int or not 0 <= v <= _MAX_U64:
        raise ValueError(f"{what} must be an int in [0, 2**63), got {v!r}")
    return v


def _check_node(v, what):
    if type(v) is not int or not 0 <= v <= _MAX_NODE:
        raise ValueError(f"{what} must be a node id in [0, 2**32), got {v!r}")
    return v


def _enc_value(value, out):
    if not isinstance(value, tuple) or len(value) > MAX_BATCH_COMMANDS:
        raise ValueError("a value must be a tuple of at most %d commands" % MAX_BATCH_COMMANDS)
    out.append(_U32.pack(len(value)))
    for cmd in value:
        if not isinstance(cmd, bytes) or len(cmd) > MAX_COMMAND_BYTES:
            raise ValueError("a command must be bytes of at most %d bytes" % MAX_COMMAND_BYTES)
        out.append(_U32.pack(len(cmd)))
        out.append(cmd)


def _enc_field(kind, v, name, out):
    if kind == "u64":
        out.append(_U64.pack(_check_u64(v, name)))
    elif kind == "node":
        out.append(_U32.pack(_check_node(v, name)))
    elif kind == "bool":
        if type(v) is not bool:
            raise ValueError(f"{name} must be a bool")
        out.append(b"\x01" if v else b"\x00")
    elif kind == "ballot":
        if type(v) is not Ballot:
            raise ValueError(f"{name} must be a Ballot")
        out.append(_BALLOT.pack(_check_u64(v.round, name + ".round"), _check_node(v.node, name + ".node")))
    elif kind == "chunk":
        if not isinstance(v, bytes) or len(v) > MAX_CHUNK_BYTES:
            raise ValueError(f"{name} must be bytes of at most {MAX_CHUNK_BYTES}")
        out.append(_U32.pack(len(v)))
        out.append(v)
    elif kind == "value":
        _enc_value(v, out)
    elif kind == "values":
        if not isinstance(v, tuple) or len(v) > MAX_SLOTS_PER_MESSAGE:
            raise ValueError(f"{name} must be a tuple of at most {MAX_SLOTS_PER_MESSAGE} values")
        out.append(_U32.pack(len(v)))
        for value in v:
            _enc_value(value, out)
    elif kind == "entries":
        if not isinstance(v, tuple) or len(v) > MAX_SLOTS_PER_MESSAGE:
            raise ValueError(f"{name} must be a tuple of at most {MAX_SLOTS_PER_MESSAGE} entries")
        out.append(_U32.pack(len(v)))
        for e in v:
            if type(e) is not AcceptedEntry:
                raise ValueError(f"{name} must hold AcceptedEntry objects")
            out.append(_U64.pack(_check_u64(e.slot, "slot")))
            _enc_field("ballot", e.ballot, "entry ballot", out)
            _enc_value(e.value, out)
    else:  # pragma: no cover - schema bug
        raise AssertionError(kind)


def encode(obj):
    """Encode a message or record to bytes; ``ValueError`` if a field is out of range."""
    try:
        tag, fields = _SCHEMA[type(obj)]
    except KeyError:
        raise ValueError(f"not a paxos message or record: {type(obj).__name__}") from None
    out = [bytes((tag,))]
    for name, kind in fields:
        _enc_field(kind, getattr(obj, name), name, out)
    return b"".join(out)


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf):
        self.buf = buf
        self.pos = 0

    def take(self, n, what):
        end = self.pos + n
        if end > len(self.buf):
            raise DecodeError(f"truncated: {what} needs {n} bytes at offset {self.pos}, "
                              f"only {len(self.buf) - self.pos} left")
        b = self.buf[self.pos:end]
        self.pos = end
        return b

    def u64(self, what):
        v = _U64.unpack(self.take(8, what))[0]
        if v > _MAX_U64:
            raise DecodeError(f"{what} out of range: {v}")
        return v

    def u32(self, what):
        return _U32.unpack(self.take(4, what))[0]

    def count(self, limit, what):
        n = self.u32(what)
        if n > limit:
            raise DecodeError(f"{what}: {n} exceeds the limit of {limit}")
        return n

    def ballot(self, what):
        r, n = _BALLOT.unpack(self.take(12, what))
        if r > _MAX_U64:
            raise DecodeError(f"{what} round out of range: {r}")
        return Ballot(r, n)

    def value(self):
        n = self.count(MAX_BATCH_COMMANDS, "commands in a value")
        cmds = []
        for _ in range(n):
            size = self.count(MAX_COMMAND_BYTES, "command length")
            cmds.append(bytes(self.take(size, "command")))
        return tuple(cmds)


def _dec_field(kind, r, name):
    if kind == "u64":
        return r.u64(name)
    if kind == "node":
        return r.u32(name)
    if kind == "bool":
        b = r.take(1, name)[0]
        if b > 1:
            raise DecodeError(f"{name}: bad boolean byte {b}")
        return b == 1
    if kind == "ballot":
        return r.ballot(name)
    if kind == "chunk":
        size = r.count(MAX_CHUNK_BYTES, name + " length")
        return bytes(r.take(size, name))
    if kind == "value":
        return r.value()
    if kind == "values":
        n = r.count(MAX_SLOTS_PER_MESSAGE, name)
        return tuple(r.value() for _ in range(n))
    if kind == "entries":
        n = r.count(MAX_SLOTS_PER_MESSAGE, name)
        out = []
        for _ in range(n):
            slot = r.u64("entry slot")
            ballot = r.ballot("entry ballot")
            out.append(AcceptedEntry(slot, ballot, r.value()))
        return tuple(out)
    raise AssertionError(kind)  # pragma: no cover


def decode(data):
    """Decode bytes made by ``encode``; ``DecodeError`` on anything malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise DecodeError("empty input")
    if len(data) > MAX_ENCODED_BYTES:
        raise DecodeError(f"input of {len(data)} bytes exceeds {MAX_ENCODED_BYTES}")
    buf = memoryview(data)
    try:
        cls, fields = _BY_TAG[buf[0]]
    except KeyError:
        raise DecodeError(f"unknown message tag {buf[0]}") from None
    r = _Reader(buf)
    r.pos = 1
    args = [_dec_field(kind, r, f"{cls.__name__}.{name}") for name, kind in fields]
    if r.pos != len(buf):
        raise DecodeError(f"{len(buf) - r.pos} trailing bytes after {cls.__name__}")
    return cls(*args)
