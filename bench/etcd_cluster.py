"""The peer: a local 3-member etcd 3.4 cluster, driven over its v3 JSON gateway.

Members listen on 127.0.0.1 free ports (plain HTTP, as the reference
numbers were taken), keep their data in a temp dir, run with etcd's default
heartbeat (100 ms) and election timeout (1000 ms) and fsync on (etcd has no
way to turn it off). ``ensure_etcd`` installs Debian's ``etcd-server`` when
the binary is missing and we are root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

from twisted.internet import task

from paxchat.devcluster import free_ports

from . import load, procs


class EtcdUnavailable(Exception):
    """No etcd binary, and it cannot be installed here."""


def find_etcd():
    return shutil.which("etcd") or (os.path.exists("/usr/bin/etcd") and "/usr/bin/etcd") or None


def ensure_etcd(install=True) -> str:
    """Path of the etcd binary, installing Debian's etcd-server if missing and root."""
    path = find_etcd()
    if path:
        return path
    if not install:
        raise EtcdUnavailable("no etcd binary on PATH (install Debian's etcd-server 3.4)")
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise EtcdUnavailable("no etcd binary on PATH and not root with apt-get: run "
                              "`sudo apt-get install etcd-server` to compare against etcd")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "install", "-y", "-q", "etcd-server"],
                    ["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "etcd-server"]):
        result = subprocess.run(command, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, timeout=600)
        if result.returncode == 0 and command[1] == "install":
            break
    path = find_etcd()
    if not path:
        raise EtcdUnavailable(f"apt-get install etcd-server did not give an etcd binary: "
                              f"{result.stderr.strip()[-300:]}")
    return path


def etcd_version(binary) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    for line in out.splitlines():
        if line.startswith("etcd Version:"):
            return line.split(":", 1)[1].strip()
    return out.strip().splitlines()[0] if out.strip() else "unknown"


class EtcdCluster:
    """``members`` etcd members under ``workdir``; ``await start()``, always ``stop()``."""

    def __init__(self, reactor, workdir, binary, members=3):
        self.reactor = reactor
        self.workdir = workdir
        self.binary = binary
        self.count = members
        ports = free_ports(2 * members)
        self.client_ports = {i + 1: ports[2 * i] for i in range(members)}
        self.peer_ports = {i + 1: ports[2 * i + 1] for i in range(members)}
        self.processes = {}
        self._logs = {}

    @property
    def member_ids(self):
        return list(self.client_ports)

    def address(self, member):
        return ("127.0.0.1", self.client_ports[member])

    def _command(self, member, state):
        initial = ",".join(f"m{i}=http://127.0.0.1:{p}" for i, p in self.peer_ports.items())
        return [
            self.binary, "--name", f"m{member}",
            "--data-dir", os.path.join(self.workdir, f"m{member}.etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{self.client_ports[member]}",
            "--advertise-client-urls", f"http://127.0.0.1:{self.client_ports[member]}",
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_ports[member]}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_ports[member]}",
            "--initial-cluster", initial, "--initial-cluster-state", state,
            "--initial-cluster-token", "paxchat-bench",
            "--heartbeat-interval", "100", "--election-timeout", "1000",
            "--log-level", "warn", "--logger", "zap",
        ]

    def start_member(self, member, state="new"):
        os.makedirs(self.workdir, exist_ok=True)
        logfile = self._logs.get(member)
        if logfile is None:
            logfile = self._logs[member] = open(os.path.join(self.workdir, f"m{member}.log"), "ab")
        self.processes[member] = subprocess.Popen(
            self._command(member, state), stdin=subprocess.DEVNULL, stdout=logfile,
            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=procs.die_with_parent)
        return self.processes[member]

    async def start(self, timeout=60.0):
        for member in self.member_ids:
            self.start_member(member)
        await self.wait_ready(self.member_ids, timeout)

    def pid(self, member):
        return self.processes[member].pid

    def kill(self, member):
        procs.kill_hard(self.processes[member])

    def restart(self, member):
        return self.start_member(member, state="existing")

    async def status(self, member, timeout=2.0):
        proto = await load.http_connect(self.reactor, *self.address(member))
        try:
            return await load.etcd_call(self.reactor, proto, "/v3/maintenance/status", {}, timeout)
        finally:
            proto.transport.abortConnection()

    async def wait_ready(self, members, timeout=60.0):
        """Every member answers status and knows a leader."""
        deadline = time.monotonic() + timeout
        waiting = set(members)
        while waiting:
            for member in list(waiting):
                if self.processes[member].poll() is not None:
                    raise RuntimeError(f"etcd member {member} exited "
                                       f"(see {self.workdir}/m{member}.log)")
                try:
                    status = await self.status(member)
                    if status.get("leader") not in (None, "0"):
                        waiting.discard(member)
                except Exception:
                    pass
            if waiting:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd members {sorted(waiting)} not ready after {timeout:g}s")
                await task.deferLater(self.reactor, 0.05, lambda: None)

    async def leader(self, timeout=30.0):
        """The member id (1..n) that leads, as a live member reports it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ids = {}
            leader = None
            for member in self.member_ids:
                if self.processes[member].poll() is not None:
                    continue
                try:
                    status = await self.status(member)
                except Exception:
                    continue
                ids[status["header"]["member_id"]] = member
                if status.get("leader") not in (None, "0"):
                    leader = status["leader"]
            if leader in ids:
                return ids[leader]
            await task.deferLater(self.reactor, 0.05, lambda: None)
        raise TimeoutError("etcd has no leader")

    def stop(self):
        for process in self.processes.values():
            procs.kill_hard(process)
        for logfile in self._logs.values():
            logfile.close()
        self._logs.clear()
