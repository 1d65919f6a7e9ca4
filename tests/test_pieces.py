"""Pieces: what the Paxos core uses of bytes (len, slices) over a snapshot's chunks, unjoined."""

import pytest
from hypothesis import given, strategies as st

from paxchat.paxos.pieces import Pieces


@given(st.lists(st.binary(max_size=40), max_size=8), st.integers(-60, 200), st.integers(-60, 200))
def test_slices_read_as_the_joined_bytes_would(parts, start, stop):
    joined = b"".join(parts)
    pieces = Pieces(parts)
    assert len(pieces) == len(joined)
    assert pieces[start:stop] == joined[start:stop]
    assert pieces[start:] == joined[start:] and pieces[:stop] == joined[:stop]
    assert bytes(pieces) == joined


def test_the_pieces_are_views_of_what_was_given_not_copies():
    data = bytearray(b"abcdef")
    pieces = Pieces([memoryview(data)[:3], memoryview(data)[3:], b""])
    assert [bytes(p) for p in pieces] == [b"abc", b"def"]     # empty pieces are dropped
    data[0:1] = b"X"
    assert pieces[0:2] == b"Xb"


def test_only_plain_slices_are_taken():
    pieces = Pieces([b"abc"])
    with pytest.raises(TypeError):
        pieces[1]
    with pytest.raises(TypeError):
        pieces[::2]
