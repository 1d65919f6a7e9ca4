"""The Multi-Paxos replica as a pure state machine (no clock, no I/O).

API stub: see docs/internals.md "Paxos core API".
"""

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from .messages import Ballot, ZERO_BALLOT, PromiseRecord, AcceptRecord, CompactRecord


class NotLeader(Exception):
    """propose()/read()/transfer_leadership() on a replica that does not lead."""

    def __init__(self, leader_hint):
        super().__init__(f"not the leader (leader hint: {leader_hint})")
        self.leader_hint = leader_hint


@dataclass(frozen=True)
class Config:
    heartbeat_interval: float = 0.05
    election_timeout: float = 0.5
    max_clock_drift: float = 0.05
    window: int = 64
    max_batch_commands: int = 4096
    max_batch_bytes: int = 1 << 20
    catchup_slots: int = 256
    snapshot_chunk_bytes: int = 1 << 20


@dataclass(frozen=True)
class DurableState:
    promised: Ballot = ZERO_BALLOT
    accepted: Mapping = field(default_factory=dict)
    snapshot_index: int = 0

    @classmethod
    def from_records(cls, records, base=None):
        raise NotImplementedError


@dataclass(frozen=True)
class ReadState:
    read_id: object
    index: int


@dataclass(frozen=True)
class LeaderChange:
    leader: Optional[int]
    ballot: Ballot


@dataclass(frozen=True)
class Ready:
    messages: tuple = ()
    records: tuple = ()
    token: int = 0
    snapshot: Optional[tuple] = None
    decided: tuple = ()
    leader: Optional[LeaderChange] = None
    reads: tuple = ()
    failed_reads: tuple = ()
    dropped: tuple = ()


class Replica:
    def __init__(self, node_id, members, *, now=0.0, config=Config(), jitter=None, seed=0, durable=None):
        raise NotImplementedError

    def tick(self, now): ...
    def receive(self, msg, now=None): ...
    def propose(self, command): ...
    def read(self, read_id, *, lease=False): ...
    def persisted(self, token): ...
    def compact(self, index, data): ...
    def transfer_leadership(self, target): ...
    def ready(self): ...
    def has_ready(self): ...
