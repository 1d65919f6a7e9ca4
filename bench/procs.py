"""Process plumbing shared by both clusters: death with the parent, RSS, fd limits.

A benchmark that dies, or is killed by a test's timeout, must not leave
nodes behind: every child gets SIGKILL from the kernel when we go
(PR_SET_PDEATHSIG), on top of the explicit stop in each harness.
"""

from __future__ import annotations

import os
import resource
import signal
import sys


def die_with_parent():
    """In the child (preexec_fn): SIGKILL when the benchmark process dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def raise_nofile(wanted=65536) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards ``wanted`` (children inherit it); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def rss_bytes(pid, field="VmRSS") -> int | None:
    """Resident set size of ``pid`` from /proc (``field="VmHWM"``: its peak), or
    None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid) -> float | None:
    """User + system CPU time ``pid`` has used so far (all its threads), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU time the leader, the other servers and the load generator spend in a window.

    Throughput says how fast; CPU per write says what each write costs and
    where: when both systems keep the cores busy, the throughput ratio is
    the ratio of what a write costs in all.
    """

    def __init__(self, leader_pid, other_pids):
        self._pids = {"leader": [leader_pid], "others": list(other_pids), "client": [os.getpid()]}
        self._start = self._end = None

    def _read(self):
        return {role: sum(cpu_seconds(pid) or 0.0 for pid in pids) for role, pids in self._pids.items()}

    def start(self):
        self._start = self._read()

    def stop(self):
        if self._end is None:
            self._end = self._read()

    def per_write(self, writes) -> dict:
        """``{leader,others,server,client}_cpu_us``: microseconds of CPU per write in the window."""
        if self._start is None or not writes:
            return {}
        self.stop()
        spent = {role: (self._end[role] - self._start[role]) * 1e6 / writes for role in self._pids}
        return {"leader_cpu_us": round(spent["leader"]), "others_cpu_us": round(spent["others"]),
                "server_cpu_us": round(spent["leader"] + spent["others"]),
                "client_cpu_us": round(spent["client"])}


def reset_peak_rss(pid) -> bool:
    """Start ``pid``'s peak RSS (VmHWM) again from its current RSS; False where
    the kernel does not let us."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def kill_hard(process):
    """SIGKILL a Popen and reap it; quiet if it is gone already."""
    if process is None:
        return
    if process.poll() is None:
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        process.wait(timeout=10)
    except Exception:
        pass


def machine() -> dict:
    """What the figures were measured on: cores, memory, load."""
    info = {"nproc": os.cpu_count()}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["mem_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    try:
        info["loadavg"] = os.getloadavg()[0]
    except OSError:
        pass
    return info
