"""Password hashing: the hasher's rules, and the bcrypt worker process that does the work."""

import json
import os
import select
import signal
import threading
import time

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.python.failure import Failure

from paxchat import bcrypt_worker
from paxchat.server.bcryptprocess import BcryptWorkerError, ProcessBcrypt
from paxchat.server.passwords import InlineBcrypt, PasswordHasher, prehash
from tests.cluster_support import wait_until

TIMEOUT = 30


def test_the_hasher_checks_what_it_hashed_and_nothing_else():
    hasher = PasswordHasher(4, InlineBcrypt())
    stored = hasher.hash(b"right password").result
    assert stored.startswith("$2b$04$")
    assert hasher.check(b"right password", stored).result is True
    assert hasher.check(b"wrong password", stored).result is False
    # Longer than bcrypt's 72 bytes: the prehash keeps every byte significant.
    long_one = b"x" * 100
    stored = hasher.hash(long_one).result
    assert hasher.check(long_one, stored).result is True
    assert hasher.check(b"x" * 99 + b"y", stored).result is False


def test_an_unknown_user_or_a_damaged_hash_is_checked_against_the_dummy_and_fails():
    calls = []

    class Counting(InlineBcrypt):
        def checkpw(self, secret, hashed):
            calls.append(hashed)
            return super().checkpw(secret, hashed)

    hasher = PasswordHasher(4, Counting())
    assert hasher.check(b"anything", None).result is False
    assert hasher.check(b"anything", b"not text").result is False
    assert hasher.check(b"anything", "not a bcrypt hash").result is False
    # The first two did a full bcrypt check, against one dummy hash made once.
    assert calls[0] == calls[1] and calls[0].startswith("$2b$04$")


def test_the_worker_answers_each_line_and_refuses_what_it_cannot_do():
    secret = prehash(b"pw").decode()
    stored = bcrypt_worker.make_hash(secret.encode(), 4)
    lines = [
        {"id": 1, "op": "check", "secret": secret, "hash": stored},
        {"id": 2, "op": "check", "secret": secret, "hash": "garbage"},
        {"id": 3, "op": "frobnicate", "secret": secret},
        {"id": 4, "op": "hash", "secret": 12, "cost": 4},
        {"id": 5, "op": "hash", "secret": secret, "cost": 4},
    ]
    # Over pipes, as from a node: stdin stays open until every answer is in
    # (at end of input the worker drops requests not yet started).
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    with open(in_r, "rb") as stdin, open(out_w, "wb") as stdout, \
            open(in_w, "wb") as to_worker, open(out_r, "rb") as from_worker:
        worker = threading.Thread(target=bcrypt_worker.run, args=(stdin, stdout, 2), daemon=True)
        worker.start()
        to_worker.write(b"not json\n[1, 2]\n" + b"".join(
            json.dumps(line).encode() + b"\n" for line in lines))
        to_worker.flush()
        replies = [json.loads(line) for line in _read_lines(from_worker, len(lines) + 2)]
        to_worker.close()
        worker.join(TIMEOUT)
        assert not worker.is_alive()                 # it returns when its input ends
    replies = {r["id"]: r for r in replies}
    assert replies[None]["error"] == "malformed request"
    assert replies[1] == {"id": 1, "ok": True}
    assert replies[2] == {"id": 2, "ok": False}
    assert "unknown op" in replies[3]["error"]
    assert "error" in replies[4]
    assert bcrypt_worker.check_hash(secret.encode(), replies[5]["ok"])


def _read_lines(f, count):
    """``count`` lines from pipe ``f``, failing after TIMEOUT instead of hanging."""
    deadline = time.monotonic() + TIMEOUT
    data = b""
    while data.count(b"\n") < count:
        left = deadline - time.monotonic()
        assert left > 0 and select.select([f], [], [], left)[0], "the worker did not answer"
        chunk = os.read(f.fileno(), 65536)
        assert chunk, "the worker closed its output"
        data += chunk
    return data.splitlines()[:count]


@pytest.fixture
def workers():
    """ProcessBcrypt backends on the real reactor, each closed (child gone) after the test."""
    from twisted.internet import reactor
    made = []

    def make(**kwargs):
        backend = ProcessBcrypt(reactor, **kwargs)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        pytest_twisted.blockon(backend.close())


def _timed(d):
    from twisted.internet import reactor
    return d.addTimeout(TIMEOUT, reactor)


@pytest_twisted.inlineCallbacks
def test_a_child_process_hashes_in_a_session_of_its_own_at_a_lower_priority(workers):
    backend = workers(threads=2)
    assert backend.pid is None                       # nothing started before the first hash
    hasher = PasswordHasher(4, backend)
    stored = yield _timed(hasher.hash(b"secret"))
    assert (yield _timed(hasher.check(b"secret", stored))) is True
    assert (yield _timed(hasher.check(b"other", stored))) is False
    assert (yield _timed(hasher.check(b"other", None))) is False
    pid = backend.pid
    assert pid not in (None, os.getpid())
    assert os.getsid(pid) == pid
    assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
    # Several at once, answered in any order, each to its own caller.
    checks = [hasher.check(b"secret" if n % 2 else b"nope", stored) for n in range(6)]
    assert (yield _timed(defer.gatherResults(checks))) == [n % 2 == 1 for n in range(6)]
    assert backend.pid == pid                        # one child for them all


@pytest_twisted.inlineCallbacks
def test_the_child_is_given_one_request_per_thread_and_a_cancelled_one_is_not_hashed(workers):
    backend = workers(threads=1)
    yield _timed(backend.hashpw(b"warm", 4))         # the child is running
    sent = []
    transport = backend._worker.transport
    write = transport.write
    transport.write = lambda data: (sent.append(json.loads(data)["secret"]), write(data))[1]
    busy = backend.hashpw(b"busy", 10)               # its one thread hashes this
    gone = backend.checkpw(b"gone", "$2b$04$" + "x" * 53)
    kept = backend.checkpw(b"kept", "not a hash")
    assert sent == ["busy"]                          # the others wait here, in order
    gone.cancel()                                    # its client left: it is never sent
    with pytest.raises(defer.CancelledError):
        yield gone
    assert isinstance((yield _timed(busy)), str)
    assert (yield _timed(kept)) is False
    assert sent == ["busy", "kept"]
    # Cancelled while the child hashes it: the answer is dropped, the next goes on.
    busy = backend.hashpw(b"busy again", 10)
    after = backend.checkpw(b"after", "not a hash")
    busy.cancel()
    with pytest.raises(defer.CancelledError):
        yield busy
    assert (yield _timed(after)) is False
    assert sent == ["busy", "kept", "busy again", "after"]


@pytest_twisted.inlineCallbacks
def test_requests_a_dying_worker_leaves_go_to_a_new_one(workers):
    backend = workers(threads=1)
    stored = yield _timed(backend.hashpw(b"secret", 4))
    first = backend.pid
    answers = [backend.checkpw(b"secret", stored) for _ in range(3)]
    os.kill(first, signal.SIGKILL)                   # before any of them is answered
    assert (yield _timed(defer.gatherResults(answers))) == [True, True, True]
    assert backend.pid not in (None, first)


@pytest_twisted.inlineCallbacks
def test_a_request_the_worker_dies_on_twice_fails(workers):
    from twisted.internet import reactor
    backend = workers(threads=1)
    yield _timed(backend.hashpw(b"warm", 4))
    answer = backend.hashpw(b"secret", 14)           # ~1 s: time to kill it twice
    first = backend.pid
    os.kill(first, signal.SIGKILL)
    yield wait_until(reactor, lambda: backend.pid not in (None, first), TIMEOUT, "a new worker")
    os.kill(backend.pid, signal.SIGKILL)
    with pytest.raises(BcryptWorkerError, match="twice"):
        yield _timed(answer)
    # The next request starts a third worker.
    assert (yield _timed(backend.checkpw(b"x", "not a hash"))) is False


@pytest_twisted.inlineCallbacks
def test_closing_fails_what_is_unanswered_and_the_child_exits_by_itself(workers, monkeypatch):
    from paxchat.server import bcryptprocess
    # The worker runs at nice +10: on a loaded machine its cost-12 hash may outlast
    # the node's 2 s of grace, and it would be killed. The grace is not what is tested.
    monkeypatch.setattr(bcryptprocess, "CLOSE_GRACE_SECONDS", TIMEOUT / 2)
    backend = workers(threads=1)
    yield _timed(backend.hashpw(b"warm", 4))
    pid = backend.pid
    ended = backend._worker.ended
    reasons = []
    backend._worker.processEnded = lambda reason, original=backend._worker.processEnded: (
        reasons.append(reason), original(reason))
    slow = backend.hashpw(b"secret", 12)
    yield _timed(backend.close())
    assert ended.called and backend.pid is None
    assert reasons[0].value.exitCode == 0            # it left on its own, not killed
    with pytest.raises(OSError):
        os.kill(pid, 0)
    with pytest.raises(BcryptWorkerError):
        yield slow
    with pytest.raises(BcryptWorkerError):
        yield backend.checkpw(b"secret", "$2b$04$x")


@pytest_twisted.inlineCallbacks
def test_a_node_stopped_before_its_dummy_hash_is_made_logs_no_failure(workers):
    from twisted.internet import reactor
    from twisted.logger import LogLevel, globalLogPublisher
    from paxchat.server.factory import ChatServerFactory
    from tests.server_support import test_settings
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        backend = workers(threads=1)
        factory = ChatServerFactory(reactor, _NoLog(), None, test_settings(bcrypt_cost=14),
                                    bcrypt=backend)
        factory.startFactory()                       # starts the dummy hash (~1 s at cost 14)
        yield _timed(factory.hasher.close())         # the node stops first
        # A failure that is not the stop still is logged.
        ChatServerFactory._warm_up_failed(Failure(BcryptWorkerError("the worker ended twice")))
    finally:
        globalLogPublisher.removeObserver(events.append)
    failures = [e for e in events if e.get("log_level") == LogLevel.critical]
    assert len(failures) == 1 and "ended twice" in str(failures[0].get("log_failure").value)


class _NoLog:
    """The factory's command log, where nothing is submitted."""

    def add_observer(self, observer):
        pass

    def add_leader_observer(self, observer):
        pass

    def leader_id(self):
        return None
