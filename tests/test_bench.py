"""Each benchmark runs once at ``--tiny`` size and prints its figures.

Not a timing test: it proves the harness still starts both clusters,
drives them and reports, not how fast anything is. The paxchat side always runs;
the etcd side only where an ``etcd`` binary is installed (the benchmark
would apt-get it, a test never does). The harness's pure parts
(percentiles, windows, the etcd HTTP client, profile summaries) have unit
tests at the end.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet.testing import StringTransport

from bench import profiling, stats
from bench.load import EtcdError, HTTPClient

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
    "scans": "p99_vs_quiet=",
    "apply": "us_per_command=",
    "tlsmemory": "vs_pyopenssl=",
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


# -- the harness's parts ------------------------------------------------------


def test_percentile_is_nearest_rank():
    values = sorted(range(1, 101))
    assert stats.percentile(values, 0.5) == 50
    assert stats.percentile(values, 0.99) == 99
    assert stats.percentile(values, 0.999) == 100
    assert stats.percentile([], 0.5) is None


def test_recorder_counts_only_inside_its_window():
    r = stats.Recorder()
    r.keep_samples = True
    r.set_window(10.0, 20.0)
    r.ok(9.0, 10.5)    # counted, latency not (sent before the window)
    r.ok(11.0, 11.25)  # counted with its latency
    r.ok(19.0, 21.0)   # ended after the window
    r.error("unavailable", 12.0, 12.5)
    summary = r.summary()
    assert summary["completed"] == 2 and summary["ops_per_s"] == 0.2
    assert summary["p50_ms"] == 250.0
    assert summary["errors"] == {"unavailable": 1}
    assert r.total_ok == 3
    assert r.first_success_after(10.0) == 11.25
    assert r.first_success_after(19.5) is None


def test_ratio_is_above_one_when_paxchat_is_better():
    assert stats.ratio(200, 100) == 2
    assert stats.ratio(10, 20, higher_is_better=False) == 2
    assert stats.ratio(None, 1) is None and stats.ratio(0, 1) is None


def client():
    proto = HTTPClient(b"127.0.0.1:1")
    proto.makeConnection(StringTransport())
    return proto


def test_http_client_reads_content_length_answers_split_anywhere():
    proto = client()
    got = []
    proto.post("/v3/kv/put", b"{}").addCallback(got.append)
    assert proto.transport.value().startswith(b"POST /v3/kv/put HTTP/1.1\r\n")
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nGrpc-Metadata-Content-Type: application/grpc\r\n\r\n{}"
    for i in range(len(answer)):
        proto.dataReceived(answer[i:i + 1])
    assert got == [(200, b"{}")]
    proto.post("/x", b"{}").addCallback(got.append)
    proto.dataReceived(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
    assert got[1] == (503, b"")


def test_http_client_reads_chunked_answers():
    proto = client()
    got = []
    proto.post("/x", b"{}").addCallback(got.append)
    proto.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n")
    assert got == []
    proto.dataReceived(b"\r\n")
    assert got == [(200, b"abcde")]


def test_http_client_fails_a_garbled_answer_and_drops_the_connection():
    proto = client()
    failures = []
    proto.post("/x", b"{}").addErrback(failures.append)
    proto.dataReceived(b"garbage without status\r\n\r\n")
    assert failures and failures[0].check(EtcdError)
    assert proto.transport.disconnecting


def test_profile_summary_leaves_out_waits_and_ranks_work():
    lines = [
        "<module> (<string>:1);run (twisted/app.py:3);doPoll (x) 1\n",
        "<module> (<string>:1);run (twisted/app.py:3);EPollReactor.doPoll (twisted/internet/epollreactor.py:9) 50\n",
        "_bootstrap (threading.py:1);apply_entries (paxchat/state/chat.py:10);KVStore.transaction (/w/paxchat/state/kv.py:3) 30\n",
        "_bootstrap (threading.py:1);append_batch (/w/paxchat/paxos/store.py:7) 10\n",
    ]
    out = profiling.summarize_lines(lines)
    assert out[0].startswith("41 busy samples (50 idle left out)")
    assert "KVStore.transaction (state/kv.py)" in out[1]
    assert any("apply_entries (state/chat.py)" in line for line in out)
