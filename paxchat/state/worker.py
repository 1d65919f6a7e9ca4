"""Runs every ChatState call on one dedicated thread, applies before client reads.

SQLite and fsync must never block the reactor, and the state is not
thread-safe; a single worker thread gives both: calls leave the reactor
thread, and they run one at a time.

Two kinds of call share the thread. The log's calls (applying committed
commands, syncing, snapshots) run in the order they were made, and ahead of
client reads: a node whose clients scan account names as fast as they can
must still apply what the cluster commits, or every write it serves times
out. Client reads run after their read barrier, so running them after
later applies only shows a newer committed state, which is still correct.
Reads take turns by owner: the account a connection is logged in as, else
the connection itself. So one account's pipelined scans, however many
connections it spreads them over, cannot make another user's single read
wait for all of them; a connection's own reads run in its order. One read
runs after every ``APPLIES_BEFORE_A_READ`` log calls made while reads wait,
so reads progress even under a write flood.
"""

from collections import OrderedDict, deque
from functools import partial
from threading import Lock, Thread

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool


# While client reads wait, at most this many log calls run before one of them.
APPLIES_BEFORE_A_READ = 8


class StateWorkerStopped(Exception):
    """The worker was stopped; the call did not run."""


class _DaemonThreadPool(ThreadPool):
    """A pool whose thread cannot keep the process alive if nobody stops it.

    stop() still closes the state cleanly; this only guards against a
    reactor that never runs again after the last call (SQLite's WAL makes
    an abrupt end safe anyway).
    """

    threadFactory = partial(Thread, daemon=True)


class StateWorker:
    """``call(name, *args, **kw) -> Deferred`` for a state object's methods.

    The thread starts at construction and stops (closing the state after
    every queued call) on ``stop()`` or, at the latest, during reactor
    shutdown, so a forgotten worker neither hangs the process nor leaves
    the database open.
    """

    def __init__(self, reactor, state, name="paxchat-state"):
        self._reactor = reactor
        self.state = state
        self._pool = _DaemonThreadPool(minthreads=1, maxthreads=1, name=name)
        self._pool.start()
        # What the pool's thread runs next is picked when it is free: calls
        # queue jobs here, and one drain task on the pool runs them while any wait.
        self._lock = Lock()
        self._draining = False  # a _drain task is queued or running on the pool
        self._ordered = deque()          # the log's calls: (target, args, kwargs, deferred)
        # owner -> OrderedDict(reader -> deque of its jobs): owners in turn
        # order, and within an owner's turn its readers in turn order.
        self._reads = OrderedDict()
        self._readers = {}               # reader -> the owners it has reads waiting under
        self._ordered_in_a_row = 0       # log calls run while reads waited
        self._aside = _DaemonThreadPool(minthreads=0, maxthreads=1, name=name + "-aside")
        self._aside.start()
        self._stopping = None
        self._closed = None  # the close() outcome once known
        self._waiters = []
        # "during": after every service's stopService (a "before" trigger)
        # has finished, so the node's own orderly stop() comes first.
        self._trigger = reactor.addSystemEventTrigger("during", "shutdown", self._on_shutdown)

    @classmethod
    def opening(cls, reactor, open_state, *args, **kwargs):
        """Start a worker and open its state on the worker thread.

        ``open_state(*args, **kwargs)`` (e.g. ``ChatState.open, path``) runs
        off the reactor, since opening may recover a long WAL. Returns a
        Deferred firing with the worker, or failing (thread stopped) with
        the opener's error.
        """
        worker = cls(reactor, None)
        d = worker.call(open_state, *args, **kwargs)

        def opened(state):
            worker.state = state
            return worker

        def failed(failure):
            worker._finish_without_state()
            return failure

        return d.addCallbacks(opened, failed)

    def _finish_without_state(self):
        if self._trigger is not None:
            self._reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None
        self._stopping = Deferred()
        self._stop_pools()
        self._finish((None,))

    @property
    def running(self):
        return self._stopping is None

    def call(self, fn, *args, **kwargs):
        """Run ``state.<fn>(*args, **kwargs)`` on the worker thread, before waiting reads.

        ``fn`` is a method name of the state, or any callable (for work
        that belongs on the state's thread, such as pulling snapshot
        chunks). Returns a Deferred firing with the result; calls run and
        fire in call order.
        """
        return self._queue(None, None, fn, args, kwargs)

    def read(self, reader, owner, fn, *args, **kwargs):
        """Run a client's read ``state.<fn>(*args, **kwargs)`` in ``owner``'s turn.

        ``reader`` is whoever asks (a connection), ``owner`` whose turn the
        read waits for (the account the connection is logged in as, else
        the connection): owners take turns, one read each per round; in an
        owner's turn its readers take turns, and one reader's reads run in
        the order it made them, after every ``call`` made so far but for
        the fairness allowance (see the module docstring). Only for reads
        made after a read barrier.
        """
        return self._queue(reader, owner, fn, args, kwargs)

    def drop_reads(self, reader):
        """Forget ``reader``'s reads that have not started (its connection is gone).

        Their Deferreds fail with ``CancelledError``; the reads of other
        readers in the same owners' turns stay queued, in their order. It
        takes a time in the number of dropped reads, however many other
        readers share the owner.
        """
        dropped = []
        with self._lock:
            for owner in self._readers.pop(reader, ()):
                readers = self._reads[owner]
                dropped += readers.pop(reader)
                if not readers:
                    del self._reads[owner]  # otherwise the owner keeps its place in the turns
        for job in dropped:
            job[-1].errback(CancelledError("the reader left"))

    def _queue(self, reader, owner, fn, args, kwargs):
        if self._stopping is not None:
            return fail(StateWorkerStopped("the state worker is stopped"))
        try:
            target = getattr(self.state, fn) if isinstance(fn, str) else fn
        except AttributeError:
            return fail()
        d = Deferred()
        job = (target, args, kwargs, d)
        with self._lock:
            if owner is None:
                self._ordered.append(job)
            else:
                readers = self._reads.get(owner)
                if readers is None:
                    readers = self._reads[owner] = OrderedDict()
                queue = readers.get(reader)
                if queue is None:
                    queue = readers[reader] = deque()
                    self._readers.setdefault(reader, set()).add(owner)
                queue.append(job)
            start = not self._draining
            self._draining = True
        if start:
            self._pool.callInThread(self._drain)
        return d

    def _next_job(self):
        """On the worker thread, under the lock: the job to run now, or None."""
        reads = self._reads
        if self._ordered and (not reads or self._ordered_in_a_row < APPLIES_BEFORE_A_READ):
            if reads:
                self._ordered_in_a_row += 1
            return self._ordered.popleft()
        if not reads:
            return None
        self._ordered_in_a_row = 0
        owner, readers = reads.popitem(last=False)
        reader, queue = readers.popitem(last=False)
        job = queue.popleft()
        if queue:
            readers[reader] = queue  # back of the owner's line
        else:
            owners = self._readers[reader]
            owners.discard(owner)
            if not owners:
                del self._readers[reader]
        if readers:
            reads[owner] = readers  # back of the line
        return job

    def _drain(self):
        """On the worker thread: run jobs until none is queued.

        One pool task per busy spell, not one per job: each task the pool
        runs leaves a reference cycle behind, which only the garbage
        collector frees. Whether a drain runs is decided under the lock on
        both sides, so a job queued as the drain finds none starts another.
        """
        while True:
            with self._lock:
                job = self._next_job()
                if job is None:
                    self._draining = False
                    return
            target, args, kwargs, d = job
            try:
                result = target(*args, **kwargs)
            except BaseException:
                result = Failure()
            fire = d.errback if isinstance(result, Failure) else d.callback
            self._reactor.callFromThread(fire, result)

    def call_aside(self, fn, *args, **kwargs):
        """Run ``fn(*args, **kwargs)`` on a second thread, beside the ordered calls.

        For long work that reads through its own SQLite connection, such
        as pulling the chunks of a snapshot (``KVStore.snapshot``): on the
        worker's thread every apply would wait for it. One at a time, in
        call order; stopping the worker waits for them.
        """
        if self._stopping is not None:
            return fail(StateWorkerStopped("the state worker is stopped"))
        return deferToThreadPool(self._reactor, self._aside, fn, *args, **kwargs)

    def _stop_pools(self):
        self._aside.stop()
        self._pool.stop()

    def stop(self):
        """Close the state after the queued calls (and those aside), then end the threads.

        Returns a new Deferred on every call, firing once the state is
        closed (or failing with the error closing it raised).
        """
        waiter = Deferred()
        if self._closed is not None:
            self._fire(waiter)
            return waiter
        self._waiters.append(waiter)
        if self._stopping is not None:
            return waiter
        if self._trigger is not None:
            self._reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None
        # After what runs aside (without blocking the reactor on its thread's
        # join), then after the queued calls: close.
        self._stopping = d = deferToThreadPool(self._reactor, self._aside, lambda: None)
        d.addBoth(lambda _: deferToThreadPool(self._reactor, self._pool, self.state.close))
        d.addBoth(self._stopped)
        return waiter

    def _on_shutdown(self):
        """Nobody stopped us and the reactor is going: finish the queue and
        close the state now, blocking, since the reactor will not wait."""
        self._trigger = None  # firing now: nothing to remove
        if self._stopping is not None:
            return
        outcome = []

        def close():
            try:
                outcome.append((self.state.close(),))
            except BaseException:
                outcome.append(Failure())

        self._stopping = Deferred()
        self._aside.stop()  # joins: a snapshot being read finishes first
        self._pool.callInThread(close)
        self._pool.stop()  # joins: runs the queued calls, then close()
        self._finish(outcome[0] if outcome else Failure(StateWorkerStopped("close did not run")))

    def _stopped(self, result):
        # close() was the last job of both threads, so they are idle and the joins immediate.
        self._stop_pools()
        self._finish(result if isinstance(result, Failure) else (result,))

    def _finish(self, closed):
        self._closed = closed
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            self._fire(waiter)

    def _fire(self, waiter):
        if isinstance(self._closed, Failure):
            waiter.errback(self._closed)
        else:
            waiter.callback(None)
