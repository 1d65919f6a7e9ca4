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

A node's data also has an *identity*: a random id made the first time the
node starts on a directory without one. Each node remembers the identity
of every peer it has spoken with (trust on first use). A peer that comes
back with another identity has lost its data, or runs on a copy made for
another node, and has forgotten votes the others count on: it is refused
in the same way until every node is restored from one backup, which gives
each a new identity and forgets the old ones (``paxchat-admin restore``
copies neither file).

A node's data also records the cluster it belongs to: the *members*, the
node ids its cluster.ini listed when the data was made. A majority of one
set of nodes need not meet a majority of another, so nodes that disagree on
the members can each choose a value for one slot. A node whose cluster.ini
lists other nodes than its data records refuses to start: the members
change only with every node stopped and restored from one copy
(``paxchat-admin restore`` records the members of the cluster.ini it runs
with), so that no node runs with the old set while another runs with the new.

A node whose disk was lost can come back without stopping the others:
``paxchat-admin rebuild`` makes its empty data directory with a
*rebuilding* mark. Such a node says so in its hello; its peers let its new
identity in, remember it, and close every link of its old one, and it
votes for nothing until every other node has told it what its lost disk
may have promised (``paxos/core.py``, "Rebuilding a node"). In a cluster
restored from a backup it takes the lineage of the first peer it hears.
Once it votes again the mark goes.
"""

import json
import os
import re
import secrets
from pathlib import Path

from paxchat.paxos.store import fsync_directory

__all__ = ["IDENTITY", "IDENTITY_FILE", "LINEAGE_FILE", "MEMBERS_FILE", "PEER_IDENTITIES_FILE",
           "REBUILDING_FILE", "LineageError", "check_members", "clear_rebuilding", "describe",
           "is_rebuilding", "mark_rebuilding", "read_lineage", "read_or_make_identity",
           "read_peer_identities", "write_lineage", "write_members", "write_peer_identities"]

LINEAGE_FILE = "lineage"
MEMBERS_FILE = "members"
REBUILDING_FILE = "rebuilding"
IDENTITY_FILE = "identity"
PEER_IDENTITIES_FILE = "peer-identities"
_VALID = re.compile(rb"[0-9a-f]{1,64}")
IDENTITY = re.compile(rb"[0-9a-f]{32}")                # what a data identity looks like
_IDENTITY_LINE = re.compile(rb"node (\d+) (" + IDENTITY.pattern + rb")")


class LineageError(ValueError):
    """The lineage file is there but is not one: the node must not guess."""


def read_lineage(directory) -> bytes:
    """The lineage of the data in ``directory``: ASCII hex, or b"" if it was never restored."""
    path = Path(directory) / LINEAGE_FILE
    raw = _read(path)
    if raw is None:
        return b""
    lineage = raw.strip()
    if not _VALID.fullmatch(lineage):
        raise LineageError(f"{path} is damaged: it should hold the sha256 of the backup the "
                           "directory was restored from")
    return lineage


def write_lineage(directory, lineage: bytes) -> None:
    """Stamp ``directory`` with ``lineage``, durably (written aside, fsynced, renamed)."""
    if not _VALID.fullmatch(lineage):
        raise ValueError(f"a lineage is 1 to 64 lowercase hex digits, not {lineage!r}")
    _write_durably(Path(directory) / LINEAGE_FILE, lineage + b"\n")


def read_or_make_identity(directory, node_id) -> bytes:
    """This node's data identity (32 hex digits), made if the directory has none.

    A directory whose identity names another node was copied from that node:
    it gets a new identity, and that node's memory of its peers goes.
    """
    directory = Path(directory)
    path = directory / IDENTITY_FILE
    raw = _read(path)
    if raw is not None:
        match = _IDENTITY_LINE.fullmatch(raw.strip())
        if match is None:
            raise LineageError(f"{path} is damaged: it should read 'node N' and 32 hex digits")
        if int(match.group(1)) == node_id:
            return match.group(2)
        (directory / PEER_IDENTITIES_FILE).unlink(missing_ok=True)
    identity = secrets.token_hex(16).encode("ascii")
    _write_durably(path, b"node %d %s\n" % (node_id, identity))
    return identity


def check_members(directory, members, where="cluster.ini") -> None:
    """Refuse (LineageError) to run the data in ``directory`` in a cluster of other
    ``members`` (node ids) than it records; record them if it records none yet
    (data made before the record was kept, or a new node)."""
    path = Path(directory) / MEMBERS_FILE
    raw = _read(path)
    members = sorted(members)
    if raw is None:
        write_members(directory, members)
        return
    try:
        recorded = [int(n) for n in raw.split()]
    except ValueError:
        recorded = []
    if not recorded or recorded != sorted(set(recorded)):
        raise LineageError(f"{path} is damaged: it should list the node ids of the cluster, "
                           "in order")
    if recorded != members:
        raise LineageError(
            f"this node's data belongs to a cluster of nodes {_ids(recorded)}, but {where} lists "
            f"nodes {_ids(members)}. Nodes that disagree on the members can lose acknowledged "
            "writes, so they change only with every node stopped and restored from one copy "
            "(docs/operations.md, \"Changing the nodes of a cluster\"). If cluster.ini is "
            "wrong, put it right.")


def write_members(directory, members) -> None:
    """Record ``members`` (node ids) as the cluster of the data in ``directory``, durably."""
    _write_durably(Path(directory) / MEMBERS_FILE,
                   " ".join(str(n) for n in sorted(members)).encode("ascii") + b"\n")


def _ids(members):
    return ", ".join(str(n) for n in members)


def read_peer_identities(directory) -> dict:
    """``{node id: identity}`` of the peers this node has spoken with."""
    path = Path(directory) / PEER_IDENTITIES_FILE
    data = _read(path)
    if data is None:
        return {}
    try:
        known = {int(k): v.encode("ascii") for k, v in json.loads(data).items()}
    except (AttributeError, ValueError, UnicodeEncodeError):
        known = None
    if known is None or not all(IDENTITY.fullmatch(v) for v in known.values()):
        raise LineageError(f"{path} is damaged: it should map node ids to identities")
    return known


def mark_rebuilding(directory) -> None:
    """Mark ``directory`` (a lost disk's new, empty one) as a node rebuilding, durably."""
    _write_durably(Path(directory) / REBUILDING_FILE,
                   b"this node lost its disk and votes once every peer has answered\n")


def is_rebuilding(directory) -> bool:
    """True while the node of ``directory`` rebuilds (until it votes again)."""
    return _read(Path(directory) / REBUILDING_FILE) is not None


def clear_rebuilding(directory) -> None:
    """The node votes again: remove the mark, durably."""
    path = Path(directory) / REBUILDING_FILE
    path.unlink(missing_ok=True)
    fsync_directory(path.parent)


def write_peer_identities(directory, known) -> None:
    """Remember ``{node id: identity}``, durably."""
    text = json.dumps({str(k): v.decode("ascii") for k, v in sorted(known.items())})
    _write_durably(Path(directory) / PEER_IDENTITIES_FILE, text.encode("ascii") + b"\n")


def _read(path):
    """The file's bytes, None if it is not there; unreadable is a LineageError."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise LineageError(f"cannot read {path}: {e.strerror or e}") from None


def _write_durably(path, data):
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)
    fsync_directory(path.parent)


def describe(lineage: bytes) -> str:
    """How a log line names a lineage."""
    if not lineage:
        return "never restored from a backup"
    return f"restored from backup {lineage[:12].decode('ascii', 'replace')}"
