"""Jepsen-style run against real paxchat processes: load, faults from a seed, then checks.

    .venv/bin/python tools/nemesis.py --nodes 3 --seed 1 --duration 300 --dir /tmp/nemesis-1

The nodes are twistd processes of this checkout on 127.0.0.1 (tests/cluster_support.py:
free ports, TLS on, bcrypt cost 4), their data, logs, summary.json and history.json in
--dir, which must be new or empty. Exit status 0 when every check passed.

Writers (sequential, one PaxchatClient each, failover) send "w<i>-<n>" to random
recipients, each with client_msg_id = body, recording every acknowledgement.
Readers pinned to each node check that a read never misses a write acknowledged
before it was sent. A nemesis picks, every few seconds, one of: kill -9 (restart
later), SIGSTOP for 0.5-5 s, SIGTERM and restart, kill -9 of the leader, SIGSTOP
of the leader; never more than a minority faulted at once. At the end, with all
nodes up: histories read through a client pinned to each node are checked.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The nodes (child processes) run this checkout too, not whatever the venv installed.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

from twisted.internet import defer, task  # noqa: E402

from paxchat.client import ServerError  # noqa: E402
from tests.cluster_support import (  # noqa: E402
    _LIVE, Cluster, WaitTimeout, all_history, create_accounts, fast_policy, logged_in, password,
    sleep, wait_until)


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


class Run:
    def __init__(self, reactor, args):
        self.reactor = reactor
        self.args = args
        self.rng = random.Random(args.seed)
        keys = dict(snapshot_interval=args.snapshot_interval, request_timeout=args.request_timeout,
                    election_timeout_min=args.election_min, election_timeout_max=args.election_max)
        self.cluster = Cluster(reactor, args.dir, args.nodes, **keys)
        self.n = args.nodes
        self.max_faulty = (self.n - 1) // 2
        self.writers = [f"w{i}" for i in range(1, args.writers + 1)]
        self.recipients = [f"r{i}" for i in range(1, args.recipients + 1)]
        # body -> record
        self.acked: dict[str, dict] = {}
        self.unknown: dict[str, str] = {}      # body -> last error (never acknowledged)
        self.issued: dict[str, dict] = {}      # body -> {writer, n, to}
        self.errors = collections.Counter()   # kind of error a send attempt got
        self.last_acked = {}                   # (writer, recipient) -> highest acked message id
        self.stop_load = False
        self.faulted: set[int] = set()
        self.faults = collections.Counter()
        self.fault_log = []
        self.unexpected = []                   # (time, node, returncode)
        self.stale = []                        # stale reads seen
        self.info = []
        self.reads = collections.Counter()
        self.ack_times = []
        self.t0 = reactor.seconds()

    def now(self):
        return self.reactor.seconds() - self.t0

    # -- processes, never blocking the reactor -----------------------------------------

    @defer.inlineCallbacks
    def stop_node(self, node, signum, timeout):
        process = self.cluster.processes[node]
        if process.poll() is None:
            process.send_signal(signum)
        try:
            yield wait_until(self.reactor, lambda: process.poll() is not None, timeout,
                             f"node {node} to exit after signal {signum}")
        except WaitTimeout:
            log(f"!! node {node} still alive {timeout} s after signal {signum}; SIGKILL")
            self.unexpected.append((self.now(), node, f"did not exit on signal {signum}"))
            process.kill()
            yield wait_until(self.reactor, lambda: process.poll() is not None, 10, "SIGKILL")
        _LIVE.pop(process.pid, None)
        return process.returncode

    @defer.inlineCallbacks
    def restart(self, node):
        self.cluster.start(node)
        began = self.now()
        try:
            yield self.cluster.wait_ready(node, timeout=60)
        except Exception as e:
            log(f"!! node {node} did not come back: {e!r}"[:2000])
            self.unexpected.append((self.now(), node, f"restart failed: {str(e)[:200]}"))
            raise
        return self.now() - began

    @defer.inlineCallbacks
    def leader(self):
        seen = yield self.cluster.leaders([n for n in self.cluster.node_ids if n not in self.faulted
                                           and self.cluster.alive(n)])
        votes = collections.Counter(v for v in seen.values() if v is not None)
        return votes.most_common(1)[0][0] if votes else None

    # -- nemesis -----------------------------------------------------------------

    @defer.inlineCallbacks
    def fault(self, kind, node):
        rng = self.rng
        self.faulted.add(node)
        self.faults[kind] += 1
        start = self.now()
        detail = ""
        try:
            if kind in ("kill9", "kill9_leader"):
                yield self.stop_node(node, signal.SIGKILL, 10)
                down = rng.uniform(1, 5)
                yield sleep(self.reactor, down)
                took = yield self.restart(node)
                detail = f"down {down:.1f}s, ready {took:.1f}s after restart"
            elif kind in ("pause", "pause_leader"):
                length = rng.uniform(0.5, 5)
                self.cluster.pause(node)
                yield sleep(self.reactor, length)
                self.cluster.unpause(node)
                detail = f"paused {length:.1f}s"
            elif kind == "term":
                began = self.now()
                code = yield self.stop_node(node, signal.SIGTERM, 30)
                stopped = self.now() - began
                down = rng.uniform(1, 4)
                yield sleep(self.reactor, down)
                took = yield self.restart(node)
                detail = f"exit {code} after {stopped:.1f}s, down {down:.1f}s, ready {took:.1f}s"
        except Exception as e:
            detail += f" FAILED {e!r}"[:300]
        finally:
            self.fault_log.append((round(start, 1), kind, node, detail))
            log(f"fault {kind} node {node}: {detail}")
            self.faulted.discard(node)

    @defer.inlineCallbacks
    def nemesis(self, until):
        rng = self.rng
        kinds = ["kill9", "pause", "term", "kill9_leader", "pause_leader"]
        running = []
        while self.now() < until:
            yield sleep(self.reactor, rng.uniform(self.args.interval_min, self.args.interval_max))
            if self.now() >= until:
                break
            kind = rng.choice(kinds)
            healthy = [n for n in self.cluster.node_ids if n not in self.faulted]
            if len(self.faulted) >= self.max_faulty:
                self.faults["skipped_busy"] += 1
                continue
            if kind.endswith("leader"):
                node = yield self.leader()
                if node is None or node in self.faulted:
                    self.faults["skipped_no_leader"] += 1
                    continue
            else:
                node = rng.choice(healthy)
            log(f"fault {kind} on node {node} (faulted now: {sorted(self.faulted)})")
            running.append(self.fault(kind, node))
        yield defer.DeferredList(running)

    @defer.inlineCallbacks
    def watchdog(self):
        """Nodes that exit while no fault is on them: a finding. Restart them."""
        while not self.stop_load:
            yield sleep(self.reactor, 0.5)
            for n in self.cluster.node_ids:
                if n not in self.faulted and not self.cluster.alive(n):
                    code = self.cluster.processes[n].returncode
                    log(f"!! node {n} exited on its own with code {code}; restarting")
                    self.unexpected.append((self.now(), n, f"exited {code}"))
                    self.faulted.add(n)
                    try:
                        yield self.restart(n)
                    except Exception:
                        pass
                    finally:
                        self.faulted.discard(n)

    # -- load ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def writer(self, index, client):
        name = self.writers[index]
        rng = random.Random(f"{self.args.seed}-{name}")
        n = 0
        while not self.stop_load:
            n += 1
            to = rng.choice(self.recipients)
            body = f"{name}-{n}"
            self.issued[body] = {"writer": name, "n": n, "to": to}
            issued = self.now()
            for attempt in range(self.args.attempts):
                try:
                    result = yield client.send_message(to, body, client_msg_id=body)
                except ServerError as e:
                    self.errors[e.code] += 1
                    self.unknown[body] = f"{e.code}"
                    if e.code == "rate_limited":
                        yield sleep(self.reactor, 0.2)
                        continue
                except Exception as e:
                    self.errors[type(e).__name__] += 1
                    self.unknown[body] = type(e).__name__
                else:
                    self.unknown.pop(body, None)
                    at = self.now()
                    self.acked[body] = {"message_id": result["message_id"], "writer": name, "n": n,
                                        "to": to, "issued": issued, "acked": at, "attempt": attempt}
                    self.ack_times.append(at)
                    key = (name, to)
                    self.last_acked[key] = max(self.last_acked.get(key, 0), result["message_id"])
                    break
                yield sleep(self.reactor, 1.0)   # the same client_msg_id again, later
            if self.args.think:
                yield sleep(self.reactor, rng.uniform(0, self.args.think))

    @defer.inlineCallbacks
    def reader(self, node, client, recipient):
        """Reads through ``node``: never older than what was acknowledged before the read was sent."""
        rng = random.Random(f"{self.args.seed}-reader-{node}")
        while not self.stop_load:
            yield sleep(self.reactor, 0.05)
            writer = rng.choice(self.writers)
            expected = self.last_acked.get((writer, recipient), 0)
            sent_at = self.now()
            try:
                page = yield client.history(peer=writer, limit=1)
            except Exception as e:
                self.reads[f"error {type(e).__name__} {getattr(e, 'code', '')}".strip()] += 1
                continue
            self.reads["ok"] += 1
            newest = page["messages"][0]["id"] if page["messages"] else 0
            if newest < expected:
                self.stale.append((round(sent_at, 2), node, recipient, writer, newest, expected))
                log(f"!! STALE READ on node {node}: {recipient}<-{writer} newest {newest}, "
                    f"acknowledged {expected} before the read")

    # -- the run ---------------------------------------------------------------------

    @defer.inlineCallbacks
    def setup(self):
        c = self.cluster
        yield c.start_and_wait()
        leader = yield c.wait_leader()
        log(f"cluster of {self.n} up in {c.directory}, leader {leader}")
        yield create_accounts(c, *self.writers, *self.recipients)
        policy = fast_policy(deadline=self.args.client_deadline, call_timeout=self.args.call_timeout)
        self.writer_clients = []
        for i, name in enumerate(self.writers):
            client = yield logged_in(c, name, prefer=c.node_ids[i % self.n], policy=policy)
            self.writer_clients.append(client)
        self.reader_clients = []
        for i, node in enumerate(c.node_ids):
            recipient = self.recipients[i % len(self.recipients)]
            client = yield logged_in(c, recipient, only=node,
                                     policy=fast_policy(deadline=5, unavailable_window=2, answer_timeout=3))
            self.reader_clients.append((node, client, recipient))

    @defer.inlineCallbacks
    def run(self):
        yield self.setup()
        self.t0 = self.reactor.seconds()
        writers = [self.writer(i, cl) for i, cl in enumerate(self.writer_clients)]
        readers = [self.reader(n, cl, r) for n, cl, r in self.reader_clients] if self.args.readers else []
        dog = self.watchdog()
        progress = task.LoopingCall(lambda: log(
            f"t={self.now():.0f}s acked={len(self.acked)} unknown={len(self.unknown)} "
            f"errors={dict(self.errors)} faulted={sorted(self.faulted)} reads={dict(self.reads)}"))
        progress.start(15, now=False)
        yield self.nemesis(self.args.duration)
        log("nemesis over; every node up")
        yield sleep(self.reactor, 5)   # a little load on the healed cluster
        self.stop_load = True
        progress.stop()
        yield defer.DeferredList(writers + readers + [dog])
        log(f"load stopped: {len(self.acked)} acknowledged, {len(self.unknown)} unknown")
        yield self.cluster.close_clients()
        yield self.check()

    # -- checks ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def read_everything(self, node):
        """{user: [(id, from, to, body, read)]} as ``node`` serves it, oldest first."""
        out = {}
        for user in self.recipients + self.writers:
            client = self.cluster.client(only=node, policy=fast_policy(deadline=30))
            try:
                yield client.login(user, password(user))
                messages = yield all_history(client)
            finally:
                yield client.close()
            out[user] = [(m["id"], m["from"], m["to"], m["body"], m["read"]) for m in reversed(messages)]
        return out

    @defer.inlineCallbacks
    def check(self):
        c = self.cluster
        problems = []
        assert all(c.alive(n) for n in c.node_ids), "a node is down at the end"
        index = yield c.wait_applied_everywhere(timeout=120)
        log(f"every node applied index {index}")
        views = {}
        for node in c.node_ids:
            views[node] = yield self.read_everything(node)
            log(f"read node {node}: {sum(len(v) for k, v in views[node].items() if k.startswith('r'))} "
                f"messages to recipients")
        first = c.node_ids[0]
        for node in c.node_ids[1:]:
            if views[node] != views[first]:
                diff = [u for u in views[first] if views[first][u] != views[node].get(u)]
                problems.append(f"node {node} history differs from node {first} for {diff}")
        for node, view in views.items():
            where = f"node {node}"
            received = [m for r in self.recipients for m in view[r]]
            bodies = collections.Counter(m[3] for m in received)
            dup = [b for b, k in bodies.items() if k > 1]
            if dup:
                problems.append(f"{where}: {len(dup)} messages stored twice, e.g. {dup[:5]}")
            ids = collections.Counter(m[0] for m in received)
            if any(k > 1 for k in ids.values()):
                problems.append(f"{where}: a message id in two recipients' histories")
            by_body = {m[3]: m for m in received}
            never = [b for b in by_body if b not in self.issued]
            if never:
                problems.append(f"{where}: messages never sent: {never[:5]}")
            missing = [b for b in self.acked if b not in by_body]
            if missing:
                problems.append(f"{where}: {len(missing)} acknowledged messages missing, e.g. {missing[:5]}")
            wrong = [(b, a["message_id"], by_body[b][0]) for b, a in self.acked.items()
                     if b in by_body and (by_body[b][0] != a["message_id"] or by_body[b][2] != a["to"]
                                          or by_body[b][1] != a["writer"])]
            if wrong:
                problems.append(f"{where}: stored otherwise than acknowledged: {wrong[:5]}")
            # The writers' own histories hold exactly what they sent, in order.
            for w in self.writers:
                sent = [m for m in view[w] if m[1] == w]
                expect = sorted((m for m in received if m[1] == w), key=lambda m: m[0])
                if sent != expect:
                    problems.append(f"{where}: {w}'s history is not what its recipients hold")
                ns = [int(m[3].rsplit("-", 1)[1]) for m in sent]
                acked_ns = [n for n, m in zip(ns, sent) if m[3] in self.acked]
                if acked_ns != sorted(acked_ns):
                    problems.append(f"{where}: {w}'s acknowledged messages out of send order: {acked_ns[:20]}")
                if ns != sorted(ns):
                    self.info.append(f"{where}: {w}'s messages incl. unacknowledged out of order")
        present = {m[3] for r in self.recipients for m in views[first][r]}
        unknown_present = sum(1 for b in self.unknown if b in present)
        retried = sum(1 for a in self.acked.values() if a["attempt"] > 0)
        if self.stale:
            problems.append(f"{len(self.stale)} stale reads, e.g. {self.stale[:5]}")
        if self.unexpected:
            problems.append(f"unexpected node exits: {self.unexpected}")
        # Logs.
        findings = collections.Counter()
        samples = {}
        for n in c.node_ids:
            for line in c.output(n).splitlines():
                if re.search(r"Traceback|Unhandled|critical|CRITICAL|\bError\b|error", line):
                    key = re.sub(r"\d+", "N", line.split("] ", 1)[-1])[:160]
                    findings[(n, key)] += 1
                    samples.setdefault(key, line[:400])
        latencies = sorted(a["acked"] - a["issued"] for a in self.acked.values())

        def pct(q):
            return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3) if latencies else None
        slow = [(round(a["acked"] - a["issued"], 2), round(a["issued"], 1), b) for b, a in self.acked.items()
                if a["acked"] - a["issued"] > 2.0]
        gaps = sorted((b - a, a) for a, b in zip(sorted(self.ack_times), sorted(self.ack_times)[1:]))[-5:]
        summary = {
            "seed": self.args.seed, "nodes": self.n, "duration": self.args.duration,
            "faults": dict(self.faults), "acked": len(self.acked), "unknown": len(self.unknown),
            "unknown_present_once": unknown_present, "acked_after_resend": retried,
            "send_errors": dict(self.errors), "reads": dict(self.reads), "stale_reads": len(self.stale),
            "applied_index": index,
            "send_latency": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0),
                             "over_2s": len(slow), "over_4s": sum(1 for x in slow if x[0] > 4)}, "longest_ack_gaps": [(round(g, 2), round(t, 1)) for g, t in gaps],
            "problems": problems, "info": self.info[:20],
        }
        log("fault log:\n" + "\n".join(map(str, self.fault_log)))
        log("log lines of note:\n" + "\n".join(f"node {n} x{k}: {samples[key]}"
                                                 for (n, key), k in sorted(findings.items())))
        log("SUMMARY " + json.dumps(summary, indent=1))
        Path(self.args.dir, "summary.json").write_text(json.dumps(summary, indent=1))
        Path(self.args.dir, "history.json").write_text(json.dumps({
            "acked": self.acked, "unknown": self.unknown, "faults": self.fault_log,
            "stale": self.stale}))
        # The on-disk states, equal key for key (stops every node gracefully).
        try:
            keys = yield c.check_equal_states()
            log(f"on-disk states equal on every node: {keys} keys")
        except Exception as e:
            problems.append(f"check_equal_states: {e}"[:1000])
            log(f"!! check_equal_states: {e}"[:3000])
        return problems


def main(reactor, args):
    if Path(args.dir).exists() and any(Path(args.dir).iterdir()):
        raise SystemExit(f"{args.dir} is not empty: give a new directory")
    run = Run(reactor, args)

    @defer.inlineCallbacks
    def go():
        try:
            problems = yield run.run()
        finally:
            try:
                yield run.cluster.close_clients().addTimeout(10, reactor)
            except Exception:
                pass
            for n in run.cluster.node_ids:
                p = run.cluster.processes.get(n)
                if p is not None and p.poll() is None:
                    p.send_signal(signal.SIGCONT)
            run.cluster.kill_all()
        log("PASS" if not problems else "FAIL:\n" + "\n".join(problems))
        if problems:
            raise SystemExit(1)
    return go()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--duration", type=float, default=300)
    p.add_argument("--dir", required=True)
    p.add_argument("--writers", type=int, default=8)
    p.add_argument("--recipients", type=int, default=3)
    p.add_argument("--attempts", type=int, default=3)
    p.add_argument("--think", type=float, default=0.0)
    p.add_argument("--readers", type=int, default=1)
    p.add_argument("--interval-min", type=float, default=2.0)
    p.add_argument("--interval-max", type=float, default=6.0)
    p.add_argument("--client-deadline", type=float, default=30.0)
    p.add_argument("--call-timeout", type=float, default=None,
                   help="writers' calls fail after this long (the script resends them with the same id)")
    p.add_argument("--snapshot-interval", type=int, default=2000)
    p.add_argument("--request-timeout", type=float, default=5.0)
    p.add_argument("--election-min", type=float, default=0.3)
    p.add_argument("--election-max", type=float, default=0.6)
    task.react(main, [p.parse_args()])
