"""bcrypt hashing and checking, never on the reactor thread, with equal timing for unknown users.

bcrypt only reads 72 bytes of a password and bcrypt 5 refuses longer ones,
while the protocol allows 1,024. So the password is first reduced to
``base64(sha256(password))`` (44 bytes, no NUL) and that is what bcrypt
hashes. Every node does the same, so any node can check any stored hash.

The hashing itself is done by a backend: a node uses ``ProcessBcrypt``
(``bcryptprocess.py``, a low-priority child process); tests use
``InlineBcrypt``.
"""

import base64
import hashlib

from twisted.internet import defer

from paxchat.bcrypt_worker import check_hash, make_hash

_DUMMY_PASSWORD = b"paxchat dummy password"


def prehash(password: bytes) -> bytes:
    return base64.b64encode(hashlib.sha256(password).digest())


class PasswordHasher:
    """Makes and checks password hashes through a bcrypt backend.

    @param bcrypt: has ``hashpw(secret, cost) -> Deferred[str]`` and
        ``checkpw(secret, hashed) -> Deferred[bool]`` (a hash it cannot read
        matches nothing), and ``close() -> Deferred``.
    """

    def __init__(self, cost, bcrypt):
        self._cost = cost
        self._bcrypt = bcrypt
        self._dummy = None          # the dummy hash, once made
        self._dummy_waiters = None  # Deferreds waiting while it is being made

    def hash(self, password: bytes):
        """Deferred[str]: a new bcrypt hash of ``password``."""
        return self._bcrypt.hashpw(prehash(password), self._cost)

    def check(self, password: bytes, pw_hash):
        """Deferred[bool]. With ``pw_hash`` None (no such user), or one that is not even
        text, it checks against a dummy hash of the same cost and answers False, so
        the answer takes as long as for a real user."""
        candidate = prehash(password)
        if isinstance(pw_hash, str):
            return self._bcrypt.checkpw(candidate, pw_hash)
        d = self._dummy_hash()
        d.addCallback(lambda dummy: self._bcrypt.checkpw(candidate, dummy))
        return d.addCallback(lambda _: False)

    def warm_up(self):
        """Make the dummy hash now, so the first unknown-user login is not slower."""
        return self._dummy_hash().addCallback(lambda _: None)

    def close(self):
        """Stop the backend; fires when it has stopped."""
        return self._bcrypt.close()

    def _dummy_hash(self):
        if self._dummy is not None:
            return defer.succeed(self._dummy)
        waiter = defer.Deferred()
        if self._dummy_waiters is None:
            self._dummy_waiters = [waiter]
            self._bcrypt.hashpw(_DUMMY_PASSWORD, self._cost).addBoth(self._dummy_made)
        else:
            self._dummy_waiters.append(waiter)
        return waiter

    def _dummy_made(self, result):
        waiters, self._dummy_waiters = self._dummy_waiters, None
        made = isinstance(result, str)
        if made:
            self._dummy = result
        for waiter in waiters:
            (waiter.callback if made else waiter.errback)(result)


class InlineBcrypt:
    """A backend that hashes at once, on the calling thread: for tests, at a low cost."""

    def hashpw(self, secret, cost):
        return defer.maybeDeferred(make_hash, secret, cost)

    def checkpw(self, secret, hashed):
        return defer.maybeDeferred(check_hash, secret, hashed)

    def close(self):
        return defer.succeed(None)
