"""``python -m paxchat.devcluster --config cluster.ini``: every node on this machine.

`make run` uses it. It starts one ``twistd -n paxchat`` per node, prefixes
their output with the node id, and on Ctrl-C or SIGTERM stops them all
(SIGTERM, then SIGKILL after a grace period) so that no node outlives it.
A node that dies while the cluster starts makes it exit non-zero; one that
dies later (killed on purpose to watch failover, say) is only reported.

`DevCluster` and `write_local_config` serve process tests too.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from paxchat import config as configmod

# NodeService logs this once it listens; a port that merely accepts could be someone else's.
READY_MARK = "paxchat node {node_id} serving clients"
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def _die_with_parent():
    """In the child: get SIGTERM if the dev cluster itself dies, even by SIGKILL (Linux)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def twistd_command(config_path, node_id) -> list[str]:
    """The command line that runs one node in the foreground."""
    return [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "paxchat",
            "--config", str(config_path), "--node", str(node_id)]


def accepts(address, timeout=0.5) -> bool:
    """Whether something accepts TCP connections at ``address``."""
    host = "127.0.0.1" if address.host in ("0.0.0.0", "") else address.host
    host = "::1" if host == "::" else host
    try:
        with socket.create_connection((host, address.port), timeout=timeout):
            return True
    except OSError:
        return False


class DevCluster:
    """Child processes running the nodes of one cluster.ini, with their output prefixed."""

    def __init__(self, config, nodes=None, output=None, grace=10.0):
        self.config = config
        self.node_ids = list(nodes) if nodes else list(config.nodes)
        for node_id in self.node_ids:
            config.node(node_id)
        self.output = output or sys.stdout
        self.grace = grace
        self.processes: dict[int, subprocess.Popen] = {}
        self._readers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._ready: set[int] = set()

    def say(self, line):
        with self._lock:
            self.output.write(line + "\n")
            self.output.flush()

    def start_node(self, node_id):
        """Start (or restart) one node."""
        self._ready.discard(node_id)
        process = subprocess.Popen(
            twistd_command(self.config.path, node_id),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us only; we stop the nodes in order
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.processes[node_id] = process
        reader = threading.Thread(target=self._relay, args=(node_id, process), daemon=True,
                                  name=f"node-{node_id}-output")
        reader.start()
        self._readers.append(reader)
        self.say(f"devcluster: started node {node_id} (pid {process.pid})")
        return process

    def _relay(self, node_id, process):
        width = len(str(max(self.config.nodes)))
        mark = READY_MARK.format(node_id=node_id)
        for raw in iter(process.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            if mark in line:
                self._ready.add(node_id)
            self.say(f"node {node_id:>{width}} | {line}")
        process.stdout.close()

    def start(self):
        for node_id in self.node_ids:
            self.start_node(node_id)

    def exited(self) -> dict[int, int]:
        """Nodes whose process has ended, with their exit codes."""
        return {n: p.returncode for n, p in self.processes.items() if p.poll() is not None}

    def wait_ready(self, timeout=60.0, should_stop=lambda: False) -> bool:
        """Wait until every node says it serves clients and its port accepts.

        False if a node exited first or time ran out.
        """
        deadline = time.monotonic() + timeout
        waiting = set(self.node_ids)
        while waiting and time.monotonic() < deadline and not should_stop():
            if self.exited():
                return False
            waiting = {n for n in waiting
                       if n not in self._ready or not accepts(self.config.node(n).client, 0.2)}
            if waiting:
                time.sleep(0.1)
        return not waiting and not self.exited()

    def signal_node(self, node_id, signum=signal.SIGTERM):
        process = self.processes[node_id]
        if process.poll() is None:
            try:
                process.send_signal(signum)
            except ProcessLookupError:
                pass

    def stop(self):
        """SIGTERM every live node, SIGKILL what is left after the grace period, reap all."""
        for node_id in self.processes:
            self.signal_node(node_id, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for node_id, process in self.processes.items():
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"devcluster: node {node_id} ignored SIGTERM for {self.grace:g}s; killing it")
                process.kill()
                process.wait()
        for reader in self._readers:
            reader.join(timeout=5)


def free_ports(count, host="127.0.0.1") -> list[int]:
    """``count`` distinct ports of ``host`` free right now (chosen all bound at once; not reserved)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def write_local_config(directory, nodes=3, host="127.0.0.1", node_keys=(), **cluster) -> Path:
    """Write ``directory/cluster.ini`` for ``nodes`` nodes on free ports of ``host``.

    Keyword arguments become ``[cluster]`` keys (``client_tls="off"``,
    ``bcrypt_cost=4``...); ``node_keys`` (``("metrics", "admin")``) are more
    addresses per node besides ``client`` and ``peer``. Every port of the
    file is chosen while all the others are still bound, so none repeats;
    they are free when chosen, not reserved.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    keys = ("client", "peer", *node_keys)
    ports = iter(free_ports(len(keys) * nodes, host))
    shown = f"[{host}]" if ":" in host else host
    lines = ["[cluster]"] + [f"{k} = {v}" for k, v in cluster.items()]
    for i in range(nodes):
        lines += ["", f"[node.{i + 1}]"] + [f"{key} = {shown}:{next(ports)}" for key in keys]
    path = directory / "cluster.ini"
    path.write_text("\n".join(lines) + "\n")
    return path


def _parse_nodes(text):
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of node ids")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m paxchat.devcluster",
        description="Run every node of cluster.ini on this machine until Ctrl-C.")
    parser.add_argument("--config", default="cluster.ini", help="cluster.ini (default: %(default)s)")
    parser.add_argument("--nodes", type=_parse_nodes, default=None,
                        help="only these node ids, e.g. 1,2,3 (default: all)")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds a node gets to stop before SIGKILL (default: %(default)s)")
    parser.add_argument("--startup-timeout", type=float, default=60.0,
                        help="seconds for every node to accept clients (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        config = configmod.load(args.config)
        cluster = DevCluster(config, args.nodes, grace=args.grace)
    except configmod.ConfigError as e:
        print(f"devcluster: {e}", file=sys.stderr)
        return 2

    stop = threading.Event()
    stopped_by = []

    def on_signal(signum, frame):
        stopped_by.append(signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        cluster.start()
        if not cluster.wait_ready(args.startup_timeout, should_stop=stop.is_set):
            if not stop.is_set():
                dead = cluster.exited()
                if dead:
                    for node_id, code in sorted(dead.items()):
                        cluster.say(f"devcluster: node {node_id} exited with code {code} "
                                    "while the cluster started; stopping the others")
                else:
                    cluster.say(f"devcluster: not every node accepted clients within "
                                f"{args.startup_timeout:g}s; stopping")
                status = 1
                stop.set()
        else:
            addresses = ", ".join(f"{n}={config.node(n).client}" for n in cluster.node_ids)
            cluster.say(f"devcluster: cluster ready, clients connect to {addresses}; "
                        "Ctrl-C stops every node")
        reported = set()
        while not stop.is_set():
            for node_id, code in cluster.exited().items():
                if node_id not in reported:
                    reported.add(node_id)
                    cluster.say(f"devcluster: node {node_id} exited with code {code}")
            if len(reported) == len(cluster.node_ids):
                cluster.say("devcluster: every node has exited")
                status = 1
                break
            stop.wait(0.2)
        if stopped_by:
            cluster.say(f"devcluster: {stopped_by[0]}, stopping every node")
    finally:
        cluster.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    cluster.say("devcluster: all nodes stopped")
    return status


if __name__ == "__main__":
    sys.exit(main())
