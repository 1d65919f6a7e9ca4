"""Bytes kept as the pieces they came in.

A snapshot of the state is as large as the state. It arrives in chunks,
is served to other peers in chunks and is installed by streaming it to a
file, so nothing needs it as one string; joining it would hold a second
copy of the whole state in memory. ``Pieces`` gives the Paxos core what it
uses of bytes, ``len()`` and slices, over the pieces as they are.
"""

from __future__ import annotations

import bisect


class Pieces:
    """Read-only bytes made of ``pieces`` (bytes or byte memoryviews), not joined."""

    __slots__ = ("pieces", "_ends")

    def __init__(self, pieces):
        self.pieces = tuple(memoryview(p).cast("B") for p in pieces if len(p))
        ends, total = [], 0
        for piece in self.pieces:
            total += len(piece)
            ends.append(total)
        self._ends = ends

    def __len__(self):
        return self._ends[-1] if self._ends else 0

    def __iter__(self):
        return iter(self.pieces)

    def __getitem__(self, key):
        """``pieces[start:stop]`` as bytes (only contiguous slices)."""
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("Pieces only take slices of consecutive bytes")
        start, stop, _ = key.indices(len(self))
        out = []
        at = bisect.bisect_right(self._ends, start)
        while start < stop:
            end = self._ends[at]
            begin = end - len(self.pieces[at])
            out.append(self.pieces[at][start - begin:min(stop, end) - begin])
            start, at = end, at + 1
        return b"".join(out)

    def __bytes__(self):
        return b"".join(self.pieces)

    def __repr__(self):
        return f"<Pieces: {len(self)} bytes in {len(self.pieces)} pieces>"
