"""Which restore a node's data descends from: a stamp kept beside that data.

An acceptor must never forget a promise or a vote. A node restored from a
backup has forgotten every one it made after the backup was taken, and in
a cluster whose other nodes still remember theirs, that can let two values
be chosen for one slot. Restoring every node from the same backup is safe:
they all forget the same things.

So ``paxchat-admin restore`` stamps the data directory with the backup's
sha256 (its *lineage*), and the peer links compare stamps before they pass
a frame on (``paxos/transport.py``). Nodes restored from one backup speak
to each other. A node restored alone into a running cluster, or one started
on an empty directory in a restored cluster, is refused by the rest. A
directory that was never restored has no stamp: the empty lineage.
"""

import os
import re
from pathlib import Path

__all__ = ["LINEAGE_FILE", "LineageError", "describe", "read_lineage", "write_lineage"]

LINEAGE_FILE = "lineage"
_VALID = re.compile(rb"[0-9a-f]{1,64}")


class LineageError(ValueError):
    """The lineage file is there but is not one: the node must not guess."""


def read_lineage(directory) -> bytes:
    """The lineage of the data in ``directory``: ASCII hex, or b"" if it was never restored."""
    path = Path(directory) / LINEAGE_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return b""
    except OSError as e:
        raise LineageError(f"cannot read {path}: {e.strerror or e}") from None
    lineage = raw.strip()
    if not _VALID.fullmatch(lineage):
        raise LineageError(f"{path} is damaged: it should hold the sha256 of the backup the "
                           "directory was restored from")
    return lineage


def write_lineage(directory, lineage: bytes) -> None:
    """Stamp ``directory`` with ``lineage``, durably (written aside, fsynced, renamed)."""
    if not _VALID.fullmatch(lineage):
        raise ValueError(f"a lineage is 1 to 64 lowercase hex digits, not {lineage!r}")
    directory = Path(directory)
    part = directory / (LINEAGE_FILE + ".part")
    with open(part, "wb") as f:
        f.write(lineage + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, directory / LINEAGE_FILE)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def describe(lineage: bytes) -> str:
    """How a log line names a lineage."""
    if not lineage:
        return "never restored from a backup"
    return f"restored from backup {lineage[:12].decode('ascii', 'replace')}"
