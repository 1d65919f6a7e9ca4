"""bcrypt hashing and checking, always in a thread, with equal timing for unknown users.

bcrypt only reads 72 bytes of a password and bcrypt 5 refuses longer ones,
while the protocol allows 1,024. So the password is first reduced to
``base64(sha256(password))`` (44 bytes, no NUL) and that is what bcrypt
hashes. Every node does the same, so any node can check any stored hash.
"""

import base64
import hashlib
import os
import threading

import bcrypt
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool


def prehash(password: bytes) -> bytes:
    return base64.b64encode(hashlib.sha256(password).digest())


class PasswordHasher:
    """Makes and checks password hashes off the reactor thread.

    @param run_in_thread: ``f(fn, *args) -> Deferred`` running ``fn`` in a
        thread pool (tests pass one that runs it at once).
    """

    def __init__(self, cost, run_in_thread):
        self._cost = cost
        self._run = run_in_thread
        self._dummy = None
        self._dummy_lock = threading.Lock()

    def hash(self, password: bytes):
        """Deferred[str]: a new bcrypt hash of ``password``."""
        return self._run(self._hash, password)

    def check(self, password: bytes, pw_hash):
        """Deferred[bool]; with ``pw_hash`` None it checks against a dummy of the same cost."""
        return self._run(self._check, password, pw_hash)

    def warm_up(self):
        """Make the dummy hash now, so the first unknown-user login is not slower."""
        return self._run(self._dummy_hash).addCallback(lambda _: None)

    def _hash(self, password):
        return bcrypt.hashpw(prehash(password), bcrypt.gensalt(self._cost)).decode("ascii")

    def _dummy_hash(self):
        with self._dummy_lock:
            if self._dummy is None:
                self._dummy = bcrypt.hashpw(b"paxchat dummy password", bcrypt.gensalt(self._cost))
            return self._dummy

    def _check(self, password, pw_hash):
        candidate = prehash(password)
        if pw_hash is None:
            bcrypt.checkpw(candidate, self._dummy_hash())
            return False
        try:
            return bcrypt.checkpw(candidate, pw_hash.encode("ascii"))
        except (ValueError, UnicodeEncodeError, AttributeError):
            # A stored hash we cannot read matches nothing.
            return False


class HashPool:
    """The threads bcrypt runs in: one fewer than the machine's cores.

    A storm of logins then queues for those threads instead of taking every
    core from the reactor thread, which keeps serving chat meanwhile. The
    pool starts on first use and stops with the reactor.
    """

    def __init__(self, reactor, threads=None):
        self._reactor = reactor
        self.threads = threads or max(1, (os.cpu_count() or 2) - 1)
        self._pool = None

    def run(self, fn, *args):
        if self._pool is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=self.threads, name="paxchat-bcrypt")
            self._pool.start()
            self._reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        return deferToThreadPool(self._reactor, self._pool, fn, *args)

    def stop(self):
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()


def run_synchronously(fn, *args):
    """A ``run_in_thread`` for tests: no thread, same Deferred interface."""
    return defer.maybeDeferred(fn, *args)
