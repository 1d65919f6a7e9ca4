"""An ordered key-value store on SQLite for the replicated state.

Why SQLite: durable (WAL), ordered range scans on a clustered primary key,
and transactions in which the applied log index moves together with the
writes it covers, so replay after a crash applies every command exactly
once.

Two durability modes. ``durable=True`` (synchronous=FULL) fsyncs every
commit: for a store that is its own record of what was acknowledged.
``durable=False`` (synchronous=NORMAL) commits without an fsync: for a
store fed from a log that is already durable (the Paxos log), where a
crash may lose the last commits but never tears one, and the log replays
what was lost. Such a store is made durable with ``sync()`` before the log
forgets anything it covers.

Such a store may also commit in groups (``group()``): the applies of many
log slots share one transaction, committed once it covers ``GROUP_SLOTS``
slots or is ``GROUP_SECONDS`` old. Every commit writes each page it
changed to the WAL, and a slot's messages touch pages all over the tree
(each user's history, conversations, unread list), so committing 256 slots
at once writes the shared pages once instead of 256 times (`bench apply`,
one slot of 7 messages per call: 6.9 KiB written per message with groups
of 64 slots, 2.6 KiB with 256, 1.9 KiB with 512). Reads on this
connection see the open group; a crash loses at most the group, which the
log replays like any other lost commit.

Keys are ``str`` (compared by code point, which is the byte order of their
UTF-8 encoding that SQLite uses); values are ``bytes``. The store is not
thread-safe: one thread uses it at a time (the StateWorker's). Snapshots
read through their own connection, so a snapshot stays consistent while
the owner keeps writing.
"""

import contextlib
import glob
import hashlib
import os
import sqlite3
import struct
import tempfile
import time
from pathlib import Path

FORMAT_VERSION = 1
SNAPSHOT_MAGIC = b"PAXCHAT-KV-SNAPSHOT\x02"
SNAPSHOT_CHUNK_BYTES = 256 * 1024
RESTORE_SUFFIX = ".restore.part"    # the image of a snapshot being received or installed
SNAPSHOT_SUFFIX = ".snapshot.part"  # <store>.<random>.snapshot.part: one being read for a peer
GROUP_SLOTS = 256
GROUP_SECONDS = 1.0     # under steady load the slot count ends a group first
CACHE_KEYS = 16384      # values kept in memory at most (see KVStore.cache_keys)

# What SQLite says when the file cannot be used here and now, not that it is
# damaged: no permission, a read-only or full disk, a lock, an I/O error. The
# node's data may be whole; moving it aside to rebuild would be wrong advice.
_CANNOT_USE = frozenset({sqlite3.SQLITE_PERM, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_READONLY,
                         sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN})
CANNOT_USE_HINT = ("the node's user must be able to write it and its directory, on a disk"
                   " mounted read-write with space free")

_RECORD = b"R"
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO meta (name, value) VALUES ('format', %d)" % FORMAT_VERSION,
    "INSERT OR IGNORE INTO meta (name, value) VALUES ('applied_index', 0)",
)


class StoreError(Exception):
    """The database file cannot be used; the message names the file."""


class CorruptStore(StoreError):
    """The database file is unreadable, damaged, or not a paxchat state."""


class SnapshotError(ValueError):
    """A snapshot stream is malformed; restoring it changed nothing."""


def prefix_end(prefix):
    """The smallest key above every key that starts with ``prefix`` (None: no bound)."""
    chars = list(prefix)
    while chars:
        code = ord(chars[-1]) + 1
        if code == 0xD800:  # skip surrogates: they have no UTF-8 form
            code = 0xE000
        if code <= 0x10FFFF:
            chars[-1] = chr(code)
            return "".join(chars)
        chars.pop()
    return None


def _quick_check(conn, path):
    result = conn.execute("PRAGMA quick_check").fetchone()[0]
    if result != "ok":
        # Its report can run to a hundred lines; the first problem names the place.
        problems = [line for line in result.splitlines() if not line.startswith("***")]
        more = " (and more)" if len(problems) > 1 else ""
        raise CorruptStore(f"state database {path} is damaged: {problems[0] if problems else result}{more}")


def _unusable(exc, path):
    """A L{StoreError} for a SQLite error that says the file cannot be used (see
    L{_CANNOT_USE}), else None: the error is the file's own."""
    if (getattr(exc, "sqlite_errorcode", 0) & 0xFF) not in _CANNOT_USE:
        return None
    return StoreError(f"cannot use state database {path}: {exc} ({CANNOT_USE_HINT})")


def _connect(path):
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


class KVStore:
    """An ordered str -> bytes map plus the applied log index, in one SQLite file."""

    def __init__(self, path, conn, durable=True):
        self.path = path
        self._conn = conn
        self.durable = durable
        self._savepoints = 0
        self.writes = 0  # writes made through this store: tells a caller whether a block wrote
        self._cached_prefixes = ()
        self._cache_limit = CACHE_KEYS
        self._cache = {}  # key -> value, for keys with a cached prefix (see cache_keys)
        self._group = None  # [monotonic start, slots] while a group transaction is open
        self._incoming = None  # [reader, file, bytes so far] of a snapshot being received

    @classmethod
    def open(cls, path, check=False, durable=True):
        """Open or create the store at ``path``.

        A file that is not a SQLite database, is damaged, or holds another
        schema raises L{CorruptStore}; it is never reset. One SQLite cannot
        use (no permission, a read-only or full disk, an I/O error) raises a
        plain L{StoreError} saying so. ``check=True``
        also runs SQLite's quick_check (reads the whole file). ``durable``:
        fsync each commit (see the module docstring).
        """
        path = os.fspath(path)
        existed = os.path.exists(path) and os.path.getsize(path) > 0
        for left in [path + RESTORE_SUFFIX, *glob.glob(glob.escape(path) + ".*" + SNAPSHOT_SUFFIX)]:
            with contextlib.suppress(OSError):
                os.unlink(left)                     # a restore or snapshot cut short by a crash
        try:
            conn = _connect(path)
        except sqlite3.Error as e:
            raise (_unusable(e, path) or StoreError(f"cannot open state database {path}: {e}")) from e
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"state database {path}: cannot use WAL (journal_mode={mode})")
            conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
            conn.execute("PRAGMA cache_size = -16384")
            # Each log entry runs in a savepoint; SQLite keeps the original of
            # every page a savepoint changes in a sub-journal, by default a temp
            # file (~45 KiB written per applied message when each command had
            # its own savepoint). In memory it costs no I/O.
            conn.execute("PRAGMA temp_store = MEMORY")
            tables = {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if existed and not {"kv", "meta"} <= tables:
                raise CorruptStore(
                    f"state database {path} is not a paxchat state (tables: {sorted(tables)})")
            if check:
                _quick_check(conn, path)
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute("COMMIT")
            version = conn.execute("SELECT value FROM meta WHERE name = 'format'").fetchone()[0]
            if version != FORMAT_VERSION:
                raise CorruptStore(
                    f"state database {path} has format {version}, expected {FORMAT_VERSION}")
        except StoreError:
            conn.close()
            raise
        except sqlite3.DatabaseError as e:
            conn.close()
            raise (_unusable(e, path) or CorruptStore(
                f"state database {path} is unreadable or damaged: {e}")) from e
        return cls(path, conn, durable)

    def check(self):
        """Raise L{CorruptStore} if SQLite's quick_check finds damage (it reads the whole file)."""
        try:
            _quick_check(self._conn, self.path)
        except sqlite3.DatabaseError as e:
            raise (_unusable(e, self.path) or CorruptStore(
                f"state database {self.path} is unreadable or damaged: {e}")) from e

    def sync(self):
        """Commit an open group, and make every commit so far durable (an fsync of the WAL)."""
        self.commit_group()
        if self._conn.in_transaction:
            raise RuntimeError("sync() makes committed work durable: not inside a transaction")
        if self.durable:
            return
        conn = self._conn
        conn.execute("PRAGMA synchronous = FULL")
        try:
            # In WAL mode a FULL commit fsyncs the WAL, and with it every
            # earlier commit in it; rewriting the applied index gives it a page to write.
            with self.transaction():
                self.set_applied_index(self.applied_index())
        finally:
            conn.execute("PRAGMA synchronous = NORMAL")

    def close(self):
        self._drop_incoming()
        if self._conn is not None:
            try:
                self.commit_group()
            finally:
                self._conn.close()
                self._conn = None

    @property
    def closed(self):
        return self._conn is None

    def error(self, exc):
        """A L{StoreError} naming this store's file, for a SQLite failure."""
        kind = CorruptStore if type(exc) is sqlite3.DatabaseError else StoreError
        return kind(f"state database {self.path}: {exc}")

    # -- transactions ---------------------------------------------------

    @property
    def in_transaction(self):
        return self._conn.in_transaction

    @contextlib.contextmanager
    def transaction(self):
        """Run the block in one write transaction: all of it commits, or none.

        An open group commits first."""
        self.commit_group()
        self._begin()
        try:
            yield self
        except BaseException:
            self._roll_back()
            raise
        else:
            self._conn.execute("COMMIT")

    def _begin(self):
        if self._conn.in_transaction:
            raise RuntimeError("transactions do not nest; use savepoint()")
        self._conn.execute("BEGIN IMMEDIATE")

    def _roll_back(self):
        """Undo the open transaction, unless SQLite already did (an I/O error, a full disk)."""
        self._cache.clear()
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    @contextlib.contextmanager
    def group(self, slots=1):
        """Run the block in the open group transaction, opening one if needed.

        The group commits after the block once it holds ``GROUP_SLOTS``
        slots (``slots`` is what this block adds) or is ``GROUP_SECONDS``
        old; ``commit_group()`` commits it at once. If the block raises,
        the whole group rolls back, earlier blocks included: only for a
        store fed from a durable log whose owner stops and replays from it
        on any failure (see the module docstring). A savepoint per block
        would undo less, but SQLite then keeps every page each command's
        own savepoint journals until the block ends: 1.7x the cost of
        applying a 1,024-slot batch.
        """
        if self._group is None:
            self._begin()
            self._group = [time.monotonic(), 0]
        try:
            yield self
        except BaseException:
            self._group = None
            self._roll_back()
            raise
        group = self._group
        group[1] += slots
        if group[1] >= GROUP_SLOTS or time.monotonic() - group[0] >= GROUP_SECONDS:
            self.commit_group()

    def commit_group(self):
        """Commit the open group transaction, if any."""
        if self._group is None:
            return
        self._group = None
        try:
            self._conn.execute("COMMIT")
        except BaseException:
            self._roll_back()
            raise

    @property
    def group_open(self):
        return self._group is not None

    @contextlib.contextmanager
    def savepoint(self):
        """Inside a transaction: if the block raises, undo only its own writes."""
        if not self._conn.in_transaction:
            raise RuntimeError("savepoint() needs an open transaction")
        name = f"sp{self._savepoints}"
        self._savepoints += 1
        self._conn.execute(f"SAVEPOINT {name}")
        try:
            yield self
        except BaseException:
            self._cache.clear()
            if self._conn.in_transaction:  # else SQLite already rolled everything back
                self._conn.execute(f"ROLLBACK TO {name}")
                self._conn.execute(f"RELEASE {name}")
            raise
        else:
            self._conn.execute(f"RELEASE {name}")
        finally:
            self._savepoints -= 1

    def _require_transaction(self):
        if not self._conn.in_transaction:
            raise RuntimeError("writes need an open transaction()")

    # -- applied index --------------------------------------------------

    def applied_index(self):
        return self._conn.execute(
            "SELECT value FROM meta WHERE name = 'applied_index'").fetchone()[0]

    def set_applied_index(self, index):
        self._require_transaction()
        self._conn.execute("UPDATE meta SET value = ? WHERE name = 'applied_index'", (index,))

    # -- point operations -----------------------------------------------

    def cache_keys(self, prefixes, at_most=CACHE_KEYS):
        """Keep the values of keys starting with one of ``prefixes`` in memory too.

        For small values read over and over (a session, an account): each
        read saves a statement. Writes through this store update the copy;
        a rollback or a restore drops every copy. No more than ``at_most``
        are kept: past that the copies start anew.
        """
        self._cached_prefixes = tuple(prefixes)
        self._cache_limit = at_most
        self._cache.clear()

    def _cache_put(self, key, value):
        cache = self._cache
        if value is None or type(value) is not bytes:
            cache.pop(key, None)
            return
        if len(cache) >= self._cache_limit:
            cache.clear()
        cache[key] = value

    def get(self, key):
        cached = key.startswith(self._cached_prefixes)
        if cached:
            value = self._cache.get(key)
            if value is not None:
                return value
        row = self._conn.execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
        if row is None:
            return None
        if cached:
            self._cache_put(key, row[0])
        return row[0]

    def put(self, key, value):
        self._require_transaction()
        self.writes += 1
        self._conn.execute("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)", (key, value))
        if key.startswith(self._cached_prefixes):
            self._cache_put(key, value)

    def add_count(self, key, delta):
        """Add ``delta`` to the decimal count stored at ``key`` (absent = 0), in one statement."""
        self._require_transaction()
        self.writes += 1
        self._cache.pop(key, None)
        self._conn.execute(
            "INSERT INTO kv (k, v) VALUES (?, CAST(? AS BLOB)) ON CONFLICT (k) DO UPDATE"
            " SET v = CAST(CAST(CAST(v AS TEXT) AS INTEGER) + ? AS BLOB)", (key, str(delta), delta))

    def put_many(self, items):
        """``put`` every ``(key, value)`` pair, in one statement."""
        self._require_transaction()
        self.writes += 1
        # sqlite3 binds a bytearray as it is, but looks a bytes value up in
        # its adapter registry first (a tenth of applying a message).
        self._conn.executemany("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)",
                               [(k, bytearray(v)) for k, v in items])
        prefixes = self._cached_prefixes
        for k, v in items:
            if k.startswith(prefixes):
                self._cache_put(k, v)

    def delete(self, key):
        """Remove ``key``; returns whether it existed."""
        self._require_transaction()
        self.writes += 1
        self._cache.pop(key, None)
        return self._conn.execute("DELETE FROM kv WHERE k = ?", (key,)).rowcount > 0

    def delete_prefix(self, prefix):
        """Remove every key starting with ``prefix``; returns how many."""
        self._require_transaction()
        self.writes += 1
        self._cache.clear()
        where, args = self._range(prefix, None, None)
        return self._conn.execute(f"DELETE FROM kv WHERE {where}", args).rowcount

    # -- range scans ----------------------------------------------------

    @staticmethod
    def _range(prefix, after, before):
        # One lower and one upper bound, the tighter of each pair: given two
        # bounds on the same side, SQLite seeks with one and tests the other
        # on every row, which walks the whole prefix.
        if after is not None and after >= prefix:
            clauses, args = ["k > ?"], [after]
        else:
            clauses, args = ["k >= ?"], [prefix]
        end = prefix_end(prefix)
        if before is not None and (end is None or before <= end):
            clauses.append("k < ?")
            args.append(before)
        elif end is not None:
            clauses.append("k < ?")
            args.append(end)
        return " AND ".join(clauses), args

    def scan(self, prefix, after=None, before=None, limit=None, reverse=False):
        """``[(key, value)]`` for keys starting with ``prefix``, in key order.

        ``after``/``before`` are exclusive bounds on the whole key; ``reverse``
        walks from the largest key down; ``limit`` caps the count.
        """
        where, args = self._range(prefix, after, before)
        sql = f"SELECT k, v FROM kv WHERE {where} ORDER BY k {'DESC' if reverse else 'ASC'}"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return self._conn.execute(sql, args).fetchall()

    def scan_keys_glob(self, prefix, glob, after=None, limit=None):
        """Keys starting with ``prefix`` that match SQLite's ``GLOB`` ``glob``, in key order.

        SQLite filters the range itself. Fetching a row releases and
        retakes the GIL, so a filter in Python over a scan that keeps few of
        many keys spends most of its time waiting for the reactor's thread
        to hand the GIL back; here only the kept keys come out.
        """
        where, args = self._range(prefix, after, None)
        sql = f"SELECT k FROM kv WHERE {where} AND k GLOB ? ORDER BY k"
        args.append(glob)
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [key for (key,) in self._conn.execute(sql, args)]

    def dump(self):
        """``(applied_index, [(key, value), ...])``: the whole state, for comparisons."""
        return self.applied_index(), self._conn.execute("SELECT k, v FROM kv ORDER BY k").fetchall()

    def digest(self):
        """A sha256 hex digest of the applied index and every record."""
        index, records = self.dump()
        h = hashlib.sha256(_U64.pack(index))
        for key, value in records:
            h.update(_encode_record(key, value))
        return h.hexdigest()

    # -- snapshots ------------------------------------------------------

    def snapshot(self, chunk_bytes=SNAPSHOT_CHUNK_BYTES):
        """``(applied_index, chunks)``: a consistent copy of the store.

        The copy is the database's pages as SQLite's backup copies them,
        framed with the index and a digest (see L{_SnapshotChunks}): a
        peer installs it with one page copy instead of re-inserting every
        record. ``chunks`` is an iterator of bytes-like pieces of at most
        ``chunk_bytes``. It reads through its own connection inside one
        read transaction, opened here, so writes made meanwhile do not
        show; it may be consumed from another thread (never the reactor's).
        Call ``chunks.close()`` when abandoning it early. An open group
        commits first.
        """
        self.commit_group()
        if self._conn.in_transaction:
            raise RuntimeError("snapshot() inside a write transaction would not see it")
        conn = _connect(self.path)
        try:
            conn.execute("BEGIN")
            index = conn.execute(
                "SELECT value FROM meta WHERE name = 'applied_index'").fetchone()[0]
        except sqlite3.Error as e:
            conn.close()
            raise self.error(e) from e
        return index, _SnapshotChunks(conn, index, chunk_bytes, self.error, self.path)

    def snapshot_bytes(self):
        """About what a snapshot weighs now: the size of the database's pages."""
        conn = self._conn
        return (conn.execute("PRAGMA page_count").fetchone()[0]
                * conn.execute("PRAGMA page_size").fetchone()[0])

    def receive_snapshot_part(self, offset, data):
        """Take bytes ``offset ..`` of a snapshot being received from a peer, in order
        (offset 0 starts one anew). Its frame and digest are checked as it comes and
        its image written to the file ``restore`` uses (``RESTORE_SUFFIX``): a
        snapshot is as large as the state, so it waits on the disk, not in memory,
        for L{restore_received}."""
        part = self.path + RESTORE_SUFFIX
        if offset == 0:
            self._drop_incoming()
            try:
                sink = open(part, "wb")
            except OSError as e:
                raise StoreError(f"cannot write {part} to receive a snapshot: {e}") from e
            self._incoming = [_SnapshotReader(sink.write), sink, 0]
        incoming = self._incoming
        if incoming is None or incoming[2] != offset:
            raise StoreError(f"a part at {offset} of a snapshot of which"
                             f" {incoming[2] if incoming else 0} bytes came")
        try:
            incoming[0].feed(data)
        except OSError as e:
            self._drop_incoming()
            raise StoreError(f"cannot write {part} to receive a snapshot: {e}") from e
        except SnapshotError:
            self._drop_incoming()
            raise
        incoming[2] += len(data)

    def restore_received(self, applied_index):
        """L{restore} from the snapshot L{receive_snapshot_part} took, then drop it."""
        incoming, self._incoming = self._incoming, None
        if incoming is None:
            raise StoreError("no snapshot was received to restore")
        reader, sink, _ = incoming
        part = self.path + RESTORE_SUFFIX
        try:
            try:
                sink.close()
            except OSError as e:
                raise StoreError(f"cannot write {part} to receive a snapshot: {e}") from e
            reader.finish(applied_index)
            self._install_image(part, applied_index)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(part)

    def _drop_incoming(self):
        incoming, self._incoming = self._incoming, None
        if incoming is not None:
            with contextlib.suppress(OSError):
                incoming[1].close()
            with contextlib.suppress(OSError):
                os.unlink(self.path + RESTORE_SUFFIX)

    def restore(self, applied_index, chunks):
        """Replace the whole store by a snapshot, atomically.

        The snapshot is checked first (frame, index, digest, then the
        image itself: a paxchat state of this format at ``applied_index``
        that passes SQLite's quick_check); on any problem L{SnapshotError}
        is raised and the store is unchanged. The image is then copied
        over this database in one write transaction (SQLite's backup),
        so this connection, and any snapshot being read from it, stay valid.
        That commit is as durable as any other of this store: a store fed
        from a log (``durable=False``) commits without an fsync, and the
        replicated log, which has already recorded the snapshot's index,
        fetches the snapshot again if a crash loses the restore.

        The image goes through a file beside the store (``RESTORE_SUFFIX``),
        written as the chunks come and removed after, as for a snapshot
        received from a peer: a snapshot is as large as the state, and
        holding it in memory while checking and copying it took three times
        that.
        """
        try:
            self.receive_snapshot_part(0, b"")           # starts one anew
            for chunk in chunks:
                self.receive_snapshot_part(self._incoming[2], chunk)
        except BaseException:
            self._drop_incoming()
            raise
        self.restore_received(applied_index)

    def _install_image(self, part, applied_index):
        """Check the image in file ``part``, then copy it over this database."""
        self.commit_group()
        if self._conn.in_transaction:
            raise RuntimeError("restore() inside a transaction")
        try:
            source = sqlite3.connect(Path(part).resolve().as_uri() + "?mode=ro", uri=True)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open {part} to restore a snapshot: {e}") from e
        try:
            _check_image(source, applied_index)
            page_size = self._conn.execute("PRAGMA page_size").fetchone()[0]
            if source.execute("PRAGMA page_size").fetchone()[0] != page_size:
                raise SnapshotError(f"snapshot page size differs from this store's {page_size}")
            try:
                source.backup(self._conn)
            except sqlite3.Error as e:
                raise self.error(e) from e
        finally:
            self._cache.clear()      # whatever the copy got to, the values held may be gone
            source.close()


def _encode_record(key, value):
    raw = key.encode("utf-8")
    return b"".join((_RECORD, _U32.pack(len(raw)), raw, _U32.pack(len(value)), value))


# A snapshot is SNAPSHOT_MAGIC, the applied index and the image's size
# (u64 each), the image, and the sha256 of the image. The image is the
# database's pages as SQLite's backup copies them, with its header's
# file-format bytes (offsets 18 and 19) set from WAL (2) to rollback-journal
# (1): the receiver opens the image read-only, which SQLite does without a
# wal-index only in the latter (and peers of earlier versions open it in
# memory, which needs it too); the store sets WAL mode again whenever it
# opens a file.
_SNAP_HEADER = struct.Struct(f">{len(SNAPSHOT_MAGIC)}sQQ")
_DIGEST_BYTES = 32
_FORMAT_BYTES = slice(18, 20)


class _SnapshotChunks:
    """Iterator of snapshot pieces over a private read transaction.

    On the first ``next()``, in the consuming thread, SQLite's backup copies
    the pages the read transaction sees to a file beside the store
    (``<store>.<random>.snapshot.part``), and the read transaction ends;
    the pieces are then read from that file, which is gone once they are
    (it is unlinked while open). ``sqlite3_serialize`` would have held the
    image twice in memory (SQLite's copy, then Python's), for a state of
    any size. ``as_file()`` instead of iterating gives the whole snapshot
    as a L{SnapshotFile}, for a node to serve peers from.
    """

    def __init__(self, conn, index, chunk_bytes, error, path):
        self._conn = conn
        self._index = index
        self._error = error
        self._path = path
        self._gen = self._generate(max(chunk_bytes, 64))

    def _image_file(self):
        """The image, in an open file that is already unlinked; the read transaction ends."""
        path = self._path
        try:
            fd, part = tempfile.mkstemp(prefix=os.path.basename(path) + ".",
                                        suffix=SNAPSHOT_SUFFIX, dir=os.path.dirname(path) or ".")
            os.close(fd)
        except OSError as e:
            self._release()
            raise StoreError(f"cannot make a snapshot file beside {path}: {e}") from e
        try:
            copy = sqlite3.connect(part)
            try:
                copy.execute("PRAGMA journal_mode = OFF")   # a scratch file: no journal
                self._conn.backup(copy)                      # in our read transaction
            finally:
                copy.close()
            image = open(part, "r+b")
            if os.fstat(image.fileno()).st_size >= _FORMAT_BYTES.stop:
                os.pwrite(image.fileno(), b"\x01\x01", _FORMAT_BYTES.start)
            return image
        except sqlite3.Error as e:
            raise self._error(e) from e
        except OSError as e:
            raise StoreError(f"cannot make a snapshot file beside {path}: {e}") from e
        finally:
            self._release()
            with contextlib.suppress(OSError):
                os.unlink(part)             # read on through the open file

    def _generate(self, chunk_bytes):
        with self._image_file() as image:
            size = os.fstat(image.fileno()).st_size
            head = _SNAP_HEADER.pack(SNAPSHOT_MAGIC, self._index, size)
            first = image.read(chunk_bytes)
            digest = hashlib.sha256(first)
            if len(head) + len(first) <= chunk_bytes:
                yield head + first
            else:
                yield head
                yield first
            while piece := image.read(chunk_bytes):
                digest.update(piece)
                yield piece
            yield digest.digest()

    def as_file(self):
        """The whole snapshot as a L{SnapshotFile} (instead of iterating; not on the reactor)."""
        self._gen.close()
        return SnapshotFile(self._image_file(), self._index)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._gen)

    def close(self):
        """Release the read transaction (safe to call twice); ends the iteration."""
        self._gen.close()
        self._release()

    def _release(self):
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    def __del__(self):
        self._release()


def file_chunks(path, size=1 << 20):
    """A file's bytes, 1 MiB at a time (a snapshot is as large as the state)."""
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk


class SnapshotFile:
    """A whole snapshot served from its image's file: ``len()`` and slices.

    A slice is a L{FileSlice}, read later with its ``read()`` (off the
    reactor): a node serving a peer holds none of the state in memory, only
    this open file, already unlinked, whose disk space goes with the last
    reference to it.
    """

    def __init__(self, image, index):
        self._image = image
        self._size = os.fstat(image.fileno()).st_size
        self._head = _SNAP_HEADER.pack(SNAPSHOT_MAGIC, index, self._size)
        digest = hashlib.sha256()
        buffer = memoryview(bytearray(1 << 20))
        image.seek(0)
        while read := image.readinto(buffer):
            digest.update(buffer[:read])
        self._digest = digest.digest()

    def __len__(self):
        return len(self._head) + self._size + _DIGEST_BYTES

    def __getitem__(self, key):
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a snapshot file only takes slices of consecutive bytes")
        start, stop, _ = key.indices(len(self))
        return FileSlice(self, start, max(start, stop))

    def read(self, start, stop):
        """Bytes ``start .. stop`` of the snapshot (header, image and digest)."""
        head, end = len(self._head), len(self._head) + self._size
        out = []
        if start < head:
            out.append(self._head[start:min(stop, head)])
        first, last = max(start, head), min(stop, end)
        while first < last:
            piece = os.pread(self._image.fileno(), last - first, first - head)
            if not piece:
                raise StoreError("a snapshot file ended early")
            out.append(piece)
            first += len(piece)
        if stop > end:
            out.append(self._digest[max(start, end) - end:stop - end])
        return b"".join(out)

    def close(self):
        self._image.close()

    def __del__(self):
        image = getattr(self, "_image", None)
        if image is not None:
            image.close()


class FileSlice:
    """Bytes ``start .. stop`` of a L{SnapshotFile}, not yet read."""

    __slots__ = ("source", "start", "stop")

    def __init__(self, source, start, stop):
        self.source, self.start, self.stop = source, start, stop

    def __len__(self):
        return self.stop - self.start

    def read(self):
        return self.source.read(self.start, self.stop)


def check_snapshot(snapshot):
    """The applied index of a whole snapshot (bytes, or an iterable of its
    chunks), after checking its frame and digest; L{SnapshotError} says what
    is wrong. ``restore`` also checks the image inside."""
    if isinstance(snapshot, (bytes, bytearray, memoryview)):
        snapshot = [snapshot]
    return _read_snapshot(snapshot)


def _read_snapshot(chunks):
    """The index of a snapshot stream, after checking its frame and digest."""
    reader = _SnapshotReader()
    for chunk in chunks:
        reader.feed(chunk)
    return reader.finish()


class _SnapshotReader:
    """Checks a snapshot stream as it comes (frame, index, digest) and passes the
    image inside it on to ``sink``; L{SnapshotError} says what is wrong."""

    def __init__(self, sink=None):
        self._sink = sink
        self._head = bytearray()
        self._tail = bytearray()
        self._digest = hashlib.sha256()
        self.index = self._size = None
        self._taken = 0

    def feed(self, chunk):
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise SnapshotError(f"snapshot chunk is {type(chunk).__name__}, not bytes")
        view = memoryview(chunk).cast("B")
        if self.index is None:
            need = _SNAP_HEADER.size - len(self._head)
            self._head += view[:need]
            view = view[need:]
            if len(self._head) < _SNAP_HEADER.size:
                return
            magic, self.index, self._size = _SNAP_HEADER.unpack(self._head)
            if magic != SNAPSHOT_MAGIC:
                raise SnapshotError("not a paxchat state snapshot (bad magic)")
        if self._taken < self._size:
            piece = view[:self._size - self._taken]
            self._digest.update(piece)
            if self._sink is not None:
                self._sink(piece)
            self._taken += len(piece)
            view = view[len(piece):]
        self._tail += view
        if len(self._tail) > _DIGEST_BYTES:
            raise SnapshotError("snapshot has data after its end")

    def finish(self, applied_index=None):
        """The snapshot's index, once it is whole and its digest checks out."""
        if self.index is None or self._taken < self._size or len(self._tail) < _DIGEST_BYTES:
            raise SnapshotError("snapshot stream ends early")
        if self._digest.digest() != self._tail:
            raise SnapshotError("snapshot digest mismatch")
        if applied_index is not None and self.index != applied_index:
            raise SnapshotError(f"snapshot is of index {self.index}, expected {applied_index}")
        return self.index


def _check_image(conn, applied_index):
    """Check that the database open on ``conn`` is our state, whole, at ``applied_index``."""
    try:
        tables = {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"kv", "meta"} <= tables:
            raise SnapshotError(f"snapshot is not a paxchat state (tables: {sorted(tables)})")
        meta = dict(conn.execute("SELECT name, value FROM meta"))
        if meta.get("format") != FORMAT_VERSION:
            raise SnapshotError(
                f"snapshot has state format {meta.get('format')}, expected {FORMAT_VERSION}")
        if meta.get("applied_index") != applied_index:
            raise SnapshotError(f"snapshot image is of index {meta.get('applied_index')},"
                                f" expected {applied_index}")
        result = conn.execute("PRAGMA quick_check").fetchone()[0]
        if result != "ok":
            raise SnapshotError(f"snapshot image is damaged: {result}")
    except sqlite3.DatabaseError as e:
        raise SnapshotError(f"snapshot image is not a usable SQLite database: {e}") from e
