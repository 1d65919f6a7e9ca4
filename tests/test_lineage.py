"""The lineage stamp of a data directory (paxchat/lineage.py)."""

import pytest

from paxchat.lineage import (LINEAGE_FILE, MEMBERS_FILE, LineageError, check_members, describe, read_lineage,
                             write_lineage, write_members)

DIGEST = b"0123456789abcdef" * 4


def test_a_directory_never_restored_has_the_empty_lineage(tmp_path):
    assert read_lineage(tmp_path) == b""
    assert describe(b"") == "never restored from a backup"


def test_a_stamp_reads_back_and_leaves_no_part_file(tmp_path):
    write_lineage(tmp_path, DIGEST)
    assert read_lineage(tmp_path) == DIGEST
    assert sorted(p.name for p in tmp_path.iterdir()) == [LINEAGE_FILE]
    assert describe(DIGEST) == "restored from backup 0123456789ab"


@pytest.mark.parametrize("content", [b"", b"\n", b"not hex\n", b"AB" * 8, b"a" * 65, b"\xff\xfe"])
def test_a_damaged_stamp_stops_the_node_rather_than_being_guessed(tmp_path, content):
    (tmp_path / LINEAGE_FILE).write_bytes(content)
    with pytest.raises(LineageError, match="damaged"):
        read_lineage(tmp_path)


def test_an_unreadable_stamp_says_which_file(tmp_path):
    (tmp_path / LINEAGE_FILE).mkdir()
    with pytest.raises(LineageError, match=LINEAGE_FILE):
        read_lineage(tmp_path)


def test_only_a_digest_is_written(tmp_path):
    with pytest.raises(ValueError):
        write_lineage(tmp_path, b"../etc")
    assert not (tmp_path / LINEAGE_FILE).exists()


def test_an_identity_is_made_once_and_kept(tmp_path):
    from paxchat.lineage import IDENTITY_FILE, read_or_make_identity
    first = read_or_make_identity(tmp_path, 2)
    assert len(first) == 32 and read_or_make_identity(tmp_path, 2) == first
    assert (tmp_path / IDENTITY_FILE).read_bytes() == b"node 2 " + first + b"\n"


def test_a_directory_copied_from_another_node_gets_a_new_identity_and_forgets_its_peers(tmp_path):
    from paxchat.lineage import (PEER_IDENTITIES_FILE, read_or_make_identity,
                                 read_peer_identities, write_peer_identities)
    of_node_1 = read_or_make_identity(tmp_path, 1)
    write_peer_identities(tmp_path, {2: b"2" * 32, 3: b"3" * 32})
    assert read_peer_identities(tmp_path) == {2: b"2" * 32, 3: b"3" * 32}
    mine = read_or_make_identity(tmp_path, 3)                  # node 3 started on node 1's copy
    assert mine != of_node_1 and not (tmp_path / PEER_IDENTITIES_FILE).exists()
    assert read_peer_identities(tmp_path) == {}


@pytest.mark.parametrize("name,content", [
    ("identity", b"node x 0123\n"), ("identity", b"node 1\n"),
    ("peer-identities", b"{not json"), ("peer-identities", b'{"2": "NOT HEX"}'),
    ("peer-identities", b'["2"]')])
def test_damaged_identity_files_stop_the_node(tmp_path, name, content):
    from paxchat.lineage import read_or_make_identity, read_peer_identities
    (tmp_path / name).write_bytes(content)
    with pytest.raises(LineageError, match="damaged"):
        read_or_make_identity(tmp_path, 1) if name == "identity" else read_peer_identities(tmp_path)


def test_the_members_are_recorded_the_first_time_and_then_held_to(tmp_path):
    check_members(tmp_path, {3: "c", 1: "a", 2: "b"})             # a config's nodes: a dict by id
    assert (tmp_path / MEMBERS_FILE).read_bytes() == b"1 2 3\n"
    check_members(tmp_path, [2, 3, 1])
    with pytest.raises(LineageError) as refused:
        check_members(tmp_path, [1, 2, 3, 4, 5], where="/etc/paxchat/cluster.ini")
    assert str(refused.value).startswith("this node's data belongs to a cluster of nodes 1, 2, 3, "
                                         "but /etc/paxchat/cluster.ini lists nodes 1, 2, 3, 4, 5.")
    assert "Changing the nodes of a cluster" in str(refused.value)
    with pytest.raises(LineageError, match="nodes 1, 2, 3, but cluster.ini lists nodes 1, 2"):
        check_members(tmp_path, [1, 2])
    assert (tmp_path / MEMBERS_FILE).read_bytes() == b"1 2 3\n"   # a refusal changes nothing
    write_members(tmp_path, [1, 2, 3, 4, 5])                        # what a restore does
    check_members(tmp_path, [5, 4, 3, 2, 1])


@pytest.mark.parametrize("content", [b"", b"\n", b"one two\n", b"3 2 1\n", b"1 1 2\n", b"\xff"])
def test_a_damaged_members_record_stops_the_node(tmp_path, content):
    (tmp_path / MEMBERS_FILE).write_bytes(content)
    with pytest.raises(LineageError, match="damaged"):
        check_members(tmp_path, [1, 2, 3])
