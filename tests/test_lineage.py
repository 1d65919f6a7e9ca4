"""The lineage stamp of a data directory (paxchat/lineage.py)."""

import pytest

from paxchat.lineage import LINEAGE_FILE, LineageError, describe, read_lineage, write_lineage

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
