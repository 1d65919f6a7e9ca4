"""The load generator: N clients in one Twisted process, each one request at a time.

Both systems are driven the same way: a closed loop per client (send, wait
for the answer, send the next), latency measured around each request with
``time.monotonic``. paxchat clients speak the JSON-lines protocol over TLS
with ``paxchat.client.connection.ChatClient`` (no failover library in the
way: a writer that loses its node reconnects to the next one itself);
etcd clients speak HTTP/1.1 keep-alive to the v3 JSON gateway with a small
raw protocol, so neither side pays for a heavier client stack.
"""

from __future__ import annotations

import base64
import itertools
import json
import time
import uuid

from twisted.internet import defer, error as net_error, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Protocol

from paxchat import tls as paxchat_tls
from paxchat.client.connection import ChatClientFactory
from paxchat.client.errors import ConnectionDropped, ServerError
from paxchat.tcp import no_delay

now = time.monotonic

REQUEST_TIMEOUT = 10.0
# Password operations wait behind every bcrypt queued before them (cost 12: ~0.25 s each).
PASSWORD_TIMEOUT = 180.0


def sleep(reactor, seconds):
    return task.deferLater(reactor, seconds, lambda: None)


def with_timeout(reactor, d, seconds):
    return d.addTimeout(seconds, reactor)


def error_code(failure_or_exc) -> str:
    exc = getattr(failure_or_exc, "value", failure_or_exc)
    if isinstance(exc, ServerError):
        return exc.code
    if isinstance(exc, EtcdError):
        return f"http_{exc.status}"
    return type(exc).__name__


async def closed_loop(client, recorder, stop_at):
    """One client: request after request until ``stop_at``, errors recovered from.

    ``stop_at`` is a monotonic time, or a callable that says when to stop.
    """
    done = stop_at if callable(stop_at) else (lambda: now() >= stop_at)
    while not done():
        sent = now()
        try:
            await client.write()
        except Exception as e:  # every failure is counted, none ends the run
            recorder.error(error_code(e), sent, now())
            await client.recover(e)
            continue
        recorder.ok(sent, now())


async def run_clients(clients, recorder, warmup, duration, reactor=None, cpu=None):
    """Run every client for warmup + duration; the recorder's window is the second part.

    ``cpu``: a ``procs.CpuMeter`` read at the window's start and end (on
    ``reactor``); its CPU per write joins the summary.
    """
    start = now() + warmup
    recorder.set_window(start, start + duration)
    if cpu is not None:
        reactor.callLater(warmup, cpu.start)
        reactor.callLater(warmup + duration, cpu.stop)
    await defer.gatherResults(
        [defer.ensureDeferred(closed_loop(c, recorder, start + duration)) for c in clients],
        consumeErrors=True)
    summary = recorder.summary()
    if cpu is not None:
        summary.update(cpu.per_write(summary.get("completed")))
    return summary


def start_clients(clients, recorder, done):
    """Run every client in the background until ``done()``; a Deferred of them all."""
    return defer.gatherResults(
        [defer.ensureDeferred(closed_loop(c, recorder, done)) for c in clients], consumeErrors=True)


async def wait_until(reactor, condition, timeout, what, step=0.005):
    """Poll ``condition()`` until true; TimeoutError naming ``what`` after ``timeout`` s."""
    deadline = now() + timeout
    while not condition():
        if now() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        await sleep(reactor, step)


async def bounded_gather(coroutines, limit=64):
    """Await coroutines with at most ``limit`` running at once; results in order."""
    sem = defer.DeferredSemaphore(limit)
    return await defer.gatherResults(
        [sem.run(lambda c=c: defer.ensureDeferred(c)) for c in coroutines], consumeErrors=True)


# -- paxchat ------------------------------------------------------------------

class PaxchatTargets:
    """TLS client endpoints for every node of a cluster config (options built once per host)."""

    def __init__(self, reactor, config):
        self.reactor = reactor
        self.config = config
        self._options = {}

    def endpoint(self, node_id):
        address = self.config.node(node_id).client
        endpoint = TCP4ClientEndpoint(self.reactor, address.host, address.port, timeout=5)
        if not self.config.client_tls:
            return endpoint
        options = self._options.get(address.host)
        if options is None:
            options = self._options[address.host] = paxchat_tls.client_connection_options(
                self.config, address.host)
        return wrapClientTLS(options, endpoint)

    async def connect(self, node_id, on_event=None):
        proto = await with_timeout(self.reactor, self.endpoint(node_id).connect(
            ChatClientFactory(on_event=on_event)), REQUEST_TIMEOUT)
        return proto


async def request(reactor, proto, op, timeout=REQUEST_TIMEOUT, **args):
    return await with_timeout(reactor, proto.request(op, **args), timeout)


async def hello(reactor, targets, node_id):
    proto = await targets.connect(node_id)
    try:
        return await request(reactor, proto, "hello", timeout=5)
    finally:
        proto.abort()


async def leader_view(reactor, targets, node_ids):
    """{node_id: leader it reports (or None)} for every node that answers."""
    views = {}
    for node_id in node_ids:
        try:
            views[node_id] = (await hello(reactor, targets, node_id)).get("leader")
        except Exception:
            pass
    return views


async def wait_for_leader(reactor, targets, node_ids, timeout=30.0):
    """(leader, replicated): the leader every live node agrees on.

    Nodes that each name themselves are independent single-node servers
    (no replicated log yet): then (None, False).
    """
    deadline = now() + timeout
    views = {}
    while now() < deadline:
        views = await leader_view(reactor, targets, node_ids)
        if len(views) > 1 and all(views.get(n) == n for n in views):
            return None, False
        leaders = set(views.values())
        if views and len(leaders) == 1 and None not in leaders:
            return leaders.pop(), True
        await sleep(reactor, 0.1)
    raise TimeoutError(f"the nodes did not agree on a leader in {timeout:g}s: {views}")


async def start_cluster(reactor, cluster):
    """Start a PaxchatCluster and wait for its leader: (targets, node ids, leader, replicated)."""
    await cluster.start()
    targets = PaxchatTargets(reactor, cluster.config)
    leader, replicated = await wait_for_leader(reactor, targets, cluster.node_ids)
    return targets, cluster.node_ids, leader, replicated


class PaxchatUser:
    """One account's connection: logged in on one node, able to move to another."""

    def __init__(self, reactor, targets, username, password, on_event=None):
        self.reactor = reactor
        self.targets = targets
        self.username = username
        self.password = password
        self.on_event = on_event
        self.proto = None
        self.node = None
        self.session = None

    async def connect(self, node_id):
        self.close()
        self.proto = await self.targets.connect(node_id, on_event=self.on_event)
        self.node = node_id

    async def ensure_account_and_login(self, timeout=300.0):
        """Log in, creating the account first if this node does not know it."""
        deadline = now() + timeout
        while True:
            try:
                result = await request(self.reactor, self.proto, "login", timeout=PASSWORD_TIMEOUT,
                                       username=self.username, password=self.password)
                self.session = result["session"]
                return
            except ServerError as e:
                if now() > deadline:
                    raise
                if e.code == "bad_credentials":
                    try:
                        await request(self.reactor, self.proto, "create_account",
                                      timeout=PASSWORD_TIMEOUT,
                                      username=self.username, password=self.password)
                    except ServerError as e2:
                        if e2.code not in ("username_taken", "unavailable", "rate_limited"):
                            raise
                elif e.code in ("unavailable", "rate_limited"):
                    await sleep(self.reactor, 0.2)
                else:
                    raise

    async def resume(self):
        await request(self.reactor, self.proto, "resume", session=self.session)

    def close(self):
        if self.proto is not None:
            self.proto.abort()
            self.proto = None


async def make_account(reactor, targets, node_id, username, password):
    """Create ``username`` via ``node_id`` (taken is fine); for recipients nobody logs in as."""
    proto = await targets.connect(node_id)
    try:
        deadline = now() + 300
        while True:
            try:
                await request(reactor, proto, "create_account", timeout=PASSWORD_TIMEOUT,
                              username=username, password=password)
                return
            except ServerError as e:
                if e.code == "username_taken":
                    return
                if e.code not in ("unavailable", "rate_limited") or now() > deadline:
                    raise
                await sleep(reactor, 0.2)
    finally:
        proto.abort()


BODY = "x" * 100


class PaxchatWriter:
    """A closed-loop sender: ``send_message`` to ``recipient``; on a lost node, the next node."""

    def __init__(self, user: PaxchatUser, recipient, node_order, body=BODY, timeout=REQUEST_TIMEOUT):
        self.timeout = timeout
        self.user = user
        self.recipient = recipient
        self.node_order = list(node_order)
        self.body = body

    def write(self):
        user = self.user
        if user.proto is None or user.proto.lost:
            return defer.fail(ConnectionDropped("not connected"))
        d = user.proto.request("send_message", to=self.recipient, body=self.body,
                               client_msg_id=uuid.uuid4().hex)
        return with_timeout(user.reactor, d, self.timeout)

    async def recover(self, exc):
        user = self.user
        if isinstance(exc, ServerError) and exc.code not in ("not_logged_in",):
            await sleep(user.reactor, 0.01)
            return
        if isinstance(exc, defer.TimeoutError) and user.proto is not None and not user.proto.lost:
            return  # give up on that answer, ask again on the same connection
        # Lost, timed out or logged out: try the nodes in turn from the next one.
        start = self.node_order.index(user.node) + 1 if user.node in self.node_order else 0
        for node_id in itertools.islice(itertools.cycle(self.node_order), start,
                                        start + len(self.node_order)):
            try:
                await user.connect(node_id)
                await user.resume()
                return
            except Exception:
                user.close()
        await sleep(user.reactor, 0.05)


# -- etcd ---------------------------------------------------------------------

class EtcdError(Exception):
    def __init__(self, status, body):
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status
        self.body = body


PARSE_ERRORS = []  # raw heads of answers the client could not parse, for debugging


class HTTPClient(Protocol):
    """HTTP/1.1 keep-alive, one request at a time (Content-Length or chunked answers)."""

    def __init__(self, host_header):
        self.host_header = host_header
        self._buffer = b""
        self._waiting = None
        self.lost = False

    def connectionMade(self):
        no_delay(self.transport)         # as paxchat's client does (Go's server side does too)

    def post(self, path, body: bytes) -> defer.Deferred:
        if self.lost or self._waiting is not None:
            return defer.fail(ConnectionDropped("connection not usable"))
        self._waiting = defer.Deferred()
        self.transport.write(
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (path.encode(), self.host_header, len(body), body))
        return self._waiting

    def dataReceived(self, data):
        self._buffer += data
        while self._waiting is not None:
            try:
                parsed = self._parse()
            except (ValueError, IndexError, EtcdError) as e:
                # Unparseable: fail the request and drop the connection, never misread.
                d, self._waiting = self._waiting, None
                PARSE_ERRORS.append(self._buffer[:400])
                self.transport.abortConnection()
                d.errback(EtcdError(0, b"unparseable answer: %r" % (e,)))
                return
            if parsed is None:
                return
            d, self._waiting = self._waiting, None
            d.callback(parsed)

    def _parse(self):
        head_end = self._buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return None
        head = self._buffer[:head_end].decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        rest = self._buffer[head_end + 4:]
        if "content-length" in headers:
            length = int(headers["content-length"])
            if len(rest) < length:
                return None
            self._buffer = rest[length:]
            return status, rest[:length]
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body, pos = b"", 0
            while True:
                line_end = rest.find(b"\r\n", pos)
                if line_end < 0:
                    return None
                size = int(rest[pos:line_end].split(b";")[0], 16)
                if size == 0:  # the last chunk; no trailers expected
                    if len(rest) < line_end + 4:
                        return None
                    self._buffer = rest[line_end + 4:]
                    return status, body
                if len(rest) < line_end + 2 + size + 2:
                    return None
                body += rest[line_end + 2:line_end + 2 + size]
                pos = line_end + 2 + size + 2
        raise EtcdError(status, b"answer without a length")

    def connectionLost(self, reason=None):
        self.lost = True
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.errback(ConnectionDropped("connection closed"))


async def http_connect(reactor, host, port):
    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=5)
    proto = HTTPClient(f"{host}:{port}".encode())
    return await with_timeout(reactor, connectProtocol(endpoint, proto), REQUEST_TIMEOUT)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


async def etcd_call(reactor, proto, path, payload: dict, timeout=REQUEST_TIMEOUT):
    status, body = await with_timeout(reactor, proto.post(path, json.dumps(payload).encode()), timeout)
    if status != 200:
        raise EtcdError(status, body)
    return json.loads(body or b"{}")


VALUE = b64(b"x" * 100)


class EtcdWriter:
    """A closed-loop putter: ``/v3/kv/put`` of a new key with a 100-byte value each time."""

    def __init__(self, reactor, members, first, name, timeout=REQUEST_TIMEOUT):
        self.timeout = timeout
        self.reactor = reactor
        self.members = list(members)  # [(host, port)], the first is home
        self.index = 0
        self.proto = None
        self.name = name
        self.seq = itertools.count()
        self.first = first

    async def connect(self, index=None):
        if index is not None:
            self.index = index
        if self.proto is not None:
            self.proto.transport.abortConnection()
        host, port = self.members[self.index]
        self.proto = await http_connect(self.reactor, host, port)

    def write(self):
        if self.proto is None or self.proto.lost:
            return defer.fail(ConnectionDropped("not connected"))
        key = b64(f"bench/{self.name}/{next(self.seq)}".encode())
        return defer.ensureDeferred(etcd_call(self.reactor, self.proto, "/v3/kv/put",
                                              {"key": key, "value": VALUE}, self.timeout))

    async def recover(self, exc):
        if isinstance(exc, EtcdError) and exc.status != 0:
            await sleep(self.reactor, 0.01)
            return
        if isinstance(exc, defer.TimeoutError):
            # HTTP/1.1 cannot ask again while an answer is owed: a new connection, same member.
            try:
                await self.connect(self.index)
                return
            except Exception:
                self.proto = None
        for step in range(1, len(self.members) + 1):
            try:
                if self.proto is not None and not self.proto.lost:
                    self.proto.transport.abortConnection()
                self.proto = None
                await self.connect((self.index + step) % len(self.members))
                return
            except Exception:
                self.proto = None
        await sleep(self.reactor, 0.05)
