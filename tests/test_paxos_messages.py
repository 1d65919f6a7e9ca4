"""The peer message and record codec: exact round trips, clear rejection of bad bytes."""

import struct

import pytest
from hypothesis import given, settings, strategies as st

from paxchat.paxos import messages as M

u64 = st.integers(0, (1 << 63) - 1)
node = st.integers(0, (1 << 32) - 1)
ballots = st.builds(M.Ballot, u64, node)
commands = st.binary(max_size=40)
values = st.lists(commands, max_size=4).map(tuple)
value_lists = st.lists(values, max_size=4).map(tuple)
entries = st.lists(st.builds(M.AcceptedEntry, u64, ballots, values), max_size=4).map(tuple)

STRATEGIES = {
    M.PreVote: st.builds(M.PreVote, node, ballots, u64),
    M.PreVoteReply: st.builds(M.PreVoteReply, node, ballots, st.booleans()),
    M.Prepare: st.builds(M.Prepare, node, ballots, u64, ballots),
    M.Promise: st.builds(M.Promise, node, ballots, u64, entries),
    M.Accept: st.builds(M.Accept, node, ballots, u64, value_lists, u64),
    M.Accepted: st.builds(M.Accepted, node, ballots, u64, u64),
    M.Reject: st.builds(M.Reject, node, ballots, ballots),
    M.Heartbeat: st.builds(M.Heartbeat, node, ballots, u64, u64),
    M.HeartbeatAck: st.builds(M.HeartbeatAck, node, ballots, u64, u64),
    M.CatchupRequest: st.builds(M.CatchupRequest, node, u64, u64, u64),
    M.Learn: st.builds(M.Learn, node, u64, value_lists),
    M.SnapshotChunk: st.builds(M.SnapshotChunk, node, u64, u64, u64, st.binary(max_size=64)),
    M.TimeoutNow: st.builds(M.TimeoutNow, node, ballots),
    M.RebuildQuery: st.builds(M.RebuildQuery, node),
    M.RebuildReport: st.builds(M.RebuildReport, node, ballots, u64, entries, st.booleans()),
    M.ForwardProposals: st.builds(M.ForwardProposals, node, values),
    M.ReadIndexRequest: st.builds(M.ReadIndexRequest, node, u64),
    M.ReadIndexReply: st.builds(M.ReadIndexReply, node, u64, u64, st.booleans()),
    M.PromiseRecord: st.builds(M.PromiseRecord, ballots),
    M.AcceptRecord: st.builds(M.AcceptRecord, ballots, u64, value_lists),
    M.CompactRecord: st.builds(M.CompactRecord, u64),
}
any_obj = st.one_of(*STRATEGIES.values())


def test_every_type_has_a_strategy():
    assert set(STRATEGIES) == set(M.MESSAGE_TYPES) | set(M.RECORD_TYPES)


@given(any_obj)
def test_round_trip(obj):
    data = M.encode(obj)
    assert M.decode(data) == obj
    assert M.decode(bytearray(data)) == obj


@given(any_obj, st.data())
def test_truncation_is_rejected(obj, data):
    b = M.encode(obj)
    cut = data.draw(st.integers(0, len(b) - 1))
    with pytest.raises(M.DecodeError):
        M.decode(b[:cut])


@given(any_obj, st.binary(min_size=1, max_size=8))
def test_trailing_bytes_are_rejected(obj, extra):
    with pytest.raises(M.DecodeError, match="trailing"):
        M.decode(M.encode(obj) + extra)


@given(any_obj, st.data())
def test_mutated_bytes_decode_canonically_or_fail_cleanly(obj, data):
    b = bytearray(M.encode(obj))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(b) - 1))
        b[i] = data.draw(st.integers(0, 255))
    try:
        out = M.decode(bytes(b))
    except M.DecodeError:
        return
    # Whatever decodes is a well-formed object with one encoding.
    assert M.encode(out) == bytes(b)


@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_decoder(b):
    try:
        out = M.decode(b)
    except M.DecodeError:
        return
    assert M.encode(out) == b


def test_clear_errors():
    with pytest.raises(M.DecodeError, match="empty"):
        M.decode(b"")
    with pytest.raises(M.DecodeError, match="unknown message tag 200"):
        M.decode(b"\xc8abc")
    with pytest.raises(M.DecodeError, match="expected bytes"):
        M.decode("text")
    with pytest.raises(M.DecodeError, match="bad boolean"):
        M.decode(M.encode(M.PreVoteReply(1, M.Ballot(1, 1), True))[:-1] + b"\x02")


def test_declared_sizes_are_bounded_before_allocation():
    head = M.encode(M.Learn(1, 5, ()))[:-4]
    with pytest.raises(M.DecodeError, match="exceeds the limit"):
        M.decode(head + struct.pack(">I", M.MAX_SLOTS_PER_MESSAGE + 1))
    one_slot = head + struct.pack(">I", 1)
    with pytest.raises(M.DecodeError, match="exceeds the limit"):
        M.decode(one_slot + struct.pack(">I", M.MAX_BATCH_COMMANDS + 1))
    with pytest.raises(M.DecodeError, match="command length"):
        M.decode(one_slot + struct.pack(">II", 1, M.MAX_COMMAND_BYTES + 1))
    chunk = M.encode(M.SnapshotChunk(1, 1, 0, 10, b""))[:-4]
    with pytest.raises(M.DecodeError, match="exceeds the limit"):
        M.decode(chunk + struct.pack(">I", M.MAX_CHUNK_BYTES + 1))
    with pytest.raises(M.DecodeError, match="out of range"):
        M.decode(bytes([11]) + struct.pack(">I", 1) + b"\xff" * 8 + struct.pack(">I", 0))
    with pytest.raises(M.DecodeError, match="exceeds"):
        M.decode(b"\x01" * (M.MAX_ENCODED_BYTES + 1))


def test_encode_refuses_out_of_range_fields():
    with pytest.raises(ValueError, match="node id"):
        M.encode(M.Heartbeat(-1, M.Ballot(1, 1), 0, 0))
    with pytest.raises(ValueError, match=r"2\*\*63"):
        M.encode(M.CompactRecord(1 << 63))
    with pytest.raises(ValueError, match="bytes"):
        M.encode(M.Learn(1, 1, (("text",),)))
    with pytest.raises(ValueError, match="not a paxos"):
        M.encode(object())


def test_ballots_order_by_round_then_node():
    assert M.ZERO_BALLOT < M.Ballot(1, 0) < M.Ballot(1, 2) < M.Ballot(2, 1)
