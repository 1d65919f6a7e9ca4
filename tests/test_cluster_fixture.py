"""The process fixture itself: start, kill -9, restart, output captured, nothing left behind.

These run on any build, replicated or not: they only need nodes that answer
``hello`` and keep their state on disk.
"""

import os

import pytest
import pytest_twisted
from twisted.internet import defer

from paxchat.client import ServerError
from tests.cluster_support import (  # noqa: F401 (cluster_factory is a fixture)
    Cluster, WaitTimeout, _LIVE, cluster_factory, parse_gauges, wait_until, within)


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def create(client, name):
    """create_account's outcome, "created" or an error code; None (try again) for `unavailable`.

    A replicated node answers `unavailable` until it hears from a leader.
    """
    def refused(failure):
        failure.trap(ServerError)
        return None if failure.value.code == "unavailable" else failure.value.code
    return client.create_account(name, f"{name}-password").addCallbacks(lambda _: "created", refused)


@within(90)
@pytest_twisted.inlineCallbacks
def test_start_kill_restart_keeps_state_and_output(cluster_factory):
    from twisted.internet import reactor
    cluster = cluster_factory(nodes=3)
    answers = yield cluster.start_and_wait()
    assert sorted(answers) == [1, 2, 3]
    assert all(answers[n]["node"] == n and answers[n]["protocol"] == 1 for n in answers)
    assert "paxchat node 1 serving clients" in cluster.output(1)

    first = cluster.processes[2].pid
    client = cluster.client(only=2)
    code = yield wait_until(reactor, lambda: create(client, "carol"), 20, "node 2 to answer")
    assert code in ("created", "username_taken")  # taken: an `unavailable` try got in after all
    cluster.kill(2)
    assert not cluster.alive(2) and not pid_alive(first)
    assert first not in _LIVE
    with pytest.raises(Exception):
        yield cluster.hello(2, timeout=1.0)

    yield cluster.start_and_wait(2)
    assert cluster.processes[2].pid != first
    assert cluster.output(2).count("===== start #") == 2
    # The account made before the kill -9 survived it (and the client reconnected by itself).
    code = yield wait_until(reactor, lambda: create(client, "carol"), 20, "node 2 to answer")
    assert code == "username_taken"


@within(60)
@pytest_twisted.inlineCallbacks
def test_a_node_that_cannot_start_fails_the_wait_with_its_output(cluster_factory):
    cluster = cluster_factory(nodes=1)
    os.remove(cluster.config.node_key_path(1))
    cluster.start(1)
    with pytest.raises(AssertionError) as e:
        yield cluster.wait_ready(timeout=30)
    assert "exited with code" in str(e.value)
    assert "node-1.key" in str(e.value)


@within(60)
@pytest_twisted.inlineCallbacks
def test_kill_all_leaves_no_process(tmp_path):
    from twisted.internet import reactor
    cluster = Cluster(reactor, tmp_path, nodes=2)
    try:
        yield cluster.start_and_wait()
        pids = [p.pid for p in cluster.processes.values()]
        assert all(pid_alive(pid) for pid in pids)
    finally:
        cluster.kill_all()
    assert not any(pid_alive(pid) for pid in pids)
    assert not set(pids) & set(_LIVE)


@within(30)
@pytest_twisted.inlineCallbacks
def test_wait_until_times_out_with_the_last_error():
    from twisted.internet import reactor

    def failing():
        raise ValueError("not yet")
    with pytest.raises(WaitTimeout) as e:
        yield wait_until(reactor, failing, 0.2, "the impossible")
    assert "the impossible" in str(e.value) and "not yet" in str(e.value)
    value = yield wait_until(reactor, lambda: defer.succeed(7), 1, "seven")
    assert value == 7


def test_parse_gauges_reads_every_sample_a_labelled_one_under_its_labels():
    page = ('# HELP paxchat_applied_index Last log index applied.\n'
            '# TYPE paxchat_applied_index gauge\n'
            'paxchat_applied_index 1234.0\n'
            'paxchat_peer_up{peer="2"} 1.0\n'
            'paxchat_leader 3.0\n')
    assert parse_gauges(page) == {"paxchat_applied_index": 1234.0, "paxchat_leader": 3.0,
                                  'paxchat_peer_up{peer="2"}': 1.0}
