"""Each benchmark runs once at ``--tiny`` size and prints its figures.

Not a timing test: it proves the harness still starts both clusters, drives
them and reports, not how fast anything is. The paxchat side always runs;
the etcd side only where an ``etcd`` binary is installed (the benchmark
would apt-get it, a test never does).
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIME_LIMIT = 240  # seconds for one tiny benchmark, both systems, on a busy 2-core machine
HAVE_ETCD = bool(shutil.which("etcd"))
NO_ETCD = "no etcd binary on PATH (Debian's etcd-server 3.4 provides it): etcd side not run"

_runs = {}


def run_tiny(name, tmp_path_factory):
    """Run ``python -m bench NAME --tiny`` once per test session; (exit code, output)."""
    if name not in _runs:
        args = [sys.executable, "-m", "bench", name, "--tiny", "--no-install",
                "--workdir", str(tmp_path_factory.mktemp(f"bench-{name}"))]
        if not HAVE_ETCD:
            args.append("--no-etcd")
        try:
            done = subprocess.run(args, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=TIME_LIMIT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
            _runs[name] = (done.returncode, done.stdout + done.stderr)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            _runs[name] = (None, f"timed out after {TIME_LIMIT}s\n{out}")
    return _runs[name]


# A figure this benchmark always prints on the paxchat side.
EXPECTED = {
    "writes": "ops_per_s=",
    "failover": "p50_s=",
    "catchup": "current_s=",
    "connections": "kib_per_connection=",
    "loginstorm": "chat_p99_vs_quiet=",
}
# Benchmarks that measure etcd too and print the ratio.
COMPARED = {"writes", "failover", "catchup"}
# Until the nodes replicate, failover and catch-up have nothing to measure and say so.
NOT_REPLICATED = "paxchat skipped: the nodes are independent single-node servers"
BENCHMARKS = sorted(EXPECTED)


def figures(output, name, system):
    """Measured lines "[name] system label: key=value ..." of one system."""
    prefix = f"[{name}] {system}"
    return [line for line in output.splitlines()
            if line.startswith(prefix) and re.search(r"\w+=[-0-9n]", line)]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_paxchat_side_runs_and_prints_figures(name, tmp_path_factory):
    code, output = run_tiny(name, tmp_path_factory)
    assert code == 0, output[-4000:]
    if NOT_REPLICATED in output:
        assert name in ("failover", "catchup"), output[-4000:]
        return
    assert figures(output, name, "paxchat"), output[-4000:]
    assert EXPECTED[name] in output


@pytest.mark.parametrize("name", sorted(COMPARED))
def test_etcd_side_runs_and_prints_figures_and_ratio(name, tmp_path_factory):
    if not HAVE_ETCD:
        pytest.skip(NO_ETCD)
    code, output = run_tiny(name, tmp_path_factory)
    assert code == 0, output[-4000:]
    assert figures(output, name, "etcd"), output[-4000:]
    if NOT_REPLICATED not in output:
        assert figures(output, name, "ratio"), output[-4000:]
