"""A local 3-node paxchat cluster for one benchmark: temp dir, certificates, twistd per node.

Built on ``paxchat.devcluster.DevCluster`` (readiness from the node's log
line, output relayed), with what a benchmark needs on top: a config on free
ports with TLS on, SIGKILL and restart of one node, the node's pid for RSS
and profilers, waiting on the reactor instead of sleeping, and an optional
profiler wrapped around each node.
"""

from __future__ import annotations

import compileall
import os
import signal
import subprocess
import sys
import time

from twisted.internet import defer, task
from twisted.logger import Logger

from paxchat import config as configmod
from paxchat import tls
from paxchat.devcluster import TWISTD, DevCluster, accepts, twistd_command, write_local_config

from . import procs

log = Logger()


class _BenchDevCluster(DevCluster):
    """DevCluster whose node command can be wrapped (profilers) and whose children die with us."""

    def __init__(self, config, output, wrap=None):
        super().__init__(config, output=output, grace=15.0)
        self.wrap = wrap

    def start_node(self, node_id):
        self._ready.discard(node_id)
        command = twistd_command(self.config.path, node_id)
        if self.wrap is not None:
            command = self.wrap(node_id, command)
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=procs.die_with_parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.processes[node_id] = process
        import threading
        reader = threading.Thread(target=self._relay, args=(node_id, process), daemon=True,
                                  name=f"node-{node_id}-output")
        reader.start()
        self._readers.append(reader)
        self.say(f"bench: started node {node_id} (pid {process.pid})")
        return process

    def is_ready(self, node_id) -> bool:
        process = self.processes.get(node_id)
        return (process is not None and process.poll() is None and node_id in self._ready
                and accepts(self.config.node(node_id).client, 0.2))


class NodeFailed(Exception):
    """A node exited or never became ready."""


def compile_tree():
    """Byte-compile the package the nodes run, as pip does when it installs it.

    A node started from a source tree that has no bytecode, with
    PYTHONDONTWRITEBYTECODE set (as in the systemd unit), compiles ~40
    modules at every start: ~45 ms here, which an installed node never
    pays and catch-up and failover would count. Files already compiled are
    skipped.
    """
    import paxchat
    root = os.path.dirname(os.path.dirname(os.path.abspath(paxchat.__file__)))
    for directory in ("paxchat", os.path.join("twisted", "plugins")):
        compileall.compile_dir(os.path.join(root, directory), quiet=2)


class PaxchatCluster:
    """``nodes`` paxchat nodes on 127.0.0.1, TLS on, fsync on (the only mode), under ``workdir``.

    ``wrap(node_id, command) -> command`` runs each node under another
    program (a profiler). Use ``async with``-free style: ``await start()``,
    then always ``stop()`` in a ``finally``.
    """

    def __init__(self, reactor, workdir, nodes=3, bcrypt_cost=12, wrap=None, **cluster_keys):
        self.reactor = reactor
        self.workdir = workdir
        self.nodes = nodes
        self.bcrypt_cost = bcrypt_cost
        self.wrap = wrap
        # The write and connection limits guard against runaway clients (200
        # writes/s per connection, 20 new connections/s per address by
        # default); a load generator is one on purpose, and all of its
        # clients come from 127.0.0.1: measure the server, not the limits.
        cluster_keys.setdefault("writes_per_connection", 1000000)
        cluster_keys.setdefault("writes_per_account", 1000000)
        cluster_keys.setdefault("connections_per_address", 1000000)
        self.cluster_keys = cluster_keys
        self.config = None
        self.dev = None
        self._output = None

    @property
    def node_ids(self):
        return list(self.config.nodes)

    async def start(self, timeout=90.0):
        compile_tree()
        os.makedirs(self.workdir, exist_ok=True)
        path = write_local_config(self.workdir, nodes=self.nodes, client_tls="on",
                                  bcrypt_cost=self.bcrypt_cost, **self.cluster_keys)
        self.config = configmod.load(path)
        tls.make_cluster_certs(self.config)
        self._output = open(os.path.join(self.workdir, "nodes.log"), "a", buffering=1)
        self.dev = _BenchDevCluster(self.config, self._output, self.wrap)
        self.dev.start()
        await self.wait_ready(self.node_ids, timeout)

    async def wait_ready(self, node_ids, timeout=90.0):
        deadline = time.monotonic() + timeout
        waiting = set(node_ids)
        while waiting:
            dead = {n: c for n, c in self.dev.exited().items() if n in waiting}
            if dead:
                raise NodeFailed(f"paxchat node(s) exited while starting: {dead} "
                                 f"(see {self.workdir}/nodes.log)")
            waiting = {n for n in waiting if not self.dev.is_ready(n)}
            if waiting and time.monotonic() > deadline:
                raise NodeFailed(f"paxchat node(s) {sorted(waiting)} not serving after {timeout:g}s")
            if waiting:
                await task.deferLater(self.reactor, 0.05, lambda: None)

    def pid(self, node_id) -> int:
        return self.dev.processes[node_id].pid

    def alive(self, node_id) -> bool:
        process = self.dev.processes.get(node_id)
        return process is not None and process.poll() is None

    def kill(self, node_id):
        """SIGKILL one node (no chance to flush or say goodbye) and reap it."""
        procs.kill_hard(self.dev.processes[node_id])

    def restart(self, node_id):
        """Start a node again on its old data; returns at once (see ``wait_ready``)."""
        return self.dev.start_node(node_id)

    def stop(self):
        """Stop every node: SIGTERM (so wrapped profilers write out), SIGKILL after a grace."""
        if self.dev is not None:
            try:
                self.dev.stop()
            finally:
                for process in self.dev.processes.values():
                    procs.kill_hard(process)
        if self._output is not None:
            self._output.close()
            self._output = None
