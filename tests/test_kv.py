"""The SQLite key-value store: ordering, transactions, snapshots, damage."""

import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from hypothesis import example, given, settings, strategies as st

from paxchat.state import kv as kvmodule
from paxchat.state.kv import (
    GROUP_SECONDS, GROUP_SLOTS, SNAPSHOT_CHUNK_BYTES, CorruptStore, KVStore, SnapshotError,
    StoreError, prefix_end)


@pytest.fixture
def store(tmp_path):
    kv = KVStore.open(tmp_path / "state.db")
    yield kv
    kv.close()


def fill(kv, items, index=None):
    with kv.transaction():
        for key, value in items:
            kv.put(key, value)
        if index is not None:
            kv.set_applied_index(index)


def keys(rows):
    return [k for k, _ in rows]


def synchronous(kv):
    return kv._conn.execute("PRAGMA synchronous").fetchone()[0]


def test_a_store_fed_by_a_durable_log_commits_without_fsync_until_synced(tmp_path):
    durable = KVStore.open(tmp_path / "own.db")
    assert synchronous(durable) == 2                      # FULL: fsync per commit
    durable.sync()                                        # nothing to do
    assert synchronous(durable) == 2
    durable.close()
    kv = KVStore.open(tmp_path / "fed.db", durable=False)
    try:
        assert synchronous(kv) == 1                       # NORMAL: no fsync per commit
        fill(kv, [("a", b"1")], index=7)
        kv.sync()
        assert synchronous(kv) == 1
        assert kv.dump() == (7, [("a", b"1")])
        with kv.transaction():
            with pytest.raises(RuntimeError):
                kv.sync()                                 # not inside a transaction
        assert synchronous(kv) == 1
    finally:
        kv.close()


def test_new_store_is_empty_at_index_zero(store):
    assert store.applied_index() == 0
    assert store.dump() == (0, [])


def test_put_get_delete(store):
    fill(store, [("a", b"1"), ("b", b"2")])
    assert store.get("a") == b"1"
    assert store.get("missing") is None
    with store.transaction():
        store.put("a", b"3")
        assert store.delete("b") is True
        assert store.delete("b") is False
    assert store.dump() == (0, [("a", b"3")])


def test_writes_need_a_transaction(store):
    with pytest.raises(RuntimeError):
        store.put("a", b"1")
    with pytest.raises(RuntimeError):
        store.set_applied_index(3)
    with store.transaction():
        with pytest.raises(RuntimeError):
            with store.transaction():
                pass


def test_scan_by_prefix_is_ordered_and_bounded(store):
    fill(store, [(k, b"") for k in ["u/a/1", "u/a/2", "u/a/3", "u/b/1", "u/a.x/1", "u/", "v"]])
    assert keys(store.scan("u/a/")) == ["u/a/1", "u/a/2", "u/a/3"]
    assert keys(store.scan("u/a/", after="u/a/1")) == ["u/a/2", "u/a/3"]
    assert keys(store.scan("u/a/", limit=2)) == ["u/a/1", "u/a/2"]
    assert keys(store.scan("u/a/", reverse=True, limit=2)) == ["u/a/3", "u/a/2"]
    assert keys(store.scan("u/a/", before="u/a/3", reverse=True)) == ["u/a/2", "u/a/1"]
    assert keys(store.scan("u/a")) == ["u/a.x/1", "u/a/1", "u/a/2", "u/a/3"]
    assert keys(store.scan("")) == sorted(["u/a/1", "u/a/2", "u/a/3", "u/b/1", "u/a.x/1", "u/", "v"])
    assert store.scan_keys_glob("u/a/", "u/a/*") == ["u/a/1", "u/a/2", "u/a/3"]
    assert store.scan_keys_glob("u/a/", "*[13]", after="u/a/1") == ["u/a/3"]
    assert store.scan_keys_glob("u/", "u/?/?", limit=3) == ["u/a/1", "u/a/2", "u/a/3"]
    assert store.scan_keys_glob("u/", "u/b*") == ["u/b/1"]
    assert store.scan_keys_glob("u/a/", "u/b*") == []


def test_scan_bounds_match_a_filter_of_the_whole_prefix(store):
    all_keys = ["a", "p/", "p/0", "p/1", "p/2", "p/3", "p0", "q"]
    fill(store, [(k, b"") for k in all_keys])
    bounds = [None, "", "a", "p/", "p/1", "p/15", "p/3", "p/9", "p0", "q", "z"]
    for after in bounds:
        for before in bounds:
            for reverse in (False, True):
                want = [k for k in sorted(all_keys) if k.startswith("p/")
                        and (after is None or k > after) and (before is None or k < before)]
                got = keys(store.scan("p/", after=after, before=before, reverse=reverse))
                assert got == (want[::-1] if reverse else want), (after, before, reverse)


def test_a_bounded_scan_reads_only_its_range(store):
    # Two bounds on one side must not make SQLite walk the whole prefix.
    fill(store, [(f"x/{i:06d}", b"") for i in range(20000)])
    steps = []
    store._conn.set_progress_handler(lambda: steps.append(1), 100)
    try:
        assert keys(store.scan("x/", before="x/000002", limit=16)) == ["x/000000", "x/000001"]
        assert keys(store.scan("x/", after="x/019997", limit=16)) == ["x/019998", "x/019999"]
        assert keys(store.scan("x/", before="x/000002", reverse=True)) == ["x/000001", "x/000000"]
    finally:
        store._conn.set_progress_handler(None, 0)
    assert len(steps) < 20                  # a full walk of the prefix takes thousands


def test_scan_order_is_code_point_order_beyond_ascii(store):
    names = ["p/a", "p/\x7f", "p/\xe9", "p/\u20ac", "p/\U0001f600", "p/\U0010ffff"]
    fill(store, [(k, b"") for k in names])
    assert keys(store.scan("p/")) == sorted(names)
    assert keys(store.scan("p/\U0010ffff")) == ["p/\U0010ffff"]


def test_prefix_end():
    assert prefix_end("a/") == "a0"
    assert prefix_end("") is None
    assert prefix_end("a\U0010ffff") == "b"
    assert prefix_end("\ud7ff") == "\ue000"


def test_delete_prefix(store):
    fill(store, [("h/a/1", b""), ("h/a/2", b""), ("h/ab/1", b""), ("h/b/1", b"")])
    with store.transaction():
        assert store.delete_prefix("h/a/") == 2
    assert keys(store.scan("")) == ["h/ab/1", "h/b/1"]


def test_failed_transaction_changes_nothing(store):
    fill(store, [("a", b"1")], index=4)
    with pytest.raises(ZeroDivisionError):
        with store.transaction():
            store.put("a", b"2")
            store.put("b", b"2")
            store.set_applied_index(5)
            1 / 0
    assert store.dump() == (4, [("a", b"1")])


def test_savepoint_rolls_back_only_its_own_writes(store):
    with store.transaction():
        store.put("a", b"1")
        with pytest.raises(KeyError):
            with store.savepoint():
                store.put("b", b"2")
                store.delete("a")
                raise KeyError("x")
        with store.savepoint():
            store.put("c", b"3")
            with pytest.raises(KeyError):
                with store.savepoint():
                    store.put("d", b"4")
                    raise KeyError("y")
    assert store.dump() == (0, [("a", b"1"), ("c", b"3")])


_CACHE_KEYS = ["a/1", "a/2", "a/3", "b/1", "ab"]
_cache_ops = st.lists(st.one_of(
    st.tuples(st.just("put"), st.sampled_from(_CACHE_KEYS), st.binary(max_size=3)),
    st.tuples(st.just("put_many"), st.lists(st.tuples(st.sampled_from(_CACHE_KEYS),
                                                      st.binary(max_size=3)), max_size=3)),
    st.tuples(st.just("delete"), st.sampled_from(_CACHE_KEYS)),
    st.tuples(st.just("delete_prefix"), st.sampled_from(["a/", "b/", "a"])),
    st.tuples(st.just("add_count"), st.sampled_from(_CACHE_KEYS), st.integers(-2, 2)),
    st.tuples(st.just("get"), st.sampled_from(_CACHE_KEYS)),
    st.tuples(st.just("undone"), st.sampled_from(_CACHE_KEYS), st.binary(max_size=3)),
    st.tuples(st.just("commit"),),
), max_size=40)


@settings(max_examples=150, deadline=None)
@given(ops=_cache_ops, limit=st.sampled_from([1, 2, 100]))
@example(ops=[("put", "a/1", b"1"), ("get", "a/1"), ("add_count", "a/1", 1), ("get", "a/1")], limit=100)
@example(ops=[("put", "a/1", b"1"), ("get", "a/1"), ("delete_prefix", "a"), ("get", "a/1")], limit=100)
def test_cached_values_always_read_as_the_database_holds_them(tmp_path_factory, ops, limit):
    """Every read through the cache equals a read of an uncached store given the same writes,
    through commits, rollbacks, savepoints undone and the cache's limit."""
    directory = tmp_path_factory.mktemp("cache")
    cached, plain = KVStore.open(directory / "c.db"), KVStore.open(directory / "p.db")
    cached.cache_keys(("a/",), at_most=limit)
    try:
        for op in ops:
            reads = []
            for kv in (cached, plain):
                with kv.group():
                    if op[0] == "get":
                        reads.append(kv.get(op[1]))
                    elif op[0] == "commit":
                        pass
                    elif op[0] == "undone":
                        with pytest.raises(KeyError):
                            with kv.savepoint():
                                kv.put(op[1], op[2])
                                reads.append(kv.get(op[1]))
                                raise KeyError(op[1])
                        reads.append(kv.get(op[1]))
                    else:
                        getattr(kv, op[0])(*op[1:])
                if op[0] == "commit":
                    kv.commit_group()
            assert reads[:len(reads) // 2] == reads[len(reads) // 2:]
        for kv in (cached, plain):
            with pytest.raises(ZeroDivisionError):
                with kv.group():
                    kv.put("a/1", b"rolled back")
                    kv.get("a/1")
                    1 / 0
        assert [cached.get(k) for k in _CACHE_KEYS] == [plain.get(k) for k in _CACHE_KEYS]
    finally:
        cached.close()
        plain.close()


def test_a_restore_replaces_cached_values(tmp_path, store):
    store.cache_keys(("a/",))
    fill(store, [("a/1", b"old")], index=1)
    assert store.get("a/1") == b"old"
    other = KVStore.open(tmp_path / "other.db")
    fill(other, [("a/1", b"new")], index=2)
    index, chunks = other.snapshot()
    store.restore(index, list(chunks))
    other.close()
    assert store.get("a/1") == b"new"


def test_savepoint_needs_a_transaction(store):
    with pytest.raises(RuntimeError):
        with store.savepoint():
            pass


def test_reopen_keeps_data_and_index(tmp_path):
    path = tmp_path / "s.db"
    kv = KVStore.open(path)
    fill(kv, [("k", b"v")], index=9)
    kv.close()
    kv = KVStore.open(path, check=True)
    assert kv.dump() == (9, [("k", b"v")])
    kv.close()


def test_garbage_file_is_a_clear_error_and_left_alone(tmp_path):
    path = tmp_path / "s.db"
    path.write_bytes(b"this is not sqlite" * 500)
    with pytest.raises(CorruptStore, match="s.db"):
        KVStore.open(path)
    assert path.read_bytes() == b"this is not sqlite" * 500


def test_foreign_sqlite_database_is_refused(tmp_path):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(CorruptStore, match="other.db.*not a paxchat state"):
        KVStore.open(path)


def test_damaged_pages_are_found_by_check(tmp_path):
    path = tmp_path / "s.db"
    kv = KVStore.open(path)
    fill(kv, [("k%05d" % i, os.urandom(200)) for i in range(2000)], index=1)
    kv.close()
    data = bytearray(path.read_bytes())
    for offset in range(8192, len(data) - 4096, 4096):
        data[offset + 100:offset + 400] = b"\xff" * 300
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptStore, match="s.db"):
        kv = KVStore.open(path, check=True)
        kv.dump()


def read_only(path):
    """A connection SQLite opens read-only, as it would a file on a read-only disk or
    one the node's user may not write (tests run as root, whom permissions do not stop)."""
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                           check_same_thread=False)


def test_a_database_sqlite_cannot_write_is_not_called_damaged(tmp_path, monkeypatch):
    path = tmp_path / "s.db"
    kv = KVStore.open(path)
    fill(kv, [("k", b"v")], index=3)
    kv.close()
    monkeypatch.setattr(kvmodule, "_connect", read_only)
    with pytest.raises(StoreError) as info:
        KVStore.open(path, check=True)
    # Whole data: moving it aside to rebuild would be wrong; the disk or its rights are.
    assert not isinstance(info.value, CorruptStore)
    assert str(info.value) == (
        f"cannot use state database {path}: attempt to write a readonly database (the node's"
        " user must be able to write it and its directory, on a disk mounted read-write with"
        " space free)")
    monkeypatch.undo()
    kv = KVStore.open(path, check=True)
    assert kv.dump() == (3, [("k", b"v")])
    kv.close()


def test_unopenable_path_names_the_file(tmp_path):
    with pytest.raises(StoreError, match="nodir"):
        KVStore.open(tmp_path / "nodir" / "s.db")


def test_wal_and_full_sync(store):
    conn = store._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2


def test_savepoint_journals_stay_in_memory(store):
    # 2 = MEMORY: a command's savepoint writes no temp file.
    assert store._conn.execute("PRAGMA temp_store").fetchone()[0] == 2
    with store.transaction(), store.savepoint():
        store.put("a", b"1")
    assert store.get("a") == b"1"


# -- group commit ---------------------------------------------------------------

def committed(kv):
    """The keys another connection sees: what has committed."""
    reader = sqlite3.connect(kv.path)
    try:
        return {k for (k,) in reader.execute("SELECT k FROM kv")}
    finally:
        reader.close()


def test_a_group_commits_once_it_holds_enough_slots(tmp_path):
    kv = KVStore.open(tmp_path / "fed.db", durable=False)
    try:
        for i in range(GROUP_SLOTS - 2):
            with kv.group():
                kv.put(f"k{i:03d}", b"v")
        assert kv.get("k000") == b"v" and kv.group_open    # seen here, not committed
        assert committed(kv) == set()
        with kv.group(slots=2):
            kv.put("last", b"v")
        assert not kv.group_open
        assert len(committed(kv)) == GROUP_SLOTS - 1
    finally:
        kv.close()


def test_a_group_commits_once_it_is_old_enough(store, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(kvmodule.time, "monotonic", lambda: now[0])
    with store.group():
        store.put("a", b"1")
    now[0] += GROUP_SECONDS / 2
    with store.group():
        store.put("b", b"1")
    assert store.group_open and committed(store) == set()
    now[0] += GROUP_SECONDS / 2
    with store.group():
        store.put("c", b"1")
    assert not store.group_open and committed(store) == {"a", "b", "c"}


def test_a_failing_block_rolls_the_whole_group_back(store):
    fill(store, [("committed", b"0")])
    with store.group():
        store.put("grouped", b"1")
    with pytest.raises(ValueError):
        with store.group():
            store.put("failing", b"2")
            raise ValueError("boom")
    assert not store.group_open and not store.in_transaction
    assert store.get("grouped") is None and store.get("failing") is None
    assert committed(store) == {"committed"}
    store.commit_group()  # nothing open: nothing to do
    with store.group():   # and the store goes on
        store.put("next", b"3")
    store.commit_group()
    assert committed(store) == {"committed", "next"}


@pytest.mark.parametrize("action", ["transaction", "sync", "snapshot", "close"])
def test_anything_that_needs_committed_state_commits_an_open_group_first(tmp_path, action):
    kv = KVStore.open(tmp_path / "fed.db", durable=False)
    with kv.group():
        kv.put("grouped", b"1")
        kv.set_applied_index(3)
    if action == "transaction":
        with kv.transaction():
            kv.put("after", b"1")
        assert committed(kv) == {"grouped", "after"}
    elif action == "sync":
        kv.sync()
        assert committed(kv) == {"grouped"}
    elif action == "snapshot":
        index, chunks = kv.snapshot()
        chunks.close()
        assert index == 3 and committed(kv) == {"grouped"}
    else:
        kv.close()
        reopened = KVStore.open(tmp_path / "fed.db")
        assert reopened.get("grouped") == b"1" and reopened.applied_index() == 3
        reopened.close()
    kv.close()


def test_a_group_does_not_nest_in_a_transaction(store):
    with store.transaction():
        with pytest.raises(RuntimeError):
            with store.group():
                pass


# -- snapshots ----------------------------------------------------------------

def test_snapshot_roundtrip_in_bounded_chunks(tmp_path, store):
    fill(store, [("k/%05d" % i, bytes([i % 256]) * 700) for i in range(1500)], index=42)
    index, chunks = store.snapshot()
    chunks = list(chunks)
    assert index == 42
    assert len(chunks) > 1
    assert all(len(c) <= SNAPSHOT_CHUNK_BYTES for c in chunks)
    other = KVStore.open(tmp_path / "other.db")
    fill(other, [("junk", b"x")], index=3)
    other.restore(42, chunks)
    assert other.dump() == store.dump()
    assert other.digest() == store.digest()
    other.close()


def test_snapshot_of_empty_store(tmp_path, store):
    index, chunks = store.snapshot()
    other = KVStore.open(tmp_path / "other.db")
    other.restore(index, chunks)
    assert other.dump() == (0, [])
    other.close()


def test_snapshot_is_isolated_from_later_writes(tmp_path, store):
    fill(store, [("a", b"1")], index=1)
    index, chunks = store.snapshot(chunk_bytes=64)
    fill(store, [("b", b"2")], index=2)      # before the image is read, after the snapshot began
    pieces = list(chunks)
    assert len(pieces) > 2 and all(len(p) <= 64 for p in pieces)
    other = KVStore.open(tmp_path / "other.db")
    other.restore(index, pieces)
    assert other.dump() == (1, [("a", b"1")])
    other.close()


def _fifty_rows_snapshot(store):
    """``(index, the whole snapshot)`` of ``store`` after fifty small rows at index 7."""
    fill(store, [("k%d" % i, b"v" * i) for i in range(50)], index=7)
    index, chunks = store.snapshot()
    return index, b"".join(chunks)


def test_snapshot_restore_accepts_any_chunking(tmp_path, store):
    index, blob = _fifty_rows_snapshot(store)
    other = KVStore.open(tmp_path / "other.db")
    other.restore(index, [blob[i:i + 13] for i in range(0, len(blob), 13)])
    assert other.dump() == store.dump()
    other.close()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=6), st.binary(max_size=300)), max_size=25),
       st.lists(st.integers(min_value=1, max_value=700), min_size=1, max_size=30))
def test_restore_reads_back_any_records_under_any_chunk_boundaries(tmp_path_factory, items, cuts):
    directory = tmp_path_factory.mktemp("kv")
    source = KVStore.open(directory / "a.db")
    fill(source, items, index=9)
    index, chunks = source.snapshot()
    blob = b"".join(chunks)
    pieces, at = [], 0
    for n in cuts * (len(blob) // sum(cuts) + 1):   # chunks of the drawn sizes, over and over
        if at >= len(blob):
            break
        pieces.append(blob[at:at + n])
        at += n
    copy = KVStore.open(directory / "b.db")
    copy.restore(index, iter(pieces))
    assert copy.dump() == source.dump()
    source.close()
    copy.close()


def _frame(index, image):
    """A well-framed snapshot of ``image`` (so only the image's own checks can refuse it)."""
    import hashlib
    return (kvmodule._SNAP_HEADER.pack(kvmodule.SNAPSHOT_MAGIC, index, len(image)) + image
            + hashlib.sha256(image).digest())


def _image(kv):
    """The image inside a snapshot of ``kv``."""
    index, chunks = kv.snapshot()
    blob = b"".join(chunks)
    return blob[kvmodule._SNAP_HEADER.size:-32]


def _snapshot_args(kv):
    index, chunks = kv.snapshot()
    return index, list(chunks)


def _edited_image(source, *statements):
    """The image of ``source`` after running ``statements`` on a copy of it in memory."""
    copy = sqlite3.connect(":memory:", isolation_level=None)
    copy.deserialize(_image(source))
    for statement in statements:
        copy.execute(statement)
    image = copy.serialize()
    copy.close()
    return image


@pytest.mark.parametrize("edit, why", [
    ("not sqlite", "not a usable SQLite database"),
    ("DROP TABLE meta", "not a paxchat state"),
    ("UPDATE meta SET value = 99 WHERE name = 'format'", "format 99"),
    ("UPDATE meta SET value = 5 WHERE name = 'applied_index'", "image is of index 5"),
    ("zero a page", "damaged|not a usable"),
])
def test_an_image_that_is_not_our_state_is_refused_by_name(tmp_path, store, edit, why):
    fill(store, [("k%04d" % i, b"v" * 300) for i in range(200)], index=4)
    if edit == "not sqlite":
        image = b"x" * 8192
    elif edit == "zero a page":
        image = bytearray(_image(store))
        image[4096:8192] = bytes(4096)       # the second page: part of a table's tree
        image = bytes(image)
    else:
        image = _edited_image(store, edit)
    kv = KVStore.open(tmp_path / "s.db")
    fill(kv, [("mine", b"x")], index=3)
    before = kv.dump()
    with pytest.raises(SnapshotError, match=why):
        kv.restore(4, [_frame(4, image)])
    assert kv.dump() == before
    assert not os.path.exists(kv.path + kvmodule.RESTORE_SUFFIX)
    kv.close()


@pytest.mark.parametrize("damage", ["truncate", "flip", "extra", "wrong_index", "magic", "type"])
def test_bad_snapshot_changes_nothing(tmp_path, store, damage):
    index, blob = _fifty_rows_snapshot(store)
    other = KVStore.open(tmp_path / "other.db")
    fill(other, [("mine", b"x")], index=3)
    before = other.dump()
    chunks = [blob]
    if damage == "truncate":
        chunks = [blob[:-5]]
    elif damage == "flip":
        chunks = [blob[:200] + bytes([blob[200] ^ 1]) + blob[201:]]
    elif damage == "extra":
        chunks = [blob, b"more"]
    elif damage == "wrong_index":
        index += 1
    elif damage == "magic":
        chunks = [b"X" + blob[1:]]
    elif damage == "type":
        chunks = ["text"]
    with pytest.raises(SnapshotError):
        other.restore(index, chunks)
    assert other.dump() == before
    assert not os.path.exists(other.path + kvmodule.RESTORE_SUFFIX)   # nothing left beside it
    other.close()


def _fill_big(kv, rows=20000):
    """~5 MB of state per 20,000 rows (random values: SQLite cannot shrink them)."""
    fill(kv, [("k%05d" % i, os.urandom(200)) for i in range(rows)], index=8)


def _traced_peak(fn):
    """``(fn(), the peak of what Python allocated while it ran)``."""
    import tracemalloc
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_restore_streams_the_image_through_a_file_instead_of_holding_it(tmp_path, store):
    _fill_big(store)
    index, chunks = store.snapshot()
    pieces = list(chunks)
    size = sum(len(p) for p in pieces)
    assert size > 4 << 20
    other = KVStore.open(tmp_path / "other.db")
    _, peak = _traced_peak(lambda: other.restore(index, iter(pieces)))
    assert other.dump() == store.dump()
    # A chunk or two at a time, never the whole snapshot (joined, it would be `size`).
    assert peak < size / 4, (peak, size)
    assert not os.path.exists(other.path + kvmodule.RESTORE_SUFFIX)
    other.close()


def test_a_restore_or_snapshot_cut_short_by_a_crash_leaves_no_file_once_reopened(tmp_path):
    path = tmp_path / "s.db"
    KVStore.open(path).close()
    parts = [str(path) + kvmodule.RESTORE_SUFFIX, str(path) + ".x1y2" + kvmodule.SNAPSHOT_SUFFIX]
    for part in parts:
        with open(part, "wb") as f:
            f.write(b"half an image")
    KVStore.open(path).close()
    assert not any(os.path.exists(part) for part in parts)


def test_a_snapshot_received_part_by_part_waits_on_disk_and_is_restored_from_there(tmp_path, store):
    _fill_big(store, 40000)
    index, chunks = store.snapshot()
    blob = memoryview(b"".join(chunks))
    other = KVStore.open(tmp_path / "other.db")
    incoming = other.path + kvmodule.RESTORE_SUFFIX
    other.receive_snapshot_part(0, blob[:1000])           # a transfer abandoned
    step = 1 << 20

    def receive_and_restore():
        for at in range(0, len(blob), step):
            other.receive_snapshot_part(at, blob[at:at + step])   # offset 0 starts anew
        # Only the image is on the disk, checked as it came: frame and digest are not.
        assert os.path.getsize(incoming) == len(blob) - kvmodule._SNAP_HEADER.size - 32
        other.restore_received(index)
    _, peak = _traced_peak(receive_and_restore)
    assert other.dump() == store.dump()
    assert peak < len(blob) / 4, (peak, len(blob))        # parts pass through, not kept
    assert not os.path.exists(incoming)
    other.close()


def test_a_snapshot_part_out_of_order_or_a_bad_received_snapshot_changes_nothing(tmp_path, store):
    index, blob = _fifty_rows_snapshot(store)
    other = KVStore.open(tmp_path / "other.db")
    fill(other, [("mine", b"x")], index=3)
    before = other.dump()
    part = other.path + kvmodule.RESTORE_SUFFIX
    with pytest.raises(StoreError, match="a part at 10 of a snapshot of which 0 bytes came"):
        other.receive_snapshot_part(10, blob[10:20])      # nothing begun
    other.receive_snapshot_part(0, blob[:100])
    with pytest.raises(StoreError, match="of which 100 bytes came"):
        other.receive_snapshot_part(200, blob[200:300])   # a gap
    with pytest.raises(SnapshotError, match="ends early"):
        other.restore_received(index)                     # only the first 100 bytes
    assert other.dump() == before and not os.path.exists(part)
    with pytest.raises(StoreError, match="no snapshot was received"):
        other.restore_received(index)
    with pytest.raises(SnapshotError, match="bad magic"):
        other.receive_snapshot_part(0, b"X" + blob[1:100])   # refused as it comes
    assert not os.path.exists(part)
    other.receive_snapshot_part(0, blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(SnapshotError, match="digest"):
        other.restore_received(index)
    other.receive_snapshot_part(0, blob)
    with pytest.raises(SnapshotError, match="expected 8"):
        other.restore_received(8)                         # another index than announced
    assert other.dump() == before and not os.path.exists(part)
    other.receive_snapshot_part(0, blob[:100])
    other.close()                                         # a transfer under way when it stops
    assert not os.path.exists(part)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300_000), st.integers(0, 300_000)), min_size=1, max_size=20))
def test_a_snapshot_file_reads_as_the_chunks_would(tmp_path_factory, cuts):
    directory = tmp_path_factory.mktemp("kv")
    kv = KVStore.open(directory / "s.db")
    fill(kv, [("k%05d" % i, b"v" * 100) for i in range(1500)], index=6)
    blob = b"".join(kv.snapshot()[1])
    snapshot = kv.snapshot()[1].as_file()
    assert len(snapshot) == len(blob) and kvmodule.check_snapshot(snapshot[:].read()) == 6
    for start, stop in cuts + [(0, 40), (len(blob) - 40, len(blob) + 9)]:
        part = snapshot[start:stop]
        assert len(part) == len(blob[start:stop]) and part.read() == blob[start:stop]
    assert not any(n.endswith(kvmodule.SNAPSHOT_SUFFIX) for n in os.listdir(directory))
    snapshot.close()
    kv.close()


def test_a_snapshot_file_holds_none_of_the_state_in_memory(tmp_path, store):
    _fill_big(store, 40000)
    before = sorted(os.listdir(tmp_path))
    _, chunks = store.snapshot()
    snapshot, peak = _traced_peak(chunks.as_file)
    assert len(snapshot) > 8 << 20 and peak < len(snapshot) / 4, (peak, len(snapshot))
    assert sorted(os.listdir(tmp_path)) == before        # its file is unlinked while open
    other = KVStore.open(tmp_path / "other.db")
    step = 1 << 20
    other.restore(8, (snapshot[at:at + step].read() for at in range(0, len(snapshot), step)))
    assert other.dump() == store.dump()
    other.close()
    snapshot.close()


def test_a_snapshot_is_read_a_chunk_at_a_time_and_leaves_no_file(tmp_path, store):
    _fill_big(store)
    before = sorted(os.listdir(tmp_path))
    index, chunks = store.snapshot()

    def read():
        size = 0
        for chunk in chunks:                # as the admin backup sends it: one chunk at a time
            size += len(chunk)
            if size == len(chunk):
                assert sorted(os.listdir(tmp_path)) == before    # read through an unlinked file
        return size
    size, peak = _traced_peak(read)
    assert size > 4 << 20 and peak < size / 4, (peak, size)
    assert sorted(os.listdir(tmp_path)) == before
    abandoned = store.snapshot()[1]
    next(abandoned)
    abandoned.close()
    assert sorted(os.listdir(tmp_path)) == before


def test_a_restored_store_is_durable_and_stays_in_wal_mode(tmp_path, store):
    fill(store, [("k%04d" % i, b"v" * 100) for i in range(500)], index=12)
    other = KVStore.open(tmp_path / "other.db", durable=False)
    fill(other, [("mine", b"x")], index=3)
    other.restore(*_snapshot_args(store))
    with other.group():                      # the same connection carries on
        other.put("after", b"1")
        other.set_applied_index(13)
    other.close()
    reopened = KVStore.open(tmp_path / "other.db", check=True)
    assert reopened._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    index, records = reopened.dump()
    assert index == 13 and records == sorted(store.dump()[1] + [("after", b"1")])
    reopened.close()


def test_a_snapshot_being_read_survives_a_restore_of_its_store(tmp_path, store):
    fill(store, [("old%03d" % i, b"o" * 50) for i in range(100)], index=5)
    expected = store.dump()
    index, chunks = store.snapshot(chunk_bytes=1024)   # its read transaction is open
    source = KVStore.open(tmp_path / "source.db")
    fill(source, [("new", b"n")], index=9)
    store.restore(*_snapshot_args(source))
    assert store.dump() == (9, [("new", b"n")])
    copy = KVStore.open(tmp_path / "copy.db")
    copy.restore(index, chunks)
    assert copy.dump() == expected
    copy.close()
    source.close()


def test_abandoned_snapshot_releases_its_connection(store):
    fill(store, [("a", b"1")], index=1)
    _, chunks = store.snapshot(chunk_bytes=16)
    next(chunks)
    chunks.close()
    chunks.close()
    assert list(chunks) == []


# -- crashes --------------------------------------------------------------------

@settings(max_examples=30)
@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.binary(max_size=8)), max_size=20),
       st.integers(min_value=0, max_value=20))
def test_exception_mid_transaction_leaves_last_commit(tmp_path_factory, writes, cut):
    path = tmp_path_factory.mktemp("kv") / "s.db"
    kv = KVStore.open(path)
    fill(kv, [("base", b"0")], index=1)
    before = kv.dump()
    with pytest.raises(RuntimeError):
        with kv.transaction():
            for key, value in writes[:cut]:
                kv.put(key, value)
            kv.set_applied_index(2)
            raise RuntimeError("crash")
    assert kv.dump() == before
    kv.close()


def test_copy_of_files_mid_transaction_recovers_last_commit(tmp_path):
    """A copy taken while a big transaction is open (its pages spilled to the
    WAL) is what a power cut leaves: it must open at the last commit."""
    path = tmp_path / "s.db"
    kv = KVStore.open(path)
    fill(kv, [("k%05d" % i, b"a" * 100) for i in range(100)], index=5)
    committed = kv.dump()
    kv._conn.execute("PRAGMA cache_size = 10")  # force spills into the WAL
    copy = tmp_path / "copy"
    copy.mkdir()
    with kv.transaction():
        for i in range(5000):
            kv.put("z%05d" % i, os.urandom(300))
        kv.set_applied_index(6)
        assert os.path.getsize(str(path) + "-wal") > 0
        for suffix in ("", "-wal"):
            shutil.copy(str(path) + suffix, copy / ("s.db" + suffix))
    kv.close()
    recovered = KVStore.open(copy / "s.db", check=True)
    assert recovered.dump() == committed
    recovered.close()


def test_killed_process_mid_transaction_recovers_last_commit(tmp_path):
    path = tmp_path / "s.db"
    script = textwrap.dedent(f"""
        import os
        from paxchat.state.kv import KVStore
        kv = KVStore.open({str(path)!r})
        with kv.transaction():
            kv.put("a", b"1")
            kv.set_applied_index(1)
        kv._conn.execute("PRAGMA cache_size = 10")
        with kv.transaction():
            for i in range(3000):
                kv.put("b%05d" % i, os.urandom(300))
            kv.set_applied_index(2)
            os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    kv = KVStore.open(path, check=True)
    assert kv.dump() == (1, [("a", b"1")])
    kv.close()


def test_add_count_stores_the_same_bytes_as_a_put_of_the_sum(store):
    with store.transaction():
        store.add_count("n/a", 1)
        store.add_count("n/a", 9)
        store.add_count("n/b", 3)
        store.put("n/c", b"10")
    assert store.get("n/a") == b"10" and store.get("n/a") == store.get("n/c")
    assert store.get("n/b") == b"3"
    assert isinstance(store.dump()[1][0][1], bytes)
