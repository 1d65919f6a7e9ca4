"""Backups as docs/operations.md describes them, with real nodes.

A backup is a copy of one stopped node's data directory, or what
``paxchat-admin backup`` fetches from a running node. Restoring it means
stopping every node and giving each the same backup: the whole cluster
goes back to the moment of the backup, consistently, and carries on from
there.
"""

import shutil

import pytest_twisted
from twisted.internet import defer, threads

from tests.cluster_support import (  # noqa: F401 (cluster_factory is a fixture)
    SINK, all_history, cluster_factory, create_accounts, logged_in, requires_replicated_log,
    started, within)
from tests.test_admin import add_ops_addresses, admin_main, run_admin

pytestmark = requires_replicated_log


@defer.inlineCallbacks
def serves_the_backup(cluster):
    """Start the restored nodes: they serve the 20 messages sent before the
    backup and none after, take new ones, and end with equal states."""
    yield cluster.start_and_wait()
    yield cluster.wait_leader()
    alice = yield logged_in(cluster, "alice")
    bodies = [m["body"] for m in (yield all_history(alice, peer=SINK))]
    assert bodies == [f"before the backup {i}" for i in reversed(range(20))]
    sent = yield alice.send_message(SINK, "after the restore")
    assert sent["message_id"] == 21          # the message counter came back with the state
    yield cluster.close_clients()
    assert (yield cluster.check_equal_states()) > 0


def _replace_tree(source, target):
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)


@within(150)
@pytest_twisted.inlineCallbacks
def test_every_node_restored_from_one_stopped_nodes_copy_serves_the_state_of_the_copy(
        cluster_factory, tmp_path):
    cluster, leader = yield started(cluster_factory)
    yield create_accounts(cluster, "alice", SINK)
    alice = yield logged_in(cluster, "alice")
    for i in range(20):
        yield alice.send_message(SINK, f"before the backup {i}")

    # The backup: a follower that has applied everything, stopped, copied, started again.
    yield cluster.wait_applied_everywhere()
    copied = next(n for n in cluster.node_ids if n != leader)
    yield cluster.stop_gracefully(copied)
    backup = tmp_path / "backup"
    yield threads.deferToThread(shutil.copytree, cluster.data_dir(copied), backup)
    yield cluster.start_and_wait(copied)
    for i in range(5):
        yield alice.send_message(SINK, f"after the backup {i}")
    yield cluster.close_clients()

    # Every node loses its data; each gets the same copy back.
    yield cluster.stop_gracefully()
    for n in cluster.node_ids:
        yield threads.deferToThread(_replace_tree, backup, cluster.data_dir(n))
    yield serves_the_backup(cluster)


@within(150)
@pytest_twisted.inlineCallbacks
def test_an_online_backup_restored_into_every_node_with_paxchat_admin(cluster_factory, tmp_path):
    cluster = cluster_factory(3)
    cfg = add_ops_addresses(cluster)
    yield cluster.start_and_wait()
    yield cluster.wait_leader()
    yield create_accounts(cluster, "alice", SINK)
    alice = yield logged_in(cluster, "alice")
    for i in range(20):
        yield alice.send_message(SINK, f"before the backup {i}")

    backup = tmp_path / "cluster.backup"
    code, out, err = yield run_admin(cfg, "backup", str(backup))    # every node keeps running
    assert code == 0 and out.startswith("backup of node"), out + err
    for i in range(5):
        yield alice.send_message(SINK, f"after the backup {i}")
    yield cluster.close_clients()

    yield cluster.stop_gracefully()
    for n in cluster.node_ids:
        yield threads.deferToThread(shutil.rmtree, cluster.data_dir(n))
        code, out, err = yield threads.deferToThread(
            admin_main, cfg, "restore", str(backup), "--node", str(n))
        assert code == 0, out + err
    yield serves_the_backup(cluster)
