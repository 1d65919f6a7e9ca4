"""Bounded pipelining, clients that never read, and rate limits."""

import json

from paxchat.server import RateLimit
from paxchat.server.ratelimit import KeyedRateLimiter, TokenBucket
from twisted.internet.task import Clock

from .server_support import HeldWorker, Server, logged_in, test_settings

PW = "password-1"


def login(server, name):
    client = server.connect()
    client.ok("create_account", username=name, password=PW)
    client.ok("login", username=name, password=PW)
    return client


def test_ten_thousand_pipelined_requests_are_all_answered():
    server = Server()
    client = login(server, "alice")
    lines = b"".join(json.dumps({"id": n, "op": "hello" if n % 2 else "history", "limit": 1}).encode() + b"\n"
                     for n in range(10_000))
    client.send_line(lines)
    answers = [m for m in client.received() if "id" in m]
    assert len(answers) == 10_002  # two from login
    assert all(a["ok"] for a in answers)
    assert client.proto.in_flight == 0
    assert not client.proto.reading_paused


def test_reading_stops_at_the_in_flight_bound_and_resumes_as_answers_drain():
    server = Server(settings=test_settings(max_pending_per_connection=8), worker_class=HeldWorker)
    client = server.connect()
    lines = b"".join(json.dumps({"id": n, "op": "list_accounts"}).encode() + b"\n" for n in range(100))
    # Not logged in: every one is answered at once, never paused.
    client.send_line(lines)
    assert len(client.received()) == 100
    assert not client.proto.reading_paused
    # Log in by hand (the held worker keeps the state read pending).
    client.send(op="create_account", username="alice", password=PW)
    server.worker.release_all()
    client.send(op="login", username="alice", password=PW)
    server.worker.release_all()
    assert client.received()[-1]["ok"] is True
    seen = len(client.received())
    writes = b"".join(json.dumps({"id": f"w{n}", "op": "send_message", "to": "alice", "body": str(n)}).encode()
                      + b"\n" for n in range(1000))
    client.send_line(writes)
    # Writes go to the log in order; the first is being applied, so
    # everything after it waits, and reading has stopped at the bound.
    assert client.proto.in_flight == 8
    assert client.proto.reading_paused
    assert client.transport.producerState == "paused"
    assert len(client.proto._buffer) < len(writes)
    rounds = 0
    while len([m for m in client.received()[seen:] if "id" in m]) < 1000:
        server.worker.release_all()
        assert client.proto.in_flight <= 8
        rounds += 1
        assert rounds < 1000
    assert not client.proto.reading_paused
    assert client.transport.producerState == "producing"
    client.send(id="h", op="history", limit=1000)
    server.worker.release_all()
    bodies = [m["body"] for m in client.answer("h")["result"]["messages"]]
    assert bodies == [str(n) for n in reversed(range(1000))]


def test_a_client_that_never_reads_stops_being_read_and_is_dropped_when_it_stays_behind():
    server = Server(settings=test_settings(max_output_backlog=10_000, output_stall_seconds=10.0))
    reader = login(server, "reader")
    lazy = login(server, "lazy")
    # The transport says its buffer is full: the client is not reading.
    lazy.transport.producer.pauseProducing()
    assert lazy.proto.reading_paused
    lazy.send_line(b'{"id": "x", "op": "hello"}\n')
    assert lazy.proto._buffer  # not read while output is stuck
    for n in range(100):
        # TCP transports say "pause" again on every write while full.
        lazy.transport.producer.pauseProducing()
        reader.ok("send_message", to="lazy", body="spam " * 10)
    # Over the backlog, it has a while to catch up...
    assert lazy.proto._backlog > 10_000 and not lazy.transport.disconnected
    server.clock.advance(9.9)
    assert not lazy.transport.disconnected
    # ...and is aborted (not a polite close) when it has not.
    server.clock.advance(0.2)
    assert lazy.transport.disconnected
    written = len(lazy.transport.value())
    reader.ok("send_message", to="lazy", body="one more")
    assert len(lazy.transport.value()) == written
    # Everybody else is fine.
    assert reader.ok("hello")["protocol"] == 1
    lazy.proto.connectionLost(None)
    assert server.factory.registry.of_user("lazy") == []
    assert server.factory.output_debt.bytes == 0


def test_a_reading_client_behind_after_a_burst_of_big_events_is_kept():
    server = Server(settings=test_settings(max_output_backlog=100_000, max_output_burst=2_000_000))
    busy = login(server, "busy")
    busy.transport.producer.pauseProducing()
    for n in range(15):   # ~1.5 MB in one go: far past the backlog, under the burst bound
        busy.proto.send_event({"event": "message", "message": {"body": "é" * 16_000}})
    assert busy.proto._backlog > 1_400_000 and not busy.transport.disconnected
    assert server.factory.output_debt.bytes == busy.proto._backlog
    # The client reads it all: the transport drains, and nothing is owed or pending.
    busy.transport.producer.resumeProducing()
    assert server.factory.output_debt.bytes == 0
    assert not server.clock.getDelayedCalls()
    server.clock.advance(60)
    assert not busy.transport.disconnected
    assert len(busy.events()) == 15


def test_a_burst_past_its_bound_drops_the_client_at_once():
    server = Server(settings=test_settings(max_output_backlog=100_000, max_output_burst=500_000))
    flooded = login(server, "flooded")
    flooded.transport.producer.pauseProducing()
    for n in range(10):
        flooded.proto.send_event({"event": "message", "message": {"body": "é" * 16_000}})
    assert flooded.transport.disconnected
    assert flooded.proto._backlog <= 500_000


def test_when_the_node_is_owed_too_much_a_client_behind_is_dropped_at_once():
    server = Server(settings=test_settings(max_output_backlog=100_000, max_output_debt=300_000))
    clients = [login(server, f"user{i}") for i in range(3)]
    event = {"event": "message", "message": {"body": "é" * 16_000}}   # ~96 KB
    for client in clients:
        client.transport.producer.pauseProducing()
        client.proto.send_event(event)
    assert not any(c.transport.disconnected for c in clients)
    clients[0].proto.send_event(event)        # over its backlog; the node owes ~390 KB: no room
    assert clients[0].transport.disconnected
    assert not clients[1].transport.disconnected
    clients[0].proto.connectionLost(None)
    assert server.factory.output_debt.bytes == 2 * clients[1].proto._backlog
    clients[1].proto.send_event(event)        # now there is room: it gets its while to catch up
    assert not clients[1].transport.disconnected


def test_a_client_that_reads_again_in_time_is_served():
    server = Server()
    reader = login(server, "reader")
    slow = login(server, "slow")
    slow.transport.producer.pauseProducing()
    slow.send(op="hello", id="waiting")
    reader.ok("send_message", to="slow", body="hi")
    slow.transport.producer.resumeProducing()
    assert not slow.proto.reading_paused
    assert slow.answer("waiting")["ok"]
    assert [e["message"]["body"] for e in slow.events()] == ["hi"]


def test_token_bucket():
    clock = Clock()
    bucket = TokenBucket(clock, RateLimit(rate=2.0, burst=3))
    assert [bucket.allow() for _ in range(4)] == [True, True, True, False]
    clock.advance(0.5)
    assert bucket.allow() and not bucket.allow()
    clock.advance(100)
    assert bucket.full()


def test_keyed_limiter_forgets_idle_keys_to_stay_bounded():
    clock = Clock()
    limiter = KeyedRateLimiter(clock, RateLimit(rate=1.0, burst=1), max_keys=10)
    assert limiter.allow("a") and not limiter.allow("a")
    for n in range(100):
        limiter.allow(f"k{n}")
    assert len(limiter) <= 11
    clock.advance(5)
    for n in range(100, 200):
        limiter.allow(f"k{n}")
    assert len(limiter) <= 11


def test_login_attempts_are_limited_per_connection():
    server = Server(settings=test_settings(login_per_connection=RateLimit(rate=0.1, burst=3)))
    server.connect().ok("create_account", username="alice", password=PW)
    client = server.connect()
    codes = [client.error("login", username="alice", password="wrong-pass") for _ in range(4)]
    assert codes == ["bad_credentials"] * 3 + ["rate_limited"]
    applied = len(server.state.applied)
    assert client.error("login", username="alice", password=PW) == "rate_limited"
    assert len(server.state.applied) == applied  # nothing proposed
    server.clock.advance(10)
    assert "session" in client.ok("login", username="alice", password=PW)


def test_login_attempts_are_limited_per_account_across_connections():
    server = Server(settings=test_settings(login_per_account=RateLimit(rate=0.1, burst=2)))
    server.connect().ok("create_account", username="alice", password=PW)
    codes = [server.connect().error("login", username="alice", password="wrong-pass") for _ in range(3)]
    assert codes == ["bad_credentials", "bad_credentials", "rate_limited"]
    # Another account is not affected.
    server.connect().ok("create_account", username="bob", password=PW)
    server.connect().ok("login", username="bob", password=PW)


def test_writes_are_limited_per_connection_and_per_account():
    server = Server(settings=test_settings(writes_per_connection=RateLimit(rate=1.0, burst=3),
                                           writes_per_account=RateLimit(rate=1.0, burst=5)))
    alice = login(server, "alice")
    codes = [alice.call("send_message", to="alice", body="x")["ok"] for _ in range(4)]
    assert codes == [True, True, True, False]
    assert alice.error("send_message", to="alice", body="x") == "rate_limited"
    second = server.connect()
    second.ok("login", username="alice", password=PW)
    assert [second.call("mark_read", ids=[])["ok"] for _ in range(3)] == [True, True, False]
    # Reads are not writes.
    assert alice.ok("history")["messages"]
    server.clock.advance(3)
    assert alice.ok("send_message", to="alice", body="later")


# Answers of ~1 MiB: a page of ten bodies of 16,384 "é", 6 bytes each once
# escaped to ASCII (984 KB), as the real state cuts them at about 1 MiB.
BIG_BODY = "é" * 16_384


def big_messages(server, name, count=10):
    for mid in range(1, count + 1):
        server.state.messages[mid] = {"id": mid, "from": name, "to": name, "body": BIG_BODY,
                                      "ts": float(mid), "read": True}


def history_lines(ids, limit=1000):
    return b"".join(json.dumps({"id": i, "op": "history", "limit": limit}).encode() + b"\n" for i in ids)


def held_pages(server):
    return [held for held in server.worker.held if held[1] == "history_page"]


def ids_received(client):
    """The ids of the answers after login's two (whole answers would flood a failure's report)."""
    return [m["id"] for m in client.received()[2:]]


def test_big_answers_to_pipelined_requests_of_a_client_whose_output_is_full_are_all_written():
    server = Server(worker_class=HeldWorker)
    client = logged_in(server, "alice")
    big_messages(server, "alice")
    client.send_line(history_lines(["h1", "h2", "h3"]))
    # The client reads, but slower than the answers come: its buffer fills.
    client.transport.producer.pauseProducing()
    for _ in range(10):
        server.worker.release_all()
        client.transport.producer.pauseProducing()  # said again on every write while full
    written = len(client.transport.value())
    assert written > 2 * 900_000 > server.settings.max_output_backlog
    assert not client.transport.disconnecting and not client.transport.disconnected
    client.transport.producer.resumeProducing()     # it caught up
    server.worker.release_all()
    assert ids_received(client) == ["h1", "h2", "h3"]
    assert [len(m["result"]["messages"]) for m in client.received()[2:]] == [10, 10, 10]
    assert not client.transport.disconnecting and not client.transport.disconnected
    assert client.proto.in_flight == 0 and not client.proto.reading_paused


def test_requests_for_big_answers_are_read_only_while_the_answer_budget_has_room():
    server = Server(worker_class=HeldWorker)
    client = logged_in(server, "alice")
    big_messages(server, "alice")
    client.send_line(history_lines(["h1", "h2", "h3"]) + b'{"id": "x", "op": "hello"}\n')
    # Each may answer ~1 MiB: two fill the budget, so the third is not read yet.
    assert len(held_pages(server)) == 2
    assert server.settings.max_answer_bytes_in_flight == 2 << 20
    assert client.proto.in_flight == 2 and client.proto.reading_paused
    assert client.transport.producerState == "paused"
    server.worker.release_first()
    # One answered: room for the third, which fills the budget again.
    assert ids_received(client) == ["h1"]
    assert len(held_pages(server)) == 2 and client.proto.reading_paused
    server.worker.release_first()
    # The hello behind it is read and answered at once, and reading goes on.
    assert ids_received(client) == ["h1", "h2", "x"]
    assert not client.proto.reading_paused and client.transport.producerState == "producing"
    server.worker.release_all()
    assert ids_received(client) == ["h1", "h2", "x", "h3"]
    assert client.proto.in_flight == 0


def test_one_request_is_read_even_when_its_answer_may_outweigh_the_whole_budget():
    server = Server(settings=test_settings(max_answer_bytes_in_flight=1000), worker_class=HeldWorker)
    client = logged_in(server, "alice")
    big_messages(server, "alice", count=2)
    client.send_line(history_lines(["h1", "h2"]))
    assert len(held_pages(server)) == 1 and client.proto.reading_paused
    server.worker.release_first()
    assert len(held_pages(server)) == 1 and client.proto.reading_paused
    server.worker.release_first()
    assert ids_received(client) == ["h1", "h2"]
    assert not client.proto.reading_paused


def test_small_answers_still_pipeline_up_to_the_in_flight_bound_beside_a_big_one():
    server = Server(worker_class=HeldWorker)
    client = logged_in(server, "alice")
    pending = server.settings.max_pending_per_connection
    lines = history_lines(["h"]) + b"".join(
        json.dumps({"id": n, "op": "list_accounts", "limit": 100}).encode() + b"\n" for n in range(200))
    client.send_line(lines)
    assert client.proto.in_flight == pending == len(server.worker.held)
    server.worker.release_all()
    assert len([m for m in client.received() if m["ok"]]) == 2 + 1 + 200


def test_answers_to_a_client_dropped_for_its_events_are_not_written():
    server = Server(settings=test_settings(max_output_backlog=10_000, max_output_burst=20_000),
                    worker_class=HeldWorker)
    lazy = logged_in(server, "lazy")
    lazy.send_line(b'{"id": "h", "op": "history"}\n')
    lazy.transport.producer.pauseProducing()
    for n in range(300):
        lazy.proto.send_event({"event": "message", "message": {"body": "spam " * 10}})
    assert lazy.transport.disconnected
    written = len(lazy.transport.value())
    server.worker.release_all()
    assert len(lazy.transport.value()) == written


def test_what_an_answer_may_weigh_covers_the_biggest_answer_of_each_kind():
    from paxchat.limits import MAX_ANSWER_MESSAGE_BYTES, MAX_LIMIT
    from paxchat.server.protocol import answer_bytes_at_most, encode
    for op in ("history", "read_messages"):
        assert answer_bytes_at_most(1, op, {}) > MAX_ANSWER_MESSAGE_BYTES
    for limit in (1, 100, MAX_LIMIT):
        names = ["z" * 32] * limit
        answer = encode({"id": -2**63, "ok": True, "result": {"accounts": names, "more": True}})
        assert len(answer) <= answer_bytes_at_most(-2**63, "list_accounts", {"limit": limit}) < len(answer) + 1024
    # A limit the handler refuses, or leaves to its default, counts as the most.
    assert answer_bytes_at_most(1, "list_accounts", {}) == answer_bytes_at_most(1, "list_accounts", {"limit": MAX_LIMIT})
    assert answer_bytes_at_most(1, "list_accounts", {"limit": True}) == answer_bytes_at_most(1, "list_accounts", {})
    # The answer echoes the id, escaped: control characters weigh 6 bytes each.
    request_id = "\x01" * 10_000
    answer = encode({"id": request_id, "ok": False, "error": {"code": "rate_limited", "message": "slow down"}})
    assert 60_000 < len(answer) <= answer_bytes_at_most(request_id, "send_message", {})
    assert answer_bytes_at_most(1, "hello", {}) < 1024
