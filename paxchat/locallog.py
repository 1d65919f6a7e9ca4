"""The command log of a single node: no consensus, just ordered group commit.

``LocalLog`` gives the client server the same ``ICommandLog`` a cluster does,
so paxchat can run as one process in development and tests. Commands are
applied in the order they were submitted. While one batch is being applied
in the state worker's thread, new commands accumulate; they all go into the
next batch, one log index and one SQLite transaction for the lot. That keeps
the reactor free and amortizes the fsync of each transaction over every
command that arrived meanwhile.
"""

from collections import deque

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from paxchat.interfaces import ICommandLog

log = Logger()


@implementer(ICommandLog)
class LocalLog:
    """An ``ICommandLog`` that applies commands on this node only.

    @param worker: a ``StateWorker``-like object whose ``call(name, *args)``
        runs ``ChatState.<name>`` on its thread and returns a Deferred.
    @param max_batch: at most this many commands per applied entry, so one
        transaction never grows without bound under a burst.
    """

    def __init__(self, reactor, worker, node_id=1, max_batch=1000):
        self._reactor = reactor
        self._worker = worker
        self.node_id = node_id
        self._max_batch = max_batch
        self._observers = []
        self._queue = deque()  # (command, Deferred) waiting for the next batch
        self._applying = False
        self._applied_index = None  # read from the state before the first batch
        self._submitted = 0  # commands ever submitted
        self._finished = 0  # commands whose batch is done (applied or failed)
        self._barriers = deque()  # (submitted count to wait for, Deferred)

    # ICommandLog

    def submit(self, command):
        d = defer.Deferred()
        self._queue.append((command, d))
        self._submitted += 1
        self._kick()
        return d

    def read_barrier(self):
        if self._finished >= self._submitted:
            return defer.succeed(None)
        d = defer.Deferred()
        self._barriers.append((self._submitted, d))
        return d

    def add_observer(self, observer):
        self._observers.append(observer)

    def add_leader_observer(self, observer):
        """A lone node always leads: ``observer`` is never called."""

    def leader_id(self):
        return self.node_id

    @property
    def applied_index(self):
        """The index of the last applied entry, or None before the first batch."""
        return self._applied_index

    # Group commit

    def _kick(self):
        if self._applying or not self._queue:
            return
        self._applying = True
        if self._applied_index is None:
            d = defer.maybeDeferred(self._worker.call, "applied_index")
            d.addCallbacks(self._apply_next_batch, self._start_failed)
        else:
            self._apply_next_batch(self._applied_index)

    def _start_failed(self, failure):
        log.failure("reading the applied index failed", failure)
        batch = list(self._queue)
        self._queue.clear()
        self._batch_failed(failure, batch)

    def _apply_next_batch(self, applied_index):
        self._applied_index = applied_index
        batch = []
        while self._queue and len(batch) < self._max_batch:
            batch.append(self._queue.popleft())
        index = applied_index + 1
        commands = [command for command, _ in batch]
        d = defer.maybeDeferred(self._worker.call, "apply_entries", [(index, commands)])
        d.addCallback(self._check_responses, index, len(batch))
        d.addCallbacks(self._batch_applied, self._batch_failed,
                       callbackArgs=(index, batch), errbackArgs=(batch,))

    @staticmethod
    def _check_responses(results, index, count):
        responses = results[0] if results else None
        if responses is None or len(responses) != count:
            raise RuntimeError(f"the state did not apply entry {index}")
        return responses

    def _batch_applied(self, responses, index, batch):
        self._applied_index = index
        for (command, d), response in zip(batch, responses):
            self._notify(command, response)
            self._finished += 1
            d.callback(response)
        self._batch_done()

    def _batch_failed(self, failure, batch):
        # The transaction rolled back: nothing of this batch was applied, and
        # the next batch reuses the same index.
        log.failure("applying a batch of {count} commands failed", failure, count=len(batch))
        for _, d in batch:
            self._finished += 1
            d.errback(failure)
        self._batch_done()

    def _notify(self, command, response):
        for observer in self._observers:
            try:
                observer(command, response)
            except Exception:
                log.failure("log observer failed on {op}", op=command.get("op"))

    def _batch_done(self):
        self._applying = False
        while self._barriers and self._barriers[0][0] <= self._finished:
            self._barriers.popleft()[1].callback(None)
        self._kick()
