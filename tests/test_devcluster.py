"""`python -m paxchat.devcluster`: starts every node, relays output, leaves no orphans."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from paxchat import config as configmod
from paxchat import tls
from paxchat.devcluster import accepts, write_local_config

STARTUP = 60  # seconds; three interpreters starting at once on two cores


def children_of(pid):
    """The pids whose parent is ``pid``, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Run:
    """The dev cluster as a child process, its output collected; killed on exit whatever happens."""

    def __init__(self, *args):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "paxchat.devcluster", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True)
        self.lines = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self):
        return "".join(self.lines)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        nodes = children_of(self.process.pid)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        for pid in nodes:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.reader.join(5)


def test_starts_every_node_and_stops_them_all_on_sigint(tmp_path):
    cfg = configmod.load(write_local_config(tmp_path, nodes=3, bcrypt_cost=4))
    tls.make_cluster_certs(cfg)
    with Run("--config", str(cfg.path), "--grace", "10") as run:
        wait_for(lambda: all(accepts(n.client, 0.2) for n in cfg.nodes.values())
                 or run.process.poll() is not None, STARTUP, "every node to accept clients")
        assert run.process.poll() is None, run.output
        nodes = children_of(run.process.pid)
        assert len(nodes) == 3
        wait_for(lambda: "cluster ready" in run.output, 10, "the ready line")

        run.process.send_signal(signal.SIGINT)
        assert run.process.wait(30) == 0, run.output
        run.reader.join(5)
        assert not [pid for pid in nodes if alive(pid)]
        for node_id in (1, 2, 3):
            assert f"node {node_id} | " in run.output
            assert f"paxchat node {node_id} stopped" in run.output
        assert not any(accepts(n.client, 0.2) for n in cfg.nodes.values())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_nodes_die_with_a_killed_dev_cluster(tmp_path):
    cfg = configmod.load(write_local_config(tmp_path, nodes=2, client_tls="off", bcrypt_cost=4))
    tls.make_cluster_certs(cfg)  # peer links are always TLS
    with Run("--config", str(cfg.path)) as run:
        wait_for(lambda: "cluster ready" in run.output or run.process.poll() is not None,
                 STARTUP, "the ready line")
        nodes = children_of(run.process.pid)
        assert len(nodes) == 2, run.output
        run.process.kill()
        run.process.wait(10)
        wait_for(lambda: not any(alive(pid) for pid in nodes), 30, "the orphaned nodes to stop")


def test_only_the_nodes_asked_for(tmp_path):
    cfg = configmod.load(write_local_config(tmp_path, nodes=3, client_tls="off", bcrypt_cost=4))
    tls.make_cluster_certs(cfg)  # peer links are always TLS
    with Run("--config", str(cfg.path), "--nodes", "2") as run:
        wait_for(lambda: accepts(cfg.node(2).client, 0.2) or run.process.poll() is not None,
                 STARTUP, "node 2 to accept clients")
        wait_for(lambda: "cluster ready" in run.output, 10, "the ready line")
        assert not accepts(cfg.node(1).client, 0.2)
        assert len(children_of(run.process.pid)) == 1
        run.process.send_signal(signal.SIGTERM)
        assert run.process.wait(30) == 0, run.output


def test_a_node_that_cannot_start_fails_the_run_with_its_error(tmp_path):
    cfg = configmod.load(write_local_config(tmp_path, nodes=2, client_tls="off", bcrypt_cost=4))
    tls.make_cluster_certs(cfg)  # peer links are always TLS
    address = cfg.node(2).client
    squatter = socket.socket()
    try:
        squatter.bind((address.host, address.port))
        squatter.listen()
        with Run("--config", str(cfg.path), "--grace", "10") as run:
            code = run.process.wait(STARTUP)
            run.reader.join(5)
            assert code != 0, run.output
            assert "paxchat node 2 could not start" in run.output
            assert "node 2 exited with code 1 while the cluster started" in run.output
            assert "Traceback" not in run.output
    finally:
        squatter.close()
    assert not accepts(cfg.node(1).client, 0.2)


def test_bad_config_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "paxchat.devcluster", "--config", str(tmp_path / "nope.ini")],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == f"devcluster: {tmp_path / 'nope.ini'}: no such file"


def test_unknown_node_in_nodes(tmp_path):
    path = write_local_config(tmp_path, nodes=2, client_tls="off")
    result = subprocess.run(
        [sys.executable, "-m", "paxchat.devcluster", "--config", str(path), "--nodes", "1,7"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "no [node.7] section" in result.stderr


@pytest.mark.parametrize("nodes,host", [(1, "127.0.0.1"), (5, "127.0.0.1")])
def test_write_local_config(tmp_path, nodes, host):
    cfg = configmod.load(write_local_config(tmp_path, nodes=nodes, host=host, client_tls="off"))
    assert list(cfg.nodes) == list(range(1, nodes + 1))
    assert cfg.client_tls is False
    ports = {a.port for n in cfg.nodes.values() for a in (n.client, n.peer)}
    assert len(ports) == 2 * nodes


def test_write_local_config_gives_every_address_its_own_port(tmp_path):
    cfg = configmod.load(write_local_config(tmp_path, nodes=5, node_keys=("metrics", "admin")))
    ports = [a.port for n in cfg.nodes.values() for a in (n.client, n.peer, n.metrics, n.admin)]
    assert len(set(ports)) == len(ports) == 20
