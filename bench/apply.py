"""Benchmark 6 (in-process): the cost of applying ``send_message`` commands to the state.

Every node applies every command, and a follower that catches up applies
thousands in a row, so this cost bounds both write throughput and
catch-up. Commands are applied the way the replicated log hands them over:
slots of 7 commands (what 64 clients fill a slot with), one slot per call,
either each in its own SQLite transaction or grouped as the replicated log
applies them (``grouped=True``: one transaction per ``GROUP_SLOTS`` slots), and 1,024
slots per call, grouped (a follower catching up). The peer, measured in the same run on the same
kind of file, is SQLite inserting the same rows with nothing else: the
floor of the schema, so the ratio says how much of the cost is ours.
Figures: CPU microseconds per command and bytes written per command
(``/proc/self/io`` wchar: WAL frames and any temp files).
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
import uuid

from twisted.internet import threads

from paxchat.state.chat import ChatState
from paxchat.state.kv import GROUP_SLOTS

NAME = "apply"
PER_SLOT = 7
WRITERS = 64
SINKS = 3


def sizes(tiny):
    return {"commands": 700 if tiny else 20000}


async def run(reactor, ctx):
    if not ctx.with_paxchat:
        return
    count = sizes(ctx.tiny)["commands"]
    ctx.say(f"[{NAME}] etcd    not compared: the peer is SQLite writing the same rows")
    for slots_per_call, grouped, label in (
            (1, False, "one slot per transaction"),
            (1, True, "one slot per call, grouped (live)"),
            (1024, True, "1,024 slots per call, grouped (catch-up)")):
        figures = await threads.deferToThread(measure, ctx.workdir(NAME), count, slots_per_call, grouped)
        ctx.record(NAME, "paxchat", f"{count} send_message, {label}", **figures)


def measure(directory, count, slots_per_call, grouped=False):
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        state = ChatState.open(os.path.join(tmp, "state.db"), durable=False)
        try:
            _populate(state)
            entries = _slots(state.applied_index(), [_send(i) for i in range(count)])
            def apply_all():
                for i in range(0, len(entries), slots_per_call):
                    state.apply_entries(entries[i:i + slots_per_call], grouped=grouped)
                state.commit_applied()
            ours = _timed(apply_all)
        finally:
            state.close()
        # The peer commits as often as we did: a group commits after the
        # call that fills it, so never more often than once per call.
        slots_per_txn = max(slots_per_call, GROUP_SLOTS) if grouped else slots_per_call
        floor = _rows_floor(os.path.join(tmp, "rows.db"), count, slots_per_txn)
    return {"us_per_command": ours[0] / count * 1e6, "kib_written_per_command": ours[1] / count / 1024,
            "sqlite_rows_us_per_command": floor[0] / count * 1e6,
            "vs_rows": floor[0] / ours[0] if ours[0] else None}


def _populate(state):
    now = time.time()
    users = [f"w{i}" for i in range(WRITERS)] + [f"sink{i}" for i in range(SINKS)]
    setup = [{"op": "create_account", "username": u, "pw_hash": "x", "ts": now} for u in users]
    setup += [{"op": "login", "username": u, "pw_hash": "x", "session": "s" + u, "ts": now,
               "expires": now + 86400} for u in users]
    state.apply_entries(_slots(state.applied_index(), setup, per_slot=len(setup)))


def _send(i):
    sender = f"w{i % WRITERS}"
    return {"op": "send_message", "session": "s" + sender, "from": sender,
            "to": f"sink{i % SINKS}", "body": "x" * 100, "ts": time.time(),
            "client_msg_id": uuid.uuid4().hex}


def _slots(after, commands, per_slot=PER_SLOT):
    encoded = [json.dumps(c).encode() for c in commands]
    return [(after + 1 + n, encoded[i:i + per_slot])
            for n, i in enumerate(range(0, len(encoded), per_slot))]


def _rows_floor(path, count, slots_per_txn):
    """The same 8 rows per message into a bare key-value table, no Python logic around them."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID")
    per_txn = PER_SLOT * slots_per_txn
    messages = []
    for i in range(count):
        sender, sink, mid = f"w{i % WRITERS}", f"sink{i % SINKS}", f"{i:016x}"
        messages.append([("m/" + mid, b"x" * 140), (f"h/{sender}/{mid}", b""),
                         (f"p/{sender}/{sink}/{mid}", b""), (f"u/{sink}/{mid}", b""),
                         (f"h/{sink}/{mid}", b""), (f"p/{sink}/{sender}/{mid}", b""),
                         (f"d/{sender}/m/{uuid.uuid4().hex}", b"x" * 30), (f"x/{i:012x}/{sender}", b"")])

    def insert():
        for start in range(0, count, per_txn):
            conn.execute("BEGIN")
            for rows in messages[start:start + per_txn]:
                conn.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?)", rows)
            conn.execute("COMMIT")
    try:
        return _timed(insert)
    finally:
        conn.close()


def _timed(fn):
    """(CPU seconds of this process, bytes it wrote) while ``fn`` runs."""
    written = _wchar()
    cpu = time.process_time()
    fn()
    return time.process_time() - cpu, _wchar() - written


def _wchar():
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))
    except (OSError, StopIteration):
        return 0
