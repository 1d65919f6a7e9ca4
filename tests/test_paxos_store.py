"""The durable acceptor log: recovery, torn tails, refusal, group commit, disk errors."""

import errno
import os
import threading

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.logger import LogLevel, globalLogPublisher

from paxchat.paxos.store import (
    CorruptLogError, DurableLog, StorageError, recover_log,
)


def reactor():
    from twisted.internet import reactor as global_reactor  # tests may use the real reactor
    return global_reactor


def segment_files(directory):
    return sorted(p for p in os.listdir(directory) if p.startswith("wal-") and p.endswith(".log"))


def only_segment(directory):
    (name,) = segment_files(directory)
    return os.path.join(directory, name)


def poll_until(condition, timeout=5.0):
    """A Deferred firing once ``condition()`` holds; fails after ``timeout`` seconds."""
    r = reactor()
    d = defer.Deferred()
    deadline = r.seconds() + timeout

    def check():
        if condition():
            d.callback(None)
        elif r.seconds() > deadline:
            d.errback(AssertionError("condition not met in time"))
        else:
            r.callLater(0.005, check)

    check()
    return d


@pytest.fixture
def captured_log():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def messages(events):
    from twisted.logger import formatEvent
    return [formatEvent(e) for e in events if e.get("log_namespace", "").startswith("paxchat")]


@defer.inlineCallbacks
def write_records(directory, records, **kwargs):
    store, recovered = yield DurableLog.open(reactor(), directory, **kwargs)
    for r in records:
        yield store.append(r)
    yield store.close()
    return recovered


@pytest_twisted.inlineCallbacks
def test_recovery_returns_every_record_in_order(tmp_path):
    records = [b"promise:1", b"", b"accepted:\x00\xff" * 50, os.urandom(5000)]
    first = yield write_records(tmp_path, records)
    assert first == []
    store, recovered = yield DurableLog.open(reactor(), tmp_path)
    assert recovered == records
    yield store.append(b"more")
    yield store.close()
    assert recover_log(tmp_path) == records + [b"more"]


@pytest_twisted.inlineCallbacks
def test_many_small_segments_recover_in_order(tmp_path):
    records = [b"record %d" % i for i in range(40)]
    yield write_records(tmp_path, records, segment_bytes=100)
    assert len(segment_files(tmp_path)) > 5
    _, recovered = yield DurableLog.open(reactor(), tmp_path, segment_bytes=100)
    assert recovered == records


@pytest_twisted.inlineCallbacks
def test_torn_last_record_is_cut_at_every_offset(tmp_path):
    records = [b"first", b"second", b"the last record, torn by a crash"]
    yield write_records(tmp_path, records)
    path = only_segment(tmp_path)
    full = open(path, "rb").read()
    last_length = 16 + len(records[-1])
    start = len(full) - last_length
    for cut in range(start, len(full)):
        with open(path, "wb") as f:
            f.write(full[:cut])
        assert recover_log(tmp_path) == records[:-1], cut
        assert os.path.getsize(path) == start, cut
    # Appending after the cut goes on from a clean tail.
    with open(path, "wb") as f:
        f.write(full[:start + 7])
    yield write_records(tmp_path, [b"after"])
    assert recover_log(tmp_path) == records[:-1] + [b"after"]


@pytest_twisted.inlineCallbacks
def test_garbage_or_zeros_after_the_last_record_are_cut(tmp_path, captured_log):
    records = [b"a", b"b"]
    yield write_records(tmp_path, records)
    path = only_segment(tmp_path)
    good = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(bytes(4096) + b"\x07garbage")
    _, recovered = yield DurableLog.open(reactor(), tmp_path)
    assert recovered == records
    assert os.path.getsize(path) == good
    assert any("torn tail" in m for m in messages(captured_log))


@pytest_twisted.inlineCallbacks
def test_corrupt_record_in_the_middle_refuses_to_start(tmp_path):
    records = [b"one" * 10, b"two" * 10, b"three" * 10]
    yield write_records(tmp_path, records)
    path = only_segment(tmp_path)
    data = bytearray(open(path, "rb").read())
    second = data.index(b"two" * 10)
    data[second + 3] ^= 0x01
    open(path, "wb").write(bytes(data))
    with pytest.raises(CorruptLogError) as info:
        yield DurableLog.open(reactor(), tmp_path)
    assert path in str(info.value)
    assert f"offset {second - 16}" in str(info.value)
    # Nothing was cut: the evidence stays for the operator.
    assert open(path, "rb").read() == bytes(data)


@pytest_twisted.inlineCallbacks
def test_corrupt_length_in_the_middle_refuses_to_start(tmp_path):
    records = [b"x" * 30 for _ in range(5)]
    yield write_records(tmp_path, records)
    path = only_segment(tmp_path)
    data = bytearray(open(path, "rb").read())
    data[21 + 46 * 2] = 0x7F          # length field of the third record
    open(path, "wb").write(bytes(data))
    with pytest.raises(CorruptLogError, match="followed by sound records"):
        yield DurableLog.open(reactor(), tmp_path)


@pytest_twisted.inlineCallbacks
def test_damage_in_an_earlier_segment_refuses_to_start(tmp_path):
    yield write_records(tmp_path, [b"r%d" % i for i in range(20)], segment_bytes=80)
    names = segment_files(tmp_path)
    path = os.path.join(tmp_path, names[0])
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(CorruptLogError, match="not the last"):
        yield DurableLog.open(reactor(), tmp_path)


@pytest_twisted.inlineCallbacks
def test_missing_segment_refuses_to_start(tmp_path):
    yield write_records(tmp_path, [b"r%d" % i for i in range(20)], segment_bytes=80)
    names = segment_files(tmp_path)
    os.unlink(os.path.join(tmp_path, names[1]))
    with pytest.raises(CorruptLogError, match="missing"):
        yield DurableLog.open(reactor(), tmp_path)
    os.unlink(os.path.join(tmp_path, names[0]))           # the first one too
    with pytest.raises(CorruptLogError, match="no base segment"):
        yield DurableLog.open(reactor(), tmp_path)


class CountingFsync:
    """An fsync that counts calls and can be held to model a slow disk."""

    def __init__(self):
        self.calls = 0
        self.release = threading.Event()
        self.release.set()

    def __call__(self, fd):
        self.release.wait(10)
        self.calls += 1
        os.fsync(fd)


@pytest_twisted.inlineCallbacks
def test_concurrent_appends_share_fsyncs(tmp_path):
    fsync = CountingFsync()
    store, _ = yield DurableLog.open(reactor(), tmp_path, fsync=fsync)
    before = fsync.calls
    records = [b"r%d" % i for i in range(200)]
    yield defer.gatherResults([store.append(r) for r in records])
    assert fsync.calls - before <= 2
    assert store.batches <= 2 and store.records_written == 200
    yield store.close()
    assert recover_log(tmp_path) == records


@pytest_twisted.inlineCallbacks
def test_append_fires_only_after_its_fsync(tmp_path):
    fsync = CountingFsync()
    store, _ = yield DurableLog.open(reactor(), tmp_path, fsync=fsync)
    before = fsync.calls
    fsync.release.clear()
    fired = []
    store.append(b"first").addCallback(fired.append)
    second = store.append(b"second")
    second.addCallback(fired.append)
    # Give the disk thread every chance to run; nothing may fire while fsync is held.
    for _ in range(20):
        yield defer.succeed(None)
        d = defer.Deferred()
        reactor().callLater(0, d.callback, None)
        yield d
    assert fired == [] and fsync.calls == before
    fsync.release.set()
    yield second
    assert fired == [None, None]
    assert fsync.calls - before == 2        # "first" alone, then "second"
    yield store.close()


class FailingWriter:
    """os.write until told to fail with ``errno``."""

    def __init__(self):
        self.error = None

    def __call__(self, fd, data):
        if self.error is not None:
            raise OSError(self.error, os.strerror(self.error))
        os.write(fd, data)


@pytest_twisted.inlineCallbacks
def test_full_disk_fails_appends_and_refuses_further_writes(tmp_path, captured_log):
    writer = FailingWriter()
    store, _ = yield DurableLog.open(reactor(), tmp_path, write=writer)
    yield store.append(b"kept")
    writer.error = errno.ENOSPC
    results = [store.append(b"lost %d" % i) for i in range(3)]
    for d in results:
        with pytest.raises(StorageError) as info:
            yield d
        assert str(info.value) == f"{tmp_path}: the disk is full"    # the disk's answer
    assert store.failed is not None
    writer.error = None                       # even if space comes back
    with pytest.raises(StorageError):
        yield store.append(b"later")
    with pytest.raises(StorageError):
        yield store.rewrite([b"x"])
    # Its owner says it, once, as the node stops (test_node.py): not the store too.
    assert [e for e in captured_log if e["log_level"] >= LogLevel.warn] == []
    yield store.close()
    assert recover_log(tmp_path) == [b"kept"]


@pytest_twisted.inlineCallbacks
def test_fsync_error_fails_the_append(tmp_path):
    def broken_fsync(fd):
        raise OSError(errno.EIO, "I/O error")

    store, _ = yield DurableLog.open(reactor(), tmp_path)
    store._files._fsync = broken_fsync
    first = store.append(b"x")
    closing = store.close()                  # queued behind the failing append
    with pytest.raises(StorageError, match="I/O error"):
        yield first
    yield closing


@pytest_twisted.inlineCallbacks
def test_slow_fsync_is_logged(tmp_path, captured_log):
    store, _ = yield DurableLog.open(reactor(), tmp_path, slow_fsync=-1)
    yield store.append(b"x")
    yield store.close()
    assert any("slow fsync" in m for m in messages(captured_log))


@pytest_twisted.inlineCallbacks
def test_bad_records_are_rejected_without_harm(tmp_path):
    store, _ = yield DurableLog.open(reactor(), tmp_path)
    with pytest.raises(TypeError):
        yield store.append("text is not bytes")
    yield store.append(b"fine")
    yield store.close()
    assert recover_log(tmp_path) == [b"fine"]


@pytest_twisted.inlineCallbacks
def test_rewrite_replaces_the_log(tmp_path):
    store, _ = yield DurableLog.open(reactor(), tmp_path, segment_bytes=100)
    for i in range(30):
        yield store.append(b"old %d" % i)
    assert len(segment_files(tmp_path)) > 2
    yield store.rewrite([b"state", b"tail"])
    assert len(segment_files(tmp_path)) == 1
    yield store.append(b"after")
    yield store.close()
    _, recovered = yield DurableLog.open(reactor(), tmp_path)
    assert recovered == [b"state", b"tail", b"after"]


@pytest_twisted.inlineCallbacks
def test_rewrite_interrupted_before_cleanup_recovers_the_new_base(tmp_path):
    """A crash after the rename but before old segments are removed keeps only the new base."""
    store, _ = yield DurableLog.open(reactor(), tmp_path, segment_bytes=60)
    for i in range(10):
        yield store.append(b"old %d" % i)
    yield store.close()
    old = {name: open(os.path.join(tmp_path, name), "rb").read() for name in segment_files(tmp_path)}
    store, _ = yield DurableLog.open(reactor(), tmp_path, segment_bytes=60)
    yield store.rewrite([b"new"])
    yield store.close()
    for name, data in old.items():                 # resurrect the old segments
        if not os.path.exists(os.path.join(tmp_path, name)):
            open(os.path.join(tmp_path, name), "wb").write(data)
    open(os.path.join(tmp_path, "wal-00000000000000ff.log.tmp"), "wb").write(b"half")
    assert recover_log(tmp_path) == [b"new"]
    assert len(segment_files(tmp_path)) == 1


@pytest_twisted.inlineCallbacks
def test_appends_queued_behind_a_rewrite_stay_in_order(tmp_path):
    store, _ = yield DurableLog.open(reactor(), tmp_path)
    results = [store.append(b"a"), store.rewrite([b"base"]), store.append(b"b"), store.append(b"c")]
    yield defer.gatherResults(results)
    yield store.close()
    assert recover_log(tmp_path) == [b"base", b"b", b"c"]


@pytest_twisted.inlineCallbacks
def test_snapshot_round_trip_and_corruption(tmp_path):
    store, _ = yield DurableLog.open(reactor(), tmp_path)
    assert (yield store.load_snapshot()) is None
    yield store.save_snapshot(42, [b"chunk one", b"", b"x" * 70000])
    assert (yield store.load_snapshot()) == (42, [b"chunk one", b"", b"x" * 70000])
    yield store.save_snapshot(43, iter([b"newer"]))
    assert (yield store.load_snapshot()) == (43, [b"newer"])
    path = os.path.join(tmp_path, "snapshot")
    data = bytearray(open(path, "rb").read())
    data[-12] ^= 1
    open(path, "wb").write(bytes(data))
    with pytest.raises(CorruptLogError, match="snapshot"):
        yield store.load_snapshot()
    yield store.close()


def test_a_flipped_byte_anywhere_is_refused_or_cut_never_misread(tmp_path):
    """Recovery after any single damaged byte gives a prefix of the log up to the damage, or refuses."""
    from hypothesis import given, settings, strategies as st

    from paxchat.paxos.store import _LogFiles, _default_write

    directory = tmp_path / "log"
    files = _LogFiles(directory, 1 << 20, _default_write, os.fsync)
    files.recover()
    records = [bytes([i]) * (i * 7 % 40) for i in range(12)]
    for r in records:
        files.append_batch([r])
    files.close()
    path = only_segment(directory)
    pristine = open(path, "rb").read()
    starts = []
    offset = 21
    for r in records:
        starts.append(offset)
        offset += 16 + len(r)

    @settings(max_examples=60, deadline=None)
    @given(st.integers(0, len(pristine) - 1), st.integers(1, 255))
    def check(position, flip):
        data = bytearray(pristine)
        data[position] ^= flip
        with open(path, "wb") as f:
            f.write(bytes(data))
        damaged = sum(1 for s in starts if s <= position)        # records wholly before it
        try:
            recovered = recover_log(directory)
        except CorruptLogError:
            return
        assert recovered == records[:len(recovered)]
        assert len(recovered) >= damaged - 1

    check()


@pytest_twisted.inlineCallbacks
def test_a_log_open_in_one_place_refuses_a_second_opener_until_closed(tmp_path):
    first, _ = yield DurableLog.open(reactor(), tmp_path)
    yield first.append(b"mine")
    with pytest.raises(StorageError, match="in use by another process"):
        yield DurableLog.open(reactor(), tmp_path)
    yield first.append(b"still mine")           # the refused opener changed nothing
    yield first.close()
    second, recovered = yield DurableLog.open(reactor(), tmp_path)
    assert recovered == [b"mine", b"still mine"]
    yield second.close()


def test_the_lock_is_held_across_processes(tmp_path):
    import subprocess
    import sys
    import fcntl
    holder = open(tmp_path / "lock", "w")
    fcntl.flock(holder, fcntl.LOCK_EX)          # as another process's open log would
    try:
        probe = subprocess.run(
            [sys.executable, "-c",
             "import sys; from paxchat.paxos.store import _LogFiles, StorageError\n"
             "files = _LogFiles(sys.argv[1], 1 << 20, None, None)\n"
             "try: files.recover()\n"
             "except StorageError as e: print('refused:', e); sys.exit(3)\n",
             str(tmp_path)], capture_output=True, text=True, timeout=30)
    finally:
        holder.close()
    assert probe.returncode == 3, probe.stderr
    assert "in use by another process" in probe.stdout
    assert not list(tmp_path.glob("wal-*.log")), "the refused opener created a segment"
