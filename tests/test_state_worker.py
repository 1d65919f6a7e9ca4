"""StateWorker: calls leave the reactor thread, run in order, applies before reads, stop cleanly."""

import threading

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, gatherResults, inlineCallbacks

from paxchat.state.chat import ChatState
from paxchat.state.worker import APPLIES_BEFORE_A_READ, StateWorker, StateWorkerStopped


class Recorder:
    """A stand-in state that records which thread ran what, in which order."""

    def __init__(self):
        self.calls = []
        self.closed = False

    def note(self, value, extra=None):
        self.calls.append((value, threading.get_ident()))
        return value if extra is None else (value, extra)

    def boom(self):
        raise KeyError("boom")

    def close(self):
        self.closed = True


@pytest_twisted.inlineCallbacks
def test_calls_run_in_order_on_one_other_thread():
    state = Recorder()
    worker = StateWorker(reactor, state)
    try:
        results = yield gatherResults([worker.call("note", i) for i in range(50)])
        assert results == list(range(50))
        assert [v for v, _ in state.calls] == list(range(50))
        threads = {t for _, t in state.calls}
        assert len(threads) == 1
        assert threads != {threading.get_ident()}
        assert (yield worker.call("note", 1, extra=2)) == (1, 2)
        assert (yield worker.call(lambda: threading.get_ident())) in threads
    finally:
        yield worker.stop()


def hold_the_thread(worker):
    """Keep the worker's thread busy until the returned Event is set, so calls queue up."""
    started, release = threading.Event(), threading.Event()
    worker.call(lambda: (started.set(), release.wait(10)))
    assert started.wait(10)
    return release


@inlineCallbacks
def _queued_while_held(queue):
    """``queue(worker)`` calls while the worker's thread is busy, then let them run.

    Fires with (their results, the order the state ran them in).
    """
    state = Recorder()
    worker = StateWorker(reactor, state)
    try:
        release = hold_the_thread(worker)
        pending = queue(worker)
        release.set()
        results = yield gatherResults(pending)
    finally:
        yield worker.stop()
    return results, [v for v, _ in state.calls]


@pytest_twisted.inlineCallbacks
def test_log_calls_run_before_waiting_reads():
    results, order = yield _queued_while_held(lambda worker: (
        [worker.read("client", "client", "note", f"read{i}") for i in range(3)]
        + [worker.call("note", f"apply{i}") for i in range(3)]))
    assert results == ["read0", "read1", "read2", "apply0", "apply1", "apply2"]
    assert order == ["apply0", "apply1", "apply2", "read0", "read1", "read2"]


@pytest_twisted.inlineCallbacks
def test_owners_take_turns_and_each_keeps_its_order():
    _, order = yield _queued_while_held(lambda worker: (
        [worker.read("scanner", "scanner", "note", f"scan{i}") for i in range(4)]
        + [worker.read("other", "other", "note", f"other{i}") for i in range(2)]))
    assert order == ["scan0", "other0", "scan1", "other1", "scan2", "scan3"]


@pytest_twisted.inlineCallbacks
def test_an_owner_s_many_readers_share_one_turn_each_reader_in_its_order():
    # One account on several connections: one read of it per round, not one
    # per connection; its connections take turns within its turn.
    _, order = yield _queued_while_held(lambda worker: (
        [worker.read(f"conn{c}", "mallory", "note", f"c{c}.{i}") for c in range(3) for i in range(2)]
        + [worker.read("conn9", "alice", "note", f"alice{i}") for i in range(2)]))
    assert order == ["c0.0", "alice0", "c1.0", "alice1", "c2.0", "c0.1", "c1.1", "c2.1"]


@pytest_twisted.inlineCallbacks
def test_a_read_still_runs_between_many_log_calls():
    applies = 2 * APPLIES_BEFORE_A_READ + 1
    _, order = yield _queued_while_held(lambda worker: (
        [worker.call("note", i) for i in range(applies)]
        + [worker.read("client", "client", "note", "r0"), worker.read("client", "client", "note", "r1")]))
    assert order.index("r0") == APPLIES_BEFORE_A_READ
    assert order.index("r1") == 2 * APPLIES_BEFORE_A_READ + 1
    assert [v for v in order if v not in ("r0", "r1")] == list(range(applies))


@pytest_twisted.inlineCallbacks
def test_dropped_reads_never_run_fail_cancelled_and_leave_other_readers_in_their_turn():
    state = Recorder()
    worker = StateWorker(reactor, state)
    try:
        release = hold_the_thread(worker)
        first = worker.read("other", "other", "note", "other0")
        shared = [worker.read(reader, "alice", "note", f"{reader}{i}")
                  for i in range(2) for reader in ("gone", "kept")]
        alone = worker.read("gone", "gone", "note", "alone")  # its own turn too
        later = worker.read("other", "other", "note", "other1")
        worker.drop_reads("gone")
        worker.drop_reads("nobody")
        assert worker._readers == {"other": {"other"}, "kept": {"alice"}}
        release.set()
        yield gatherResults([first, later, shared[1], shared[3]])
        for d in shared[0], shared[2], alone:
            with pytest.raises(CancelledError):
                yield d
        assert (yield worker.call("note", "after")) == "after"
        # alice kept her place in the turns, behind other's first read.
        assert [v for v, _ in state.calls] == ["other0", "kept0", "other1", "kept1", "after"]
        assert not worker._reads and not worker._readers
    finally:
        yield worker.stop()


@pytest_twisted.inlineCallbacks
def test_a_call_aside_runs_beside_the_queue():
    state = Recorder()
    worker = StateWorker(reactor, state)
    released = threading.Event()
    try:
        # Waits for a queued call to run: it could not if both shared one thread.
        aside = worker.call_aside(lambda: (released.wait(10), threading.get_ident()))
        queued = worker.call(lambda: (released.set(), threading.get_ident())[1])
        (waited, aside_thread), queued_thread = yield gatherResults([aside, queued])
        assert waited and aside_thread != queued_thread
    finally:
        released.set()
        yield worker.stop()
    with pytest.raises(StateWorkerStopped):
        yield worker.call_aside(lambda: None)


@pytest_twisted.inlineCallbacks
def test_stop_closes_after_what_runs_aside_without_blocking_the_reactor():
    state = Recorder()
    worker = StateWorker(reactor, state)
    release = threading.Event()
    aside = worker.call_aside(lambda: release.wait(10))
    stopped = worker.stop()
    # stop() returned while the aside call still runs; the state is not closed under it.
    assert not stopped.called and not state.closed
    release.set()
    assert (yield aside) is True
    yield stopped
    assert state.closed


@pytest_twisted.inlineCallbacks
def test_errors_reach_the_caller_and_the_worker_goes_on():
    worker = StateWorker(reactor, Recorder())
    try:
        with pytest.raises(KeyError):
            yield worker.call("boom")
        with pytest.raises(AttributeError):
            yield worker.call("no_such_method")
        assert (yield worker.call("note", 7)) == 7
    finally:
        yield worker.stop()


@pytest_twisted.inlineCallbacks
def test_stop_closes_the_state_after_queued_calls():
    state = Recorder()
    worker = StateWorker(reactor, state)
    pending = [worker.call("note", i) for i in range(5)] + [worker.read("client", "client", "note", 5)]
    threads = list(worker._pool.threads)
    stopped = worker.stop()
    assert not worker.running
    again = worker.stop()
    yield stopped
    yield again
    assert (yield gatherResults(pending)) == list(range(6))
    assert state.closed
    with pytest.raises(StateWorkerStopped):
        yield worker.call("note", 1)
    with pytest.raises(StateWorkerStopped):
        yield worker.read("client", "client", "note", 1)
    yield worker.stop()  # still fine once stopped
    assert threads and not any(t.is_alive() for t in threads)


@pytest_twisted.inlineCallbacks
def test_stop_removes_the_shutdown_trigger():
    worker = StateWorker(reactor, Recorder())
    trigger = worker._trigger
    yield worker.stop()
    with pytest.raises(ValueError):
        reactor.removeSystemEventTrigger(trigger)


@pytest_twisted.inlineCallbacks
def test_with_a_real_chat_state(tmp_path):
    state = ChatState.open(tmp_path / "s.db")
    worker = StateWorker(reactor, state)
    try:
        response = yield worker.call("apply", {"op": "create_account", "username": "alice",
                                               "pw_hash": "h", "ts": 1.0})
        assert response["ok"] is True
        assert (yield worker.call("account", "alice"))["pw_hash"] == "h"
        assert (yield worker.call("applied_index")) == 1
        index, chunks = yield worker.call("snapshot")
        pieces = []
        while True:
            chunk = yield worker.call(next, chunks, None)
            if chunk is None:
                break
            pieces.append(chunk)
        assert index == 1 and pieces
    finally:
        yield worker.stop()
    assert state.kv.closed


def test_process_with_a_forgotten_worker_exits(tmp_path):
    """Reactor shutdown finishes the queue and closes the state; no hang."""
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent(f"""
        from twisted.internet import reactor
        from paxchat.state.chat import ChatState
        from paxchat.state.worker import StateWorker
        state = ChatState.open({str(tmp_path / "s.db")!r})
        worker = StateWorker(reactor, state)
        def go():
            for name in ("a", "b", "c"):
                worker.call("apply", {{"op": "create_account", "username": name,
                                       "pw_hash": "h", "ts": 1.0}})
            reactor.stop()  # without waiting: the queued calls still run
        reactor.callWhenRunning(go)
        reactor.run()
        assert state.kv.closed, "shutdown did not close the state"
        state = ChatState.open({str(tmp_path / "s.db")!r})
        print(state.list_accounts())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(['a', 'b', 'c'], False)"


@pytest_twisted.inlineCallbacks
def test_opening_opens_the_state_off_the_reactor_thread(tmp_path):
    opened_on = []

    def open_state(path):
        opened_on.append(threading.get_ident())
        return ChatState.open(path)

    worker = yield StateWorker.opening(reactor, open_state, tmp_path / "s.db")
    try:
        assert opened_on and opened_on[0] != threading.get_ident()
        assert (yield worker.call("applied_index")) == 0
    finally:
        yield worker.stop()


@pytest_twisted.inlineCallbacks
def test_opening_a_damaged_file_fails_and_stops_the_thread(tmp_path):
    from paxchat.state.kv import CorruptStore
    path = tmp_path / "s.db"
    path.write_bytes(b"not a database" * 300)
    with pytest.raises(CorruptStore, match="s.db"):
        yield StateWorker.opening(reactor, ChatState.open, path)


@pytest_twisted.inlineCallbacks
def test_many_calls_leave_no_garbage_for_the_collector():
    # The pool leaves a reference cycle behind for each task it runs: the
    # worker gives it one task per busy spell, not one per call.
    import gc
    worker = StateWorker(reactor, Recorder())
    try:
        yield worker.call("note", 0)
        gc.collect()
        gc.disable()
        try:
            release = hold_the_thread(worker)
            pending = [worker.call("note", i) for i in range(200)]
            pending += [worker.read(f"conn{i % 4}", f"user{i % 2}", "note", i) for i in range(200)]
            release.set()
            yield gatherResults(pending)
            assert gc.collect() < 50
        finally:
            gc.enable()
    finally:
        yield worker.stop()


@pytest_twisted.inlineCallbacks
def test_dropping_one_of_an_owner_s_many_readers_does_not_walk_the_others():
    # One account on 5,000 connections that close, each with reads queued:
    # walking the account's whole queue at every close would take minutes.
    import time
    worker = StateWorker(reactor, Recorder())
    release = hold_the_thread(worker)
    try:
        pending = [worker.read(f"conn{c}", "mallory", "note", c) for c in range(5000) for _ in range(4)]
        started = time.monotonic()
        for c in range(5000):
            worker.drop_reads(f"conn{c}")
        assert time.monotonic() - started < 2.0
        assert not worker._reads and not worker._readers
        for d in pending:
            d.addErrback(lambda f: f.trap(CancelledError))
    finally:
        release.set()
        yield worker.stop()
