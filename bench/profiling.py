"""Profiling hooks for the write benchmark: py-spy attached to the leader, or pyinstrument inside every node.

Neither profiler is a paxchat dependency: ``ensure_tool`` pip-installs it
into the running interpreter's environment on first use.

- ``--profile py-spy``: during each write point with ``--profile-clients``
  clients (64 by default) py-spy samples the leader process for the
  point's duration; the collapsed stacks go to ``<workdir>/profile-*.txt``
  and the top functions by own time and by total time are printed.
- ``--profile pyinstrument``: every node runs under pyinstrument
  (``python -m bench.profiled_node``) and writes ``profile-node-N.txt`` when
  it stops. It profiles the node's whole life, set-up included.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import shutil
import subprocess
import sys

from twisted.internet import threads

PROFILE_CLIENTS = 64


def ensure_tool(name) -> None:
    """pip-install py-spy or pyinstrument into this environment if it is missing."""
    module = {"py-spy": None, "pyinstrument": "pyinstrument"}[name]
    present = (importlib.util.find_spec(module) is not None) if module else bool(py_spy_path())
    if not present:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", name], check=True, timeout=600)


def py_spy_path():
    here = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return here if os.path.exists(here) else shutil.which("py-spy")


def node_wrapper(ctx, bench):
    """The command wrapper that runs each node under pyinstrument, or None."""
    if ctx.profile != "pyinstrument":
        return None
    out_dir = ctx.workdir(f"{bench}-profiles")

    def wrap(node_id, command):
        out = os.path.join(out_dir, f"profile-node-{node_id}.txt")
        return [sys.executable, "-m", "bench.profiled_node", "--out", out, "--"] + command[1:]
    return wrap


class _Spy:
    def __init__(self, process, path, label):
        self.process = process
        self.path = path
        self.label = label


def maybe_attach(ctx, cluster, leader, clients, seconds):
    """Start py-spy on the leader for this point if asked for; None otherwise."""
    if ctx.profile != "py-spy" or clients != getattr(ctx, "profile_clients", PROFILE_CLIENTS):
        return None
    path = os.path.join(ctx.workdir("profiles"), f"profile-leader-{clients}-{len(os.listdir(ctx.workdir('profiles')))}.txt")
    process = subprocess.Popen(
        [py_spy_path(), "record", "--pid", str(cluster.pid(leader)), "--duration", str(int(seconds + 1)),
         "--rate", "200", "--format", "raw", "--nonblocking", "-o", path],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return _Spy(process, path, f"leader, {clients} clients")


async def finish(ctx, spy):
    if spy is None:
        return
    try:
        await threads.deferToThread(spy.process.wait, 60)
    except Exception:
        spy.process.kill()
        spy.process.wait()
    if not os.path.exists(spy.path):
        ctx.say(f"[profile] py-spy wrote nothing: {spy.process.stderr.read().decode()[-300:]}")
        return
    ctx.say(f"[profile] py-spy collapsed stacks of the {spy.label}: {spy.path}")
    for line in summarize(spy.path):
        ctx.say(f"[profile] {line}")


# Leaf frames where a thread waits rather than works (epoll, queues, locks).
IDLE_LEAVES = ("EPollReactor.doPoll", "Condition.wait", "Event.wait", "Thread.join",
               "Queue.get", "select", "poll")


def summarize(path, top=15):
    """Top functions by own samples and by inclusive samples, from collapsed stacks.

    Samples whose leaf is a wait (see IDLE_LEAVES) are counted apart: the
    percentages are of the samples where a thread was working.
    """
    with open(path) as f:
        return summarize_lines(f, top)


def summarize_lines(lines, top=15):
    own = collections.Counter()
    inclusive = collections.Counter()
    total = idle = 0
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        leaf = _short(frames[-1])
        if leaf.split(" (")[0] in IDLE_LEAVES:
            idle += n
            continue
        total += n
        own[leaf] += n
        for frame in set(_short(fr) for fr in frames if "paxchat/" in fr):
            inclusive[frame] += n
    if not total:
        return [f"no busy samples ({idle} idle)"]
    lines = [f"{total} busy samples ({idle} idle left out); by own time:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines.append("paxchat functions by total time (anywhere on the stack):")
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return lines


def _short(frame):
    """'fn (path/to/file.py:12)' -> 'fn (file.py)'; line numbers vary, functions do not."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    parts = path.split("/")
    short = "/".join(parts[-2:]) if parts else path
    return f"{name} ({short})"
