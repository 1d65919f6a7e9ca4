"""bcrypt's own threads: off the reactor thread, never more than the pool allows."""

import threading

import pytest_twisted
from twisted.internet import defer
from twisted.internet.testing import MemoryReactor

from paxchat.server.passwords import HashPool, PasswordHasher


@pytest_twisted.inlineCallbacks
def test_hashes_run_in_a_bounded_pool_off_the_reactor_thread():
    from twisted.internet import reactor
    pool = HashPool(reactor, threads=1)
    lock = threading.Lock()
    running, seen = [0], []

    def work(n):
        with lock:
            running[0] += 1
            seen.append((threading.current_thread().name, running[0]))
        hasher = PasswordHasher(4, lambda fn, *a: defer.succeed(fn(*a)))
        hasher._hash(b"pw%d" % n)
        with lock:
            running[0] -= 1
        return n

    try:
        results = yield defer.gatherResults([pool.run(work, n) for n in range(4)])
        assert results == [0, 1, 2, 3]
        assert all("paxchat-bcrypt" in name for name, _ in seen)
        assert max(count for _, count in seen) == 1
    finally:
        pool.stop()


def test_the_pool_leaves_a_core_to_the_reactor_and_stops_with_it():
    reactor = MemoryReactor()
    pool = HashPool(reactor)
    assert pool.threads >= 1
    assert pool._pool is None                    # no threads until a hash is asked for
    pool.run(lambda: None)
    try:
        assert reactor.triggers["during"]["shutdown"] == [(pool.stop, (), {})]
    finally:
        pool.stop()
