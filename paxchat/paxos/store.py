"""The acceptor's durable log: records fsynced before the reply that depends on them.

An acceptor must never forget a promise or an accepted value it has answered
with, so every record is written and fsynced before its ``append`` Deferred
fires. Records are opaque bytes here (``paxos/messages.py`` encodes them).

Layout of the log directory::

    wal-<first seq, 16 hex>.log   segments, in sequence order
    snapshot                      an optional checksummed snapshot blob
    lock                          held (flock) by the one process using the log

Two processes on one log (a node started twice, two nodes given the same
data directory) would cut each other's records as torn tails: the second
open finds the lock held and refuses, with the directory in the message.

A segment starts with a header (magic, the sequence number of its first
record, whether it is a *base*, CRC32). Every record is framed as
``length (u32) | seq (u64) | crc32(length, seq, payload) (u32) | payload``;
sequence numbers run on across segments, so a lost segment is noticed.
A base segment, written by ``rewrite``, supersedes every segment before it.

Recovery cuts a torn or corrupt tail of the last segment (what a crash in the
middle of an un-acknowledged write leaves) but refuses to start on a bad
record that is followed by good ones, or on any damage in an earlier segment:
that is durable state lost, and a node must never answer from state it cannot
trust.

All disk work runs on one dedicated thread per store (and one more for
snapshot blobs, so a large snapshot never delays an fsync). Appends that
arrive while a write+fsync is running are written together by the next one
(group commit).
"""

import collections
import contextlib
import errno
import fcntl
import os
import queue
import re
import struct
import threading
import time
import zlib

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["DurableLog", "StorageError", "CorruptLogError", "fsync_directory", "recover_log", "rewrite_log"]

log = Logger(namespace="paxchat.paxos.store")

SEGMENT_MAGIC = b"PXWAL\x00\x01\n"
_SEG_HEADER = struct.Struct(">8sQB")          # magic, first seq, kind
_SEG_HEADER_SIZE = _SEG_HEADER.size + 4      # + crc32
_REC_HEADER = struct.Struct(">IQ")           # length, seq
_REC_HEADER_SIZE = _REC_HEADER.size + 4      # + crc32
KIND_CONTINUATION = 0
KIND_BASE = 1

MAX_RECORD_BYTES = 64 * 1024 * 1024
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
SLOW_FSYNC_SECONDS = 0.1

_SEGMENT_NAME = re.compile(r"^wal-([0-9a-f]{16})\.log$")
SNAPSHOT_NAME = "snapshot"
LOCK_NAME = "lock"
SNAPSHOT_MAGIC = b"PXSNAP\x00\x01"
_SNAP_HEADER = struct.Struct(">8sQ")         # magic, index
_CHUNK_HEADER = struct.Struct(">II")         # length, crc32
_SNAP_END = 0xFFFFFFFF                       # chunk length that marks the end


class StorageError(Exception):
    """The disk failed us; the store refuses further writes rather than lose any."""


class CorruptLogError(StorageError):
    """Durable state is damaged; the node must not start from it."""


def _frame(seq, payload):
    head = _REC_HEADER.pack(len(payload), seq)
    crc = zlib.crc32(payload, zlib.crc32(head))
    return head + struct.pack(">I", crc) + payload


def _segment_header(first_seq, kind):
    head = _SEG_HEADER.pack(SEGMENT_MAGIC, first_seq, kind)
    return head + struct.pack(">I", zlib.crc32(head))


def _parse_record(data, offset, expected_seq=None):
    """The (payload, end offset) of a sound record at ``offset``, or None."""
    if len(data) - offset < _REC_HEADER_SIZE:
        return None
    length, seq = _REC_HEADER.unpack_from(data, offset)
    (crc,) = struct.unpack_from(">I", data, offset + _REC_HEADER.size)
    start = offset + _REC_HEADER_SIZE
    end = start + length
    if length > MAX_RECORD_BYTES or end > len(data):
        return None
    if expected_seq is not None and seq != expected_seq:
        return None
    payload = bytes(data[start:end])
    if zlib.crc32(payload, zlib.crc32(data[offset:offset + _REC_HEADER.size])) != crc:
        return None
    return seq, payload, end


_ZEROS = bytes(12)
_NONZERO = re.compile(rb"[^\x00]")


def _sound_record_after(data, bad_offset, expected_seq):
    """Whether a sound record with a plausible sequence number follows ``bad_offset``.

    That is what tells damage in the middle (refuse) from a torn tail (cut).
    Candidates are found by the high bytes of the sequence number, so the
    scan stays fast on a large segment.
    """
    window = 1 << 16
    for base in {expected_seq >> 16, (expected_seq >> 16) + 1}:
        prefix = struct.pack(">Q", base << 16)[:6]
        position = bad_offset + 1 + 4
        while True:
            found = data.find(prefix, position)
            if found < 0:
                break
            candidate = found - 4
            if data[candidate:candidate + 12] == _ZEROS:
                # A zero-filled stretch (what a crash can leave); no record
                # starts with 12 zero bytes, so skip to near its end.
                nonzero = _NONZERO.search(data, candidate)
                if nonzero is None:
                    break
                position = max(found + 1, nonzero.start() - 12 + 4)
                continue
            position = found + 1
            parsed = _parse_record(data, candidate)
            if parsed and expected_seq <= parsed[0] < expected_seq + 2 * window:
                return True
    return False


def _default_write(fd, data):
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_directory(directory, fsync=os.fsync):
    """Make a rename or a new file in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fsync(fd)
    finally:
        os.close(fd)


class _LogFiles:
    """The blocking half of the log; only ever used from the store's disk thread."""

    def __init__(self, directory, segment_bytes, write, fsync):
        self.directory = os.fspath(directory)
        self.segment_bytes = segment_bytes
        self._write = write
        self._fsync = fsync
        self.fd = None
        self.path = None
        self.size = 0
        self.next_seq = 1
        self.notes = []          # (level, message) for the reactor side to log
        self._lock_fd = None

    def _segment_path(self, first_seq):
        return os.path.join(self.directory, f"wal-{first_seq:016x}.log")

    def _segments(self):
        found = []
        for name in os.listdir(self.directory):
            match = _SEGMENT_NAME.match(name)
            if match:
                found.append((int(match.group(1), 16), os.path.join(self.directory, name)))
        return sorted(found)

    def _read_header(self, path, data, first_seq):
        if len(data) < _SEG_HEADER_SIZE:
            raise CorruptLogError(f"{path}: segment header is cut short ({len(data)} bytes); refusing to start")
        magic, seq, kind = _SEG_HEADER.unpack_from(data, 0)
        (crc,) = struct.unpack_from(">I", data, _SEG_HEADER.size)
        if magic != SEGMENT_MAGIC or crc != zlib.crc32(data[:_SEG_HEADER.size]) or seq != first_seq:
            raise CorruptLogError(f"{path}: segment header at offset 0 is damaged; refusing to start")
        return kind

    def recover(self):
        """Every durable record in order, after cutting a torn tail."""
        os.makedirs(self.directory, exist_ok=True)
        self._lock()
        try:
            return self._recover()
        except BaseException:
            self._unlock()
            raise

    def _lock(self):
        fd = os.open(os.path.join(self.directory, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            _flock(fd, self.directory)
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def _unlock(self):
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)               # releases the flock

    def _recover(self):
        for name in os.listdir(self.directory):
            if name.endswith(".tmp"):
                os.unlink(os.path.join(self.directory, name))
        segments = self._segments()
        if not segments:
            self._create_segment(1, KIND_BASE, b"")
            return []
        contents = []
        base = None
        for i, (first_seq, path) in enumerate(segments):
            with open(path, "rb") as f:
                data = f.read()
            kind = self._read_header(path, data, first_seq)
            contents.append(data)
            if kind == KIND_BASE:
                base = i
        if base is None:
            raise CorruptLogError(
                f"{segments[0][1]}: no base segment (the log's first segment is missing);"
                " refusing to start")
        if base:
            for _, path in segments[:base]:
                os.unlink(path)
            fsync_directory(self.directory, self._fsync)
            segments, contents = segments[base:], contents[base:]
        records = []
        expected = segments[0][0]
        for i, ((first_seq, path), data) in enumerate(zip(segments, contents)):
            last = i == len(segments) - 1
            if first_seq != expected:
                raise CorruptLogError(
                    f"{path}: starts at record {first_seq} but record {expected} was expected"
                    " (a segment is missing or damaged); refusing to start")
            offset = _SEG_HEADER_SIZE
            while offset < len(data):
                parsed = _parse_record(data, offset, expected)
                if parsed is None:
                    if not last:
                        raise CorruptLogError(
                            f"{path}: damaged record at offset {offset} in a segment that is not"
                            " the last; refusing to start")
                    if _sound_record_after(data, offset, expected):
                        raise CorruptLogError(
                            f"{path}: damaged record at offset {offset} followed by sound records;"
                            " refusing to start")
                    self._truncate(path, offset)
                    self.notes.append(("warn", f"{path}: cut a torn tail of {len(data) - offset}"
                                               f" bytes at offset {offset}"))
                    data = data[:offset]
                    break
                _, payload, offset = parsed
                records.append(payload)
                expected += 1
        self.next_seq = expected
        self._open_for_append(segments[-1][1])
        return records

    def _truncate(self, path, offset):
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, offset)
            self._fsync(fd)
        finally:
            os.close(fd)

    def _open_for_append(self, path):
        if self.fd is not None:
            os.close(self.fd)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self.path = path
        self.size = os.fstat(self.fd).st_size

    def _create_segment(self, first_seq, kind, body):
        """Write a whole segment beside its final name, fsync, rename, fsync the directory."""
        path = self._segment_path(first_seq)
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self._write(fd, _segment_header(first_seq, kind) + body)
            self._fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_directory(self.directory, self._fsync)
        self._open_for_append(path)
        return path

    def append_batch(self, records):
        """Write and fsync ``records`` as one batch; return the fsync's duration."""
        body = b"".join(_frame(self.next_seq + i, r) for i, r in enumerate(records))
        self._write(self.fd, body)
        started = time.monotonic()
        self._fsync(self.fd)
        took = time.monotonic() - started
        self.next_seq += len(records)
        self.size += len(body)
        if self.size >= self.segment_bytes:
            self._create_segment(self.next_seq, KIND_CONTINUATION, b"")
        return took

    def rewrite(self, records):
        """Replace the whole log by ``records``, atomically, as a new base segment."""
        first = self.next_seq
        body = b"".join(_frame(first + i, r) for i, r in enumerate(records))
        old = [path for seq, path in self._segments() if seq != first]
        self._create_segment(first, KIND_BASE, body)
        for path in old:
            os.unlink(path)
        fsync_directory(self.directory, self._fsync)
        self.next_seq = first + len(records)
        self.size = _SEG_HEADER_SIZE + len(body)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self._unlock()

    # Snapshots: one checksummed blob, replaced atomically.

    def save_snapshot(self, index, chunks):
        path = os.path.join(self.directory, SNAPSHOT_NAME)
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self._write(fd, _SNAP_HEADER.pack(SNAPSHOT_MAGIC, index))
            total = 0
            for chunk in chunks:
                chunk = bytes(chunk)
                if len(chunk) >= _SNAP_END:
                    raise ValueError("snapshot chunk too large")
                self._write(fd, _CHUNK_HEADER.pack(len(chunk), zlib.crc32(chunk)) + chunk)
                total += 1
            self._write(fd, _CHUNK_HEADER.pack(_SNAP_END, total))
            self._fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_directory(self.directory, self._fsync)

    def load_snapshot(self):
        path = os.path.join(self.directory, SNAPSHOT_NAME)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        if len(data) < _SNAP_HEADER.size or data[:8] != SNAPSHOT_MAGIC:
            raise CorruptLogError(f"{path}: snapshot header at offset 0 is damaged")
        _, index = _SNAP_HEADER.unpack_from(data, 0)
        offset = _SNAP_HEADER.size
        chunks = []
        while True:
            if len(data) - offset < _CHUNK_HEADER.size:
                raise CorruptLogError(f"{path}: snapshot is cut short at offset {offset}")
            length, crc = _CHUNK_HEADER.unpack_from(data, offset)
            if length == _SNAP_END:
                if crc != len(chunks) or offset + _CHUNK_HEADER.size != len(data):
                    raise CorruptLogError(f"{path}: snapshot trailer at offset {offset} is damaged")
                return index, chunks
            start = offset + _CHUNK_HEADER.size
            chunk = data[start:start + length]
            if len(chunk) != length or zlib.crc32(chunk) != crc:
                raise CorruptLogError(f"{path}: snapshot chunk at offset {offset} is damaged")
            chunks.append(chunk)
            offset = start + length


def _flock(fd, directory):
    """Take the log's lock on ``fd``, or StorageError if a process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StorageError(f"{directory} is in use by another process (a node started twice,"
                           " or two nodes with one data directory); refusing to open it") from None


@contextlib.contextmanager
def locked(directory):
    """Hold the lock of the log in ``directory``, if it has one, for the with-block.

    Raises StorageError if a process holds it, so a running node's log is
    neither copied nor started on twice. Opened read-only: a log on a
    read-only copy can still be checked.
    """
    try:
        fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDONLY)
    except FileNotFoundError:
        yield                          # no node ever ran on it
        return
    try:
        _flock(fd, directory)
        yield
    finally:
        os.close(fd)                   # releases the flock


def recover_log(directory):
    """Read (and repair the tail of) a log directory without a reactor; for tools and tests."""
    files = _LogFiles(directory, DEFAULT_SEGMENT_BYTES, _default_write, os.fsync)
    try:
        return files.recover()
    finally:
        files.close()


def rewrite_log(directory, records):
    """Make ``records`` the whole log in ``directory`` without a reactor; for tools.

    The directory is created if missing. A log in use by a running node
    is refused (its lock is held), like a second ``DurableLog.open``.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    files = _LogFiles(directory, DEFAULT_SEGMENT_BYTES, _default_write, os.fsync)
    try:
        files.recover()
        files.rewrite(records)
    finally:
        files.close()


class _DiskThread:
    """One dedicated thread running blocking calls in order; results return via the reactor."""

    def __init__(self, reactor, name):
        self._reactor = reactor
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def run(self, fn, *args):
        d = Deferred()
        self._queue.put((fn, args, d))
        return d

    def stop(self):
        """Let queued work finish, then end the thread; fires when it has."""
        d = self.run(lambda: None)
        self._queue.put(None)
        return d

    def _loop(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args, d = item
            try:
                result = fn(*args)
            except BaseException:
                self._reactor.callFromThread(d.errback, Failure())
            else:
                self._reactor.callFromThread(d.callback, result)


class DurableLog:
    """The acceptor's log: ``append`` fires once the record is on disk for good.

    Create it with ``DurableLog.open``; all methods are called from the
    reactor thread and return Deferreds.
    """

    def __init__(self, reactor, files, slow_fsync=SLOW_FSYNC_SECONDS):
        self._reactor = reactor
        self._files = files
        self._disk = None
        self._snapshots = None
        self._slow_fsync = slow_fsync
        self._queue = collections.deque()    # ("append", record, d) | (op, args, d)
        self._busy = False
        self._error = None
        self._closed = False
        self.batches = 0                     # write+fsync rounds, for metrics
        self.records_written = 0
        self.fsync_seconds_total = 0.0
        self.fsync_observer = None           # fn(seconds) per write+fsync round, for metrics

    @classmethod
    def open(cls, reactor, directory, *, segment_bytes=DEFAULT_SEGMENT_BYTES,
             write=_default_write, fsync=os.fsync, slow_fsync=SLOW_FSYNC_SECONDS):
        """Recover the log in ``directory`` (created if missing).

        @return: a Deferred firing with ``(log, records)``, every durable
            record in append order, or failing with L{CorruptLogError}.
        """
        files = _LogFiles(directory, segment_bytes, write, fsync)
        store = cls(reactor, files, slow_fsync)
        store._start_threads()

        def refused(failure):
            log.failure("cannot open the log in {directory}", failure, directory=files.directory)
            store._disk.stop()
            store._snapshots.stop()
            return failure

        return store._disk.run(files.recover).addCallbacks(store._recovered, refused)

    @classmethod
    def open_now(cls, reactor, directory, *, segment_bytes=DEFAULT_SEGMENT_BYTES,
                 write=_default_write, fsync=os.fsync, slow_fsync=SLOW_FSYNC_SECONDS):
        """``open``, recovering on the calling thread: ``(log, records)``, or it raises.

        A node recovers its log so before it listens or tells systemd it is
        ready: a damaged log (L{CorruptLogError}) stops the start itself.
        """
        files = _LogFiles(directory, segment_bytes, write, fsync)
        records = files.recover()
        store = cls(reactor, files, slow_fsync)
        store._start_threads()
        return store._recovered(records)

    def _start_threads(self):
        self._disk = _DiskThread(self._reactor, f"paxchat-log:{self._files.directory}")
        self._snapshots = _DiskThread(self._reactor, f"paxchat-snapshot:{self._files.directory}")

    def _recovered(self, records):
        files = self._files
        for level, message in files.notes:
            getattr(log, level)("{message}", message=message)
        files.notes.clear()
        log.info("recovered {count} records from {directory}", count=len(records),
                 directory=files.directory)
        return self, records

    @property
    def failed(self):
        """The StorageError that stopped this store, or None."""
        return self._error

    @property
    def size_bytes(self):
        """Bytes in the current segment; a hint for when to compact."""
        return self._files.size

    def append(self, record):
        """Persist ``record`` (bytes); the Deferred fires after its fsync."""
        if not isinstance(record, (bytes, bytearray, memoryview)):
            return fail(TypeError(f"a log record is bytes, not {type(record).__name__}"))
        if len(record) > MAX_RECORD_BYTES:
            return fail(ValueError(f"log record of {len(record)} bytes exceeds {MAX_RECORD_BYTES}"))
        return self._enqueue("append", bytes(record))

    def rewrite(self, records):
        """Atomically replace the log by just ``records`` (after a snapshot)."""
        records = [bytes(r) for r in records]
        if any(len(r) > MAX_RECORD_BYTES for r in records):
            return fail(ValueError(f"a log record exceeds {MAX_RECORD_BYTES} bytes"))
        return self._enqueue("rewrite", records)

    def save_snapshot(self, index, chunks):
        """Durably replace the stored snapshot by ``chunks`` (bytes), taken at ``index``."""
        if self._error is not None:
            return fail(self._error)
        if self._closed:
            return fail(StorageError("the log is closed"))
        chunks = [bytes(c) for c in chunks]
        return self._snapshots.run(self._files.save_snapshot, index, chunks).addErrback(
            self._snapshot_failed, "save")

    def load_snapshot(self):
        """The stored snapshot as ``(index, [chunk, ...])``, or None."""
        if self._closed:
            return fail(StorageError("the log is closed"))
        return self._snapshots.run(self._files.load_snapshot).addErrback(
            self._snapshot_failed, "load")

    def close(self):
        """Finish what is queued, close the files and end the disk threads (even after a failure)."""
        if self._closed:
            return succeed(None)
        self._closed = True
        d = Deferred()
        self._queue.append(("close", None, d))
        self._kick()
        d.addBoth(lambda result: self._snapshots.stop().addCallback(lambda _: result))
        d.addBoth(lambda result: self._disk.stop().addCallback(lambda _: result))
        return d

    def _enqueue(self, op, payload):
        if self._error is not None:
            return fail(self._error)
        if self._closed:
            return fail(StorageError("the log is closed"))
        d = Deferred()
        self._queue.append((op, payload, d))
        self._kick()
        return d

    def _kick(self):
        if self._busy or not self._queue:
            return
        op = self._queue[0][0]
        if op == "append":
            batch = []
            while self._queue and self._queue[0][0] == "append":
                batch.append(self._queue.popleft())
            work = self._disk.run(self._files.append_batch, [r for _, r, _ in batch])
            work.addCallback(self._batch_written, batch)
        else:
            item = self._queue.popleft()
            batch = [item]
            if op == "rewrite":
                work = self._disk.run(self._files.rewrite, item[1])
            else:
                work = self._disk.run(self._files.close)
            work.addCallback(lambda _: [d.callback(None) for _, _, d in batch])
        self._busy = True
        work.addErrback(self._write_failed, op, batch)
        work.addBoth(self._done)

    def _batch_written(self, fsync_seconds, batch):
        self.batches += 1
        self.records_written += len(batch)
        self.fsync_seconds_total += fsync_seconds
        if self.fsync_observer is not None:
            self.fsync_observer(fsync_seconds)
        if fsync_seconds > self._slow_fsync:
            log.warn("slow fsync: {ms:.0f} ms for {count} records", ms=fsync_seconds * 1000,
                     count=len(batch))
        for _, _, d in batch:
            d.callback(None)

    def _write_failed(self, failure, op, batch):
        error = failure.value
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            reason = "the disk is full"
        else:
            reason = f"{type(error).__name__}: {error}"
        # Every later write fails with it too (StorageError: rather than lose any).
        self._error = StorageError(f"{self._files.directory}: {reason}")
        self._error.__cause__ = error
        if isinstance(error, OSError):
            # The disk's answer (full, read-only, an I/O error) says it all, and
            # every append and rewrite waiting is failed with it: the replicated
            # log stops the node with it, and the node says so in one line. A
            # close fails while the node stops, where no one says why: here.
            if op == "close":
                log.error("log close failed ({reason})", reason=reason)
        else:
            log.failure("log {op} failed; the store refuses further writes", failure, op=op)
        closing = [item for item in self._queue if item[0] == "close"]
        waiting = batch + [item for item in self._queue if item[0] != "close"]
        self._queue = collections.deque(closing)
        for _, _, d in waiting:
            d.errback(Failure(self._error))

    def _done(self, _):
        self._busy = False
        self._kick()

    def _snapshot_failed(self, failure, what):
        log.failure("snapshot {what} failed", failure, what=what)
        if what == "save" and not failure.check(ValueError):
            return Failure(StorageError(f"saving the snapshot failed: {failure.value}"))
        return failure
