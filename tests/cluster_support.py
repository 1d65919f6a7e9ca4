"""Process-level cluster fixtures: real twistd nodes on 127.0.0.1, killed with -9 at will.

In the style of tahoe-lafs' integration fixtures: a `Cluster` writes a
temporary cluster.ini (free ports, TLS on, cheap bcrypt, short timeouts),
makes its certificates, and starts, kills and restarts individual nodes as
child processes whose output goes to ``node-N.log`` files next to the ini.
Every wait polls a condition on the reactor against a deadline (no sleeps);
readiness and leadership are read from ``hello``. Whatever happens, every
process a Cluster started is killed: by the `cluster_factory` fixture's
teardown, by an atexit hook, and by the kernel (PR_SET_PDEATHSIG) should the
test process itself die.
"""

from __future__ import annotations

import atexit
import collections
import functools
import importlib.util
import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, task

from paxchat import config as configmod
from paxchat import tls
from paxchat.client import PaxchatClient, ServerError
from paxchat.client.connection import ChatClientFactory
from paxchat.client.failover import FailoverPolicy
from paxchat.client.targets import NodeTarget, targets_from_config
from paxchat.devcluster import write_local_config

__all__ = [
    "Cluster", "WaitTimeout", "HAS_REPLICATED_LOG", "cluster_factory", "fast_policy",
    "requires_replicated_log", "unread_bytes_at", "wait_until", "within", "sleep", "Load", "Probes", "all_history",
    "SINK", "password", "started", "create_accounts", "logged_in", "stored_on",
    "check_exactly_once", "check_every_node",
]

# Settings every process test starts from; a test overrides any of them.
DEFAULT_KEYS = {
    "client_tls": "on",
    "bcrypt_cost": 4,
    "heartbeat_interval": 0.05,
    "election_timeout_min": 0.5,
    "election_timeout_max": 1.0,
    "request_timeout": 2.0,
}
START_TIMEOUT = 30.0     # one twistd on a busy 2-core machine: a few seconds, usually
LEADER_TIMEOUT = 15.0

HAS_REPLICATED_LOG = importlib.util.find_spec("paxchat.replicatedlog") is not None
requires_replicated_log = pytest.mark.skipif(
    not HAS_REPLICATED_LOG, reason="paxchat.replicatedlog is not written yet: nodes do not replicate")

# In the child, before twistd: die with the test process (SIGKILL on parent death,
# Linux), and refuse to run at all if that parent is already gone.
LAUNCH = """\
import os, signal, sys
try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except Exception:
    pass
if os.getppid() != int(os.environ["PAXCHAT_TEST_PARENT"]):
    os._exit(70)
from twisted.scripts.twistd import run
sys.argv[0] = "twistd"
run()
"""

# Every process any Cluster started and has not reaped: the atexit safety net.
_LIVE: dict[int, subprocess.Popen] = {}


@atexit.register
def _kill_leftovers():
    for pid, process in list(_LIVE.items()):
        if process.poll() is None:
            try:
                process.kill()
                process.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        _LIVE.pop(pid, None)


class WaitTimeout(AssertionError):
    """A condition did not come true before its deadline."""


class NodeDied(AssertionError):
    """A node process exited while the test waited on it."""


def sleep(reactor, seconds):
    """A Deferred that fires after ``seconds`` of reactor time (for pacing, not for waiting)."""
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def wait_until(reactor, check, timeout, what, interval=0.05):
    """Poll ``check()`` (a value or a Deferred) until truthy; return that value.

    An exception from ``check`` counts as "not yet" (the last one is shown on
    timeout), except AssertionErrors, which end the wait at once.
    """
    deadline = reactor.seconds() + timeout
    last_error = None
    while True:
        try:
            value = yield defer.maybeDeferred(check)
        except AssertionError:
            raise
        except Exception as e:
            value, last_error = None, e
        if value:
            return value
        if reactor.seconds() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error is not None else ""
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}{detail}")
        yield sleep(reactor, interval)


def within(seconds):
    """Bound a Deferred-returning test to ``seconds`` of wall time (fails with TimeoutError)."""
    def decorate(test):
        @functools.wraps(test)
        def bounded(*args, **kwargs):
            from twisted.internet import reactor
            return test(*args, **kwargs).addTimeout(seconds, reactor)
        return bounded
    return decorate


def fast_policy(**overrides) -> FailoverPolicy:
    """Failover timing for tests: quick retries, answers expected within a few seconds."""
    knobs = dict(initial_delay=0.05, max_delay=0.5, jitter=0.1, deadline=30.0,
                 connect_timeout=2.0, answer_timeout=8.0,
                 unavailable_window=20.0, unavailable_delay=0.05)
    knobs.update(overrides)
    return FailoverPolicy(**knobs)


def unread_bytes_at(port):
    """Bytes received but not yet read by the process on 127.0.0.1:``port`` (Linux /proc)."""
    total = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            if int(local.rsplit(":", 1)[1], 16) == port and state == "01":  # ESTABLISHED
                total += int(queues.split(":")[1], 16)
    return total


def parse_gauges(text):
    """``{name: value}`` of the samples of a Prometheus text page; a labelled
    sample's name is written out with its labels (``paxchat_role{role="leader"}``)."""
    gauges = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                gauges[name] = float(value)
            except ValueError:
                pass
    return gauges


class Cluster:
    """A cluster.ini in ``directory`` and the twistd processes of its nodes.

    ``keys`` become ``[cluster]`` keys on top of `DEFAULT_KEYS`.
    """

    def __init__(self, reactor, directory, nodes=3, **keys):
        self.reactor = reactor
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        # Every node serves metrics, to read its indexes.
        path = write_local_config(self.directory, nodes, node_keys=("metrics",),
                                  **{**DEFAULT_KEYS, **keys})
        self.config = configmod.load(path)
        tls.make_cluster_certs(self.config)
        self.node_ids = list(self.config.nodes)
        self.processes: dict[int, subprocess.Popen] = {}
        self.starts = {n: 0 for n in self.node_ids}
        self._targets = {t.node_id: t for t in targets_from_config(reactor, self.config, timeout=2.0)}
        self._clients: list[PaxchatClient] = []

    def reload_config(self):
        """Read cluster.ini again (a test changed it): addresses, for checks and clients."""
        self.config = configmod.load(self.config.path)
        self._targets = {t.node_id: t for t in targets_from_config(self.reactor, self.config,
                                                                    timeout=2.0)}
        return self.config

    # -- files ---------------------------------------------------------------

    def log_path(self, node_id) -> Path:
        return self.directory / f"node-{node_id}.log"

    def output(self, node_id) -> str:
        """Everything node ``node_id`` printed, over all its runs."""
        try:
            return self.log_path(node_id).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def data_dir(self, node_id) -> Path:
        return self.config.node_data_dir(node_id)

    def describe(self, lines=60) -> str:
        """The tail of every node's output, for failure messages."""
        parts = []
        for n in self.node_ids:
            tail = self.output(n).splitlines()[-lines:]
            parts.append(f"----- node {n} ({self.log_path(n)}), last {len(tail)} lines -----")
            parts.extend(tail)
        return "\n".join(parts)

    # -- processes -----------------------------------------------------------

    def command(self, node_id) -> list[str]:
        return [sys.executable, "-c", LAUNCH, "-n", "--pidfile=", "paxchat",
                "--config", str(self.config.path), "--node", str(node_id)]

    def start(self, *node_ids):
        """Start (or restart) these nodes, or every node not running."""
        for node_id in node_ids or [n for n in self.node_ids if not self.alive(n)]:
            if self.alive(node_id):
                raise AssertionError(f"node {node_id} is already running")
            self.starts[node_id] += 1
            with open(self.log_path(node_id), "ab") as out:
                out.write(f"===== start #{self.starts[node_id]} of node {node_id} at "
                          f"{time.strftime('%H:%M:%S')} =====\n".encode())
                out.flush()
                process = subprocess.Popen(
                    self.command(node_id), stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, cwd=self.directory, start_new_session=True,
                    env={**os.environ, "PYTHONUNBUFFERED": "1",
                         "PAXCHAT_TEST_PARENT": str(os.getpid())})
            self.processes[node_id] = process
            _LIVE[process.pid] = process

    def alive(self, node_id) -> bool:
        process = self.processes.get(node_id)
        return process is not None and process.poll() is None

    def live_nodes(self) -> list[int]:
        return [n for n in self.node_ids if self.alive(n)]

    def kill(self, *node_ids, signum=signal.SIGKILL):
        """Kill these nodes (kill -9 unless ``signum`` says otherwise) and reap them."""
        for node_id in node_ids:
            process = self.processes.get(node_id)
            if process is None:
                continue
            if process.poll() is None:
                try:
                    process.send_signal(signum)
                except ProcessLookupError:
                    pass
            try:
                process.wait(30 if signum != signal.SIGKILL else 10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
            _LIVE.pop(process.pid, None)

    def pause(self, node_id):
        """Freeze a node (SIGSTOP), as a long GC pause or a suspended VM would."""
        self.processes[node_id].send_signal(signal.SIGSTOP)

    def unpause(self, node_id):
        """Let a frozen node run again (SIGCONT)."""
        self.processes[node_id].send_signal(signal.SIGCONT)

    def kill_all(self, signum=signal.SIGKILL):
        self.kill(*list(self.processes), signum=signum)

    @defer.inlineCallbacks
    def stop_gracefully(self, *node_ids, timeout=20.0):
        """SIGTERM these nodes (default all) and wait, on the reactor, for them to exit."""
        node_ids = node_ids or tuple(self.live_nodes())
        for n in node_ids:
            if self.alive(n):
                self.processes[n].send_signal(signal.SIGTERM)
        try:
            yield wait_until(self.reactor, lambda: not any(self.alive(n) for n in node_ids),
                             timeout, f"nodes {node_ids} to exit after SIGTERM")
        finally:
            self.kill(*node_ids)

    def _check_alive(self, node_ids):
        for n in node_ids:
            process = self.processes.get(n)
            if process is not None and process.poll() is not None:
                raise NodeDied(f"node {n} exited with code {process.returncode}\n{self.describe(40)}")

    # -- talking to nodes ----------------------------------------------------

    @defer.inlineCallbacks
    def hello(self, node_id, timeout=2.0):
        """One ``hello`` on a fresh connection to ``node_id``."""
        proto = yield self._targets[node_id].endpoint.connect(ChatClientFactory()).addTimeout(
            timeout, self.reactor)
        try:
            result = yield proto.request("hello").addTimeout(timeout, self.reactor)
        finally:
            proto.abort()
        return result

    @defer.inlineCallbacks
    def wait_ready(self, *node_ids, timeout=START_TIMEOUT):
        """Wait until each node (default: every live one) answers ``hello``; return their answers."""
        node_ids = node_ids or tuple(self.live_nodes())
        answers = {}

        @defer.inlineCallbacks
        def check():
            self._check_alive(node_ids)
            for n in node_ids:
                if n not in answers:
                    answers[n] = yield self.hello(n)
            return True
        try:
            yield wait_until(self.reactor, check, timeout, f"nodes {node_ids} to answer hello")
        except WaitTimeout as e:
            raise WaitTimeout(f"{e}\n{self.describe(40)}") from None
        return answers

    @defer.inlineCallbacks
    def leaders(self, node_ids=None):
        """``{node: leader it names}`` for every listed live node that answers ``hello`` now."""
        node_ids = node_ids or self.live_nodes()
        answers = yield defer.DeferredList([self.hello(n, timeout=1.0) for n in node_ids],
                                           consumeErrors=True)
        return {n: r["leader"] for n, (ok, r) in zip(node_ids, answers) if ok}

    @defer.inlineCallbacks
    def wait_leader(self, timeout=LEADER_TIMEOUT, among=None):
        """The leader every live node agrees on, itself live; waits for one to emerge."""
        among = list(among or self.live_nodes())

        @defer.inlineCallbacks
        def agreed():
            self._check_alive(among)
            seen = yield self.leaders(among)
            leaders = set(seen.values())
            if len(seen) == len(among) and len(leaders) == 1:
                leader = leaders.pop()
                if leader in among:
                    return leader
            return None
        try:
            leader = yield wait_until(self.reactor, agreed, timeout,
                                      f"nodes {among} to agree on a live leader", interval=0.05)
        except WaitTimeout as e:
            seen = yield self.leaders(among)
            raise WaitTimeout(f"{e}; they say {seen}\n{self.describe(40)}") from None
        return leader

    @defer.inlineCallbacks
    def start_and_wait(self, *node_ids, timeout=START_TIMEOUT):
        self.start(*node_ids)
        answers = yield self.wait_ready(*(node_ids or self.node_ids), timeout=timeout)
        return answers

    @defer.inlineCallbacks
    def is_replicated(self):
        """False for a build whose nodes are separate single-node servers (each leads itself)."""
        leaders = yield self.leaders()
        return not (len(self.node_ids) > 1 and all(n == leader for n, leader in leaders.items()))

    @defer.inlineCallbacks
    def require_replication(self):
        """Skip the test when the running build does not replicate."""
        replicated = yield self.is_replicated()
        if not replicated:
            pytest.skip("this build's nodes do not replicate (every node names itself leader)")

    def target(self, node_id) -> NodeTarget:
        return self._targets[node_id]

    def client(self, only=None, prefer=None, policy=None, **kwargs) -> PaxchatClient:
        """A PaxchatClient for this cluster, closed at teardown.

        ``only``: a node id or a list of them, the only nodes it may use
        (a pinned client, to read one node's own state); ``prefer``: the
        node it tries first, failing over to any other.
        """
        policy = policy or fast_policy()
        if only is not None:
            ids = [only] if isinstance(only, int) else list(only)
            client = PaxchatClient(self.reactor, [self._targets[n] for n in ids], policy=policy,
                                   **kwargs)
        else:
            client = PaxchatClient.from_config(self.reactor, self.config, prefer_node=prefer,
                                               policy=policy, **kwargs)
        self._clients.append(client)
        return client

    @defer.inlineCallbacks
    def close_clients(self):
        clients, self._clients = self._clients, []
        for client in clients:
            yield client.close()

    # -- state on disk ---------------------------------------------------------

    def state_dump(self, node_id):
        """(applied index, [(key, value)]) of a *stopped* node's chat state, read from its file."""
        from paxchat.node import STATE_FILE
        from paxchat.state.chat import ChatState
        if self.alive(node_id):
            raise AssertionError(f"node {node_id} is running; stop it before reading its state")
        state = ChatState.open(str(self.data_dir(node_id) / STATE_FILE))
        try:
            return state.dump()
        finally:
            state.close()

    @defer.inlineCallbacks
    def gauges(self, node_id, timeout=2.0):
        """The node's metrics page as ``{name: value}`` (unlabelled samples only)."""
        import urllib.request
        from twisted.internet import threads
        address = self.config.node(node_id).metrics

        def fetch():
            url = f"http://{address.host}:{address.port}/metrics"
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return response.read()
        body = yield threads.deferToThread(fetch)
        return parse_gauges(body.decode("utf-8", "replace"))

    @defer.inlineCallbacks
    def wait_applied_everywhere(self, timeout=30.0):
        """Wait until every live node has applied the same log index; return it.

        Call it once no client writes any more: then every node holds every
        acknowledged write (the node that answered applied it first). With
        every node up it also waits for the cluster's apply version to reach
        the build's (paxchat/upgrades.py): the leader commits that move once
        it has heard every node, which may be just now, after a node that was
        down came back.
        """
        nodes = self.live_nodes()
        everyone = len(nodes) == len(self.node_ids)

        @defer.inlineCallbacks
        def same():
            self._check_alive(nodes)
            indexes = set()
            for n in nodes:
                gauges = yield self.gauges(n)
                indexes.add(gauges.get("paxchat_applied_index"))
                if everyone and (gauges.get('paxchat_apply_version{of="cluster"}')
                                 != gauges.get('paxchat_apply_version{of="build"}')):
                    return None
            return indexes.pop() if len(indexes) == 1 and None not in indexes else None
        index = yield wait_until(self.reactor, same, timeout,
                                 f"nodes {nodes} to have applied the same index")
        return index

    @defer.inlineCallbacks
    def check_equal_states(self):
        """Once every node applied the same index, stop them and compare their chat states on disk.

        Equal key for key, at the same applied index. Returns the number of keys.
        """
        from twisted.internet import threads
        index = yield self.wait_applied_everywhere()
        yield self.stop_gracefully()
        dumps = {}
        for n in self.node_ids:
            applied, items = yield threads.deferToThread(self.state_dump, n)
            assert applied == index, f"node {n} stopped at applied index {applied}, not {index}"
            dumps[n] = dict(items)
        first = self.node_ids[0]
        for n in self.node_ids[1:]:
            differing = sorted(k for k in set(dumps[first]) | set(dumps[n])
                               if dumps[first].get(k) != dumps[n].get(k))
            assert not differing, (f"nodes {first} and {n} hold different states in "
                                   f"{len(differing)} keys, e.g. {differing[:5]}")
        return len(dumps[first])

    def paxos_dir(self, node_id) -> Path:
        return self.data_dir(node_id) / "paxos"


@pytest.fixture
def cluster_factory(tmp_path):
    """``make(nodes=3, cluster_class=Cluster, **cluster_keys) -> Cluster``; every
    process it started dies at teardown.

    The nodes' output is printed at teardown, which pytest shows for a failed test.
    """
    from twisted.internet import reactor
    made: list[Cluster] = []
    counter = itertools.count(1)

    def make(nodes=3, cluster_class=None, **keys):
        cluster = (cluster_class or Cluster)(reactor, tmp_path / f"cluster-{next(counter)}", nodes,
                                             **keys)
        made.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            try:
                pytest_twisted.blockon(cluster.close_clients().addTimeout(10, reactor))
            except Exception as e:  # the processes still die below
                print(f"closing the clients failed: {e!r}")
            finally:
                cluster.kill_all()
            print(cluster.describe(200))


# -- load and checks ------------------------------------------------------------

class Load:
    """Sends from several logged-in clients, remembering what was acknowledged.

    Each client sends to ``to`` with at most ``pipeline`` sends in flight;
    every send has a unique ``client_msg_id`` that is also its body, so a
    duplicate stored message is visible in history. ``rate_limited`` answers
    are retried with the same id after a short pause (or, once stopping,
    dropped: such a send was refused before anything was proposed); any
    other error is recorded in ``errors``.
    """

    def __init__(self, reactor, clients, to, pipeline=4, prefix=None):
        self.reactor = reactor
        self.clients = list(clients)
        self.to = to
        self.pipeline = pipeline
        self.prefix = prefix or uuid.uuid4().hex[:8]
        self.acked: dict[str, dict] = {}      # client_msg_id -> {"message_id", "acked_at", "issued_at"}
        self.errors: list[tuple[str, str]] = []
        self.issued = 0
        self._ids = itertools.count(1)
        self._stop = False

    def stop(self):
        self._stop = True

    def acked_after(self, when):
        """Acknowledgement times after ``when``, in order."""
        return sorted(a["acked_at"] for a in self.acked.values() if a["acked_at"] > when)

    def first_ack_of_a_send_issued_after(self, when):
        """When the first send issued after ``when`` was acknowledged (None if none was)."""
        times = [a["acked_at"] for a in self.acked.values() if a["issued_at"] > when]
        return min(times) if times else None

    @defer.inlineCallbacks
    def _send_one(self, client, msg_id):
        issued = self.reactor.seconds()
        while True:
            try:
                result = yield client.send_message(self.to, msg_id, client_msg_id=msg_id)
            except ServerError as e:
                if e.code == "rate_limited":
                    if self._stop:
                        return           # refused before anything was proposed: never sent
                    yield sleep(self.reactor, 0.2)
                    continue
                self.errors.append((msg_id, f"{e.code}: {e}"))
                return
            except Exception as e:
                self.errors.append((msg_id, repr(e)))
                return
            self.acked[msg_id] = {"message_id": result["message_id"], "issued_at": issued,
                                  "acked_at": self.reactor.seconds()}
            return

    @defer.inlineCallbacks
    def _lane(self, client, index, count):
        while not self._stop and count():
            msg_id = f"{self.prefix}-{index}-{next(self._ids)}"
            self.issued += 1
            yield self._send_one(client, msg_id)

    def run(self, total):
        """Send ``total`` messages spread over the clients; fires when all are answered or stopped."""
        remaining = [total]

        def take():
            if remaining[0] <= 0:
                return False
            remaining[0] -= 1
            return True
        lanes = [self._lane(c, i, take) for i, c in enumerate(self.clients)
                 for _ in range(self.pipeline)]
        return defer.gatherResults(lanes, consumeErrors=True)


@defer.inlineCallbacks
def all_history(client, peer=None, page=1000):
    """Every message of the client's user (with ``peer``), newest first, paging with ``before``."""
    messages, before = [], None
    while True:
        result = yield client.history(peer=peer, before=before, limit=page)
        batch = result["messages"]
        messages.extend(batch)
        if len(batch) < page:
            return messages
        before = batch[-1]["id"]


# -- scenario helpers ---------------------------------------------------------------

SINK = "sink"   # the account the scenarios send to


def password(name):
    return f"{name}-password"


@defer.inlineCallbacks
def started(cluster_factory, nodes=3, **keys):
    """A running replicated cluster and its leader (skips on a build that does not replicate)."""
    cluster = cluster_factory(nodes, **keys)
    yield cluster.start_and_wait()
    yield cluster.require_replication()
    leader = yield cluster.wait_leader()
    return cluster, leader


@defer.inlineCallbacks
def create_accounts(cluster, *names):
    """Create these accounts, a few per connection (account creation is rate limited per connection)."""
    names = list(names)
    while names:
        batch, names = names[:8], names[8:]
        admin = cluster.client()
        for name in batch:
            yield admin.create_account(name, password(name))
        yield admin.close()


@defer.inlineCallbacks
def logged_in(cluster, name, **client_kwargs):
    client = cluster.client(**client_kwargs)
    yield client.login(name, password(name))
    return client


@defer.inlineCallbacks
def stored_on(cluster, node_id, user=SINK, peer=None, with_unread=False):
    """``user``'s whole history as node ``node_id`` serves it (a client pinned to that node).

    ``with_unread``: return (messages, the unread count its login reported) instead.
    """
    reader = cluster.client(only=node_id)
    try:
        login = yield reader.login(user, password(user))
        messages = yield all_history(reader, peer=peer)
    finally:
        yield reader.close()
    return (messages, login["unread"]) if with_unread else messages


def check_exactly_once(messages, acked, where):
    """Every acknowledged send is in ``messages`` once, under the id it was acknowledged with."""
    by_body = collections.Counter(m["body"] for m in messages)
    duplicated = [body for body, n in by_body.items() if n > 1]
    assert not duplicated, f"{where}: stored more than once: {duplicated[:5]}"
    ids = {m["body"]: m["id"] for m in messages}
    missing = [msg_id for msg_id in acked if msg_id not in ids]
    assert not missing, f"{where}: {len(missing)} acknowledged sends missing, e.g. {missing[:5]}"
    wrong = [(b, a["message_id"], ids[b]) for b, a in acked.items() if ids[b] != a["message_id"]]
    assert not wrong, f"{where}: stored under another id than acknowledged: {wrong[:5]}"


@defer.inlineCallbacks
def check_every_node(cluster, nodes, acked, user=SINK):
    """The same history and unread count on each of ``nodes``, with every acknowledged send once."""
    seen = {}
    for node_id in nodes:
        messages, unread = yield stored_on(cluster, node_id, user, with_unread=True)
        check_exactly_once(messages, acked, f"node {node_id}")
        counted = sum(1 for m in messages if m["to"] == user and not m["read"])
        assert unread == counted, f"node {node_id}: login says {unread} unread, history shows {counted}"
        seen[node_id] = [(m["id"], m["from"], m["body"], m["read"]) for m in messages]
    first = seen[nodes[0]]
    for node_id in nodes[1:]:
        assert seen[node_id] == first, f"nodes {nodes[0]} and {node_id} hold different histories"
    return first


class Probes:
    """Fresh writes through several nodes every ``interval`` until one is acknowledged.

    Measures when writes resume after a fault: start it right after the fault,
    so only sends issued after it count.
    """

    def __init__(self, reactor, clients, to=SINK):
        self.reactor = reactor
        self.clients = clients
        self.to = to
        self.acked = {}
        self.first_ack = None
        self._pending = []
        self._ids = itertools.count(1)
        self._tag = uuid.uuid4().hex[:6]

    def _fire(self):
        for client in self.clients:
            msg_id = f"probe-{self._tag}-{next(self._ids)}"
            issued = self.reactor.seconds()
            d = client.send_message(self.to, msg_id, client_msg_id=msg_id)

            def ok(result, msg_id=msg_id, issued=issued):
                now = self.reactor.seconds()
                self.acked[msg_id] = {"message_id": result["message_id"], "issued_at": issued,
                                      "acked_at": now}
                if self.first_ack is None:
                    self.first_ack = now
            d.addCallbacks(ok, lambda failure: None)
            self._pending.append(d)

    @defer.inlineCallbacks
    def until_acked(self, timeout, interval=0.1):
        def check():
            if self.first_ack is not None:
                return True
            self._fire()
            return False
        yield wait_until(self.reactor, check, timeout, "a write issued after the kill to be acknowledged",
                         interval=interval)
        return self.first_ack

    def settled(self, timeout=30):
        return defer.DeferredList(self._pending, consumeErrors=True).addTimeout(timeout, self.reactor)
