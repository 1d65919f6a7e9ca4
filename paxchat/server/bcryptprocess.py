"""bcrypt in a child process: the node's password-hashing backend.

The child is ``paxchat.bcrypt_worker`` (why a process, and its line
protocol, are described there): one per node, started on the first hash,
with one fewer threads than the machine has cores. If it dies, requests it
had not answered go to a new one (once each); when the node stops, it is
told to exit (its stdin closes) and killed if it has not within
``CLOSE_GRACE_SECONDS``.

Requests wait here, in order, and the child is given only as many as it
has threads: in a storm of logins a request whose Deferred is cancelled
(its client has gone) before its turn is never hashed. A client that
gives up and logs in again elsewhere then costs one hash, not two.
"""

import collections
import itertools
import json
import os
import sys

from twisted.internet import defer, error, protocol
from twisted.logger import Logger

import paxchat
from paxchat.bcrypt_worker import NICE

__all__ = ["BcryptStopped", "BcryptWorkerError", "ProcessBcrypt"]

log = Logger()

CLOSE_GRACE_SECONDS = 2.0
# A request the worker died on twice fails: a third worker would most likely die too.
MAX_SENDS = 2
# The worker's answers are short; a longer line means it is not the worker talking.
MAX_LINE_BYTES = 4096


class BcryptWorkerError(Exception):
    """The bcrypt worker could not answer a request."""


class BcryptStopped(BcryptWorkerError):
    """The node is stopping: the bcrypt worker takes no more requests."""


class _WorkerProtocol(protocol.ProcessProtocol):
    """One child process: request lines out, answer lines in."""

    def __init__(self, owner):
        self._owner = owner
        self._buffer = b""
        self.ended = defer.Deferred()

    def outReceived(self, data):
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        if len(self._buffer) > MAX_LINE_BYTES:
            self._buffer = b""
            log.error("the bcrypt worker wrote an overlong line; stopping it")
            self.transport.signalProcess("KILL")
            return
        for line in lines:
            self._owner._answered(line)

    def processEnded(self, reason):
        self._owner._worker_ended(self, reason)
        self.ended.callback(None)


class ProcessBcrypt:
    """``hashpw``/``checkpw`` answered by a child process at a lower priority.

    @param reactor: an ``IReactorProcess`` and ``IReactorTime``.
    @param threads: hashes the child runs at once (default: cores - 1, at least 1).
    """

    def __init__(self, reactor, threads=None, nice=NICE, executable=None):
        self._reactor = reactor
        self.threads = threads or max(1, (os.cpu_count() or 2) - 1)
        self._nice = nice
        self._executable = executable or sys.executable
        self._worker = None          # the running child's protocol
        self._pending = {}           # request id -> [Deferred, request, times sent], in the child
        self._queued = {}            # request id -> entry, waiting for a thread of the child
        self._order = collections.deque()   # ids of queued requests (cancelled ones are skipped)
        self._ids = itertools.count(1)
        self._closed = False

    @property
    def pid(self):
        """The child's process id, or None when none is running."""
        worker = self._worker
        return None if worker is None or worker.transport is None else worker.transport.pid

    def hashpw(self, secret: bytes, cost: int):
        """Deferred[str]: a new bcrypt hash of ``secret``."""
        return self._call({"op": "hash", "secret": secret.decode("ascii"), "cost": int(cost)})

    def checkpw(self, secret: bytes, hashed: str):
        """Deferred[bool]: whether ``secret`` matches ``hashed`` (one it cannot read: False)."""
        return self._call({"op": "check", "secret": secret.decode("ascii"), "hash": hashed})

    def close(self):
        """Stop the child; unanswered requests fail. Fires once it has exited."""
        self._closed = True
        self._fail_all(BcryptStopped("the bcrypt worker is stopped"))
        worker = self._worker
        if worker is None:
            return defer.succeed(None)
        worker.transport.closeStdin()
        timer = self._reactor.callLater(CLOSE_GRACE_SECONDS, self._kill, worker)
        ended = defer.Deferred()

        def exited(_):
            if timer.active():
                timer.cancel()
            ended.callback(None)
        worker.ended.addBoth(exited)
        return ended

    # -- requests ------------------------------------------------------------------

    def _call(self, request):
        if self._closed:
            return defer.fail(BcryptStopped("the bcrypt worker is stopped"))
        request_id = next(self._ids)
        request["id"] = request_id
        entry = [defer.Deferred(lambda _: self._queued.pop(request_id, None)), request, 0]
        self._queued[request_id] = entry
        self._order.append(request_id)
        self._pump()
        return entry[0]

    def _pump(self):
        """Give the child queued requests while it has a thread free for them."""
        while len(self._pending) < self.threads and self._order:
            entry = self._queued.pop(self._order.popleft(), None)
            if entry is not None:
                self._pending[entry[1]["id"]] = entry
                self._send(entry)

    def _send(self, entry):
        entry[2] += 1
        try:
            worker = self._running()
        except OSError as e:
            self._pending.pop(entry[1]["id"], None)
            entry[0].errback(BcryptWorkerError(f"cannot start the bcrypt worker: {e}"))
            return
        worker.transport.write(json.dumps(entry[1]).encode("ascii") + b"\n")

    def _answered(self, line):
        try:
            reply = json.loads(line)
            request_id = reply["id"]
        except (ValueError, TypeError, KeyError):
            log.error("the bcrypt worker wrote an unreadable line")
            return
        entry = self._pending.pop(request_id, None)
        if entry is None:
            return                   # failed already (the worker was stopped)
        self._pump()
        if entry[0].called:
            return                   # cancelled while the child hashed it
        if "error" in reply:
            entry[0].errback(BcryptWorkerError(f"the bcrypt worker refused: {reply['error']}"))
        else:
            entry[0].callback(reply.get("ok"))

    def _fail_all(self, exc):
        entries = [*self._pending.values(), *self._queued.values()]
        self._pending, self._queued = {}, {}
        self._order.clear()
        for entry in entries:
            if not entry[0].called:
                entry[0].errback(exc)

    # -- the child -----------------------------------------------------------------

    def _running(self):
        if self._worker is None:
            worker = _WorkerProtocol(self)
            env = dict(os.environ)
            # The node may run from a source tree: let the child import the same paxchat.
            root = os.path.dirname(os.path.dirname(os.path.abspath(paxchat.__file__)))
            env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
            args = [self._executable, "-m", "paxchat.bcrypt_worker",
                    "--threads", str(self.threads), "--nice", str(self._nice)]
            self._reactor.spawnProcess(worker, self._executable, args, env=env,
                                       childFDs={0: "w", 1: "r", 2: 2})
            self._worker = worker
            log.info("bcrypt worker started (pid {pid}, {threads} threads)",
                     pid=worker.transport.pid, threads=self.threads)
        return self._worker

    def _worker_ended(self, worker, reason):
        if worker is not self._worker:
            return
        self._worker = None
        if self._closed:
            return
        code = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        why = f"signal {signal}" if signal is not None else f"exit status {code}"
        lost = [entry for entry in self._pending.values() if not entry[0].called]
        self._pending = {}
        log.warn("the bcrypt worker ended ({why}); {count} unanswered requests go to a new one",
                 why=why, count=len(lost))
        for entry in reversed(lost):
            if entry[2] >= MAX_SENDS:
                entry[0].errback(BcryptWorkerError(f"the bcrypt worker ended ({why}) twice on it"))
            else:
                self._queued[entry[1]["id"]] = entry
                self._order.appendleft(entry[1]["id"])
        self._pump()

    def _kill(self, worker):
        try:
            worker.transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass
