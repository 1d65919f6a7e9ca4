"""Runs every ChatState call on one dedicated thread, in order.

SQLite and fsync must never block the reactor, and the state is not
thread-safe; a single worker thread gives both: calls leave the reactor
thread, and they run one at a time in the order they were made.
"""

from functools import partial
from threading import Thread

from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool


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
        """Run ``state.<fn>(*args, **kwargs)`` on the worker thread.

        ``fn`` is a method name of the state, or any callable (for work
        that belongs on the state's thread, such as pulling snapshot
        chunks). Returns a Deferred firing with the result, in call order.
        """
        if self._stopping is not None:
            return fail(StateWorkerStopped("the state worker is stopped"))
        try:
            target = getattr(self.state, fn) if isinstance(fn, str) else fn
        except AttributeError:
            return fail()
        return deferToThreadPool(self._reactor, self._pool, target, *args, **kwargs)

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
