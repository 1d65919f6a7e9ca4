"""Backups as docs/operations.md describes them, with real nodes.

A backup is a copy of one stopped node's data directory, or what
``paxchat-admin backup`` fetches from a running node. Restoring it
(``paxchat-admin restore``) means stopping every node and giving each the
same backup: the whole cluster goes back to the moment of the backup,
consistently, and carries on from there.
"""

import shutil
import signal

import pytest_twisted
from twisted.internet import defer, threads

from tests.cluster_support import (  # noqa: F401 (cluster_factory is a fixture)
    SINK, all_history, cluster_factory, create_accounts, logged_in, requires_replicated_log,
    started, wait_until, within)
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


@defer.inlineCallbacks
def chatting(cluster_factory, count, text):
    """A running 3-node cluster with admin addresses, where alice sent ``count`` messages."""
    cluster = cluster_factory(3)
    cfg = add_ops_addresses(cluster)
    yield cluster.start_and_wait()
    leader = yield cluster.wait_leader()
    yield create_accounts(cluster, "alice", SINK)
    alice = yield logged_in(cluster, "alice")
    for i in range(count):
        yield alice.send_message(SINK, f"{text} {i}")
    return cluster, cfg, leader, alice


@defer.inlineCallbacks
def restore_every_node(cluster, backup):
    """Every (stopped) node's data directory removed (a new node has none) and
    restored from ``backup`` with paxchat-admin; returns what each restore printed."""
    printed = []
    for n in cluster.node_ids:
        yield threads.deferToThread(shutil.rmtree, cluster.data_dir(n), ignore_errors=True)
        code, out, err = yield threads.deferToThread(
            admin_main, cluster.config, "restore", str(backup), "--node", str(n))
        assert code == 0, out + err
        printed.append(out)
    return printed


@defer.inlineCallbacks
def restore_every_node_from(cluster, node, copy):
    """Stop every node, copy ``node``'s directory to ``copy``, restore every node
    from it, start them all; returns the leader they elect."""
    yield cluster.stop_gracefully()
    yield threads.deferToThread(shutil.copytree, cluster.data_dir(node), copy)
    yield restore_every_node(cluster, copy)
    yield cluster.start_and_wait()
    return (yield cluster.wait_leader())


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

    # Every node loses its data; each gets the same copy back, through
    # paxchat-admin restore DIR, which checks and stamps it.
    yield cluster.stop_gracefully()
    for out in (yield restore_every_node(cluster, backup)):
        assert f"holds a copy of {backup}" in out, out
    yield serves_the_backup(cluster)


@within(150)
@pytest_twisted.inlineCallbacks
def test_a_cluster_grows_from_three_nodes_to_five_by_a_restore_of_every_node(cluster_factory, tmp_path):
    """docs/operations.md, "Changing the nodes of a cluster": a node of the
    three, started under a cluster.ini of five, refuses; every node of the
    five restored from one stopped node's copy serves the state of the three."""
    cluster, _, leader, _ = yield chatting(cluster_factory, 20, "before the backup")
    yield cluster.wait_applied_everywhere()
    yield cluster.close_clients()
    yield cluster.stop_gracefully()
    backup = tmp_path / "backup"
    yield threads.deferToThread(shutil.copytree, cluster.data_dir(leader), backup)

    grown = cluster_factory(5)
    # The three's data under the five's cluster.ini: the node says why it stops.
    yield threads.deferToThread(shutil.copytree, cluster.data_dir(1), grown.data_dir(1))
    grown.start(1)
    yield wait_until(grown.reactor, lambda: not grown.alive(1), 30, "node 1 to refuse to start")
    assert "belongs to a cluster of nodes 1, 2, 3, but" in grown.output(1), grown.output(1)
    assert "Traceback" not in grown.output(1)

    for out in (yield restore_every_node(grown, backup)):
        assert f"holds a copy of {backup}" in out, out
    yield serves_the_backup(grown)


@within(150)
@pytest_twisted.inlineCallbacks
def test_an_online_backup_restored_into_every_node_with_paxchat_admin(cluster_factory, tmp_path):
    cluster, cfg, _, alice = yield chatting(cluster_factory, 20, "before the backup")

    backup = tmp_path / "cluster.backup"
    code, out, err = yield run_admin(cfg, "backup", str(backup))    # every node keeps running
    assert code == 0 and out.startswith("backup of node"), out + err
    for i in range(5):
        yield alice.send_message(SINK, f"after the backup {i}")
    yield cluster.close_clients()

    yield cluster.stop_gracefully()
    yield restore_every_node(cluster, backup)
    yield serves_the_backup(cluster)


@within(150)
@pytest_twisted.inlineCallbacks
def test_a_node_restored_alone_into_a_running_cluster_is_refused_until_it_has_its_own_data_back(
        cluster_factory, tmp_path):
    """The mistake docs/operations.md warns of, made anyway: the other nodes
    refuse the restored one (it would have forgotten votes they count on),
    the cluster goes on without it, and its own directory brings it back."""
    cluster, cfg, leader, alice = yield chatting(cluster_factory, 3, "before the backup")
    backup = tmp_path / "cluster.backup"
    code, out, err = yield run_admin(cfg, "backup", str(backup))
    assert code == 0, out + err

    lone = next(n for n in cluster.node_ids if n != leader)
    own = tmp_path / "own-directory"
    yield cluster.stop_gracefully(lone)
    yield threads.deferToThread(shutil.move, cluster.data_dir(lone), own)
    code, out, err = yield threads.deferToThread(
        admin_main, cfg, "restore", str(backup), "--node", str(lone))
    assert code == 0, out + err
    restored_at = (yield threads.deferToThread(cluster.state_dump, lone))[0]
    yield cluster.start_and_wait(lone)

    refused = "its links are refused"
    yield wait_until(cluster.reactor, lambda: all(refused in cluster.output(n)
                                                  for n in cluster.node_ids),
                     30, "every node to log that it refuses the other lineage")
    assert "was never restored from a backup" in cluster.output(lone)
    assert f"node {lone}: its data was restored from backup" in cluster.output(leader)
    code, out, err = yield run_admin(cfg, "status")            # says so below its table
    assert f"node {leader} refuses node {lone}: its data was restored from backup" in out, out
    assert f"node {lone} refuses node {leader}: its data was never restored" in out, out
    # The other two still commit; the restored node learns none of it.
    for i in range(3):
        yield alice.send_message(SINK, f"while node {lone} is refused {i}")
    others = [n for n in cluster.node_ids if n != lone]
    applied = yield wait_until(
        cluster.reactor, lambda: _same_applied(cluster, others), 30, "the two others to agree")
    assert applied > restored_at
    assert (yield cluster.gauges(lone)).get("paxchat_applied_index") == restored_at
    yield cluster.close_clients()

    # Put right: the node's own directory back; it catches up with the rest.
    yield cluster.stop_gracefully(lone)
    yield threads.deferToThread(_replace_tree, own, cluster.data_dir(lone))
    yield cluster.start_and_wait(lone)
    assert (yield cluster.check_equal_states()) > 0


@defer.inlineCallbacks
def _same_applied(cluster, nodes):
    indexes = set()
    for n in nodes:
        indexes.add((yield cluster.gauges(n)).get("paxchat_applied_index"))
    return indexes.pop() if len(indexes) == 1 and None not in indexes else None


@within(150)
@pytest_twisted.inlineCallbacks
def test_a_node_back_on_an_empty_disk_is_refused_until_every_node_is_restored(
        cluster_factory, tmp_path):
    """A node whose disk was lost has forgotten votes the others count on:
    they refuse it (its data is not the data it had) and go on without it.
    The way back is the restore: every node from a copy of the most current
    survivor's directory, and no acknowledged write is lost."""
    cluster, cfg, leader, alice = yield chatting(cluster_factory, 5, "before the disk was lost")

    lost = next(n for n in cluster.node_ids if n != leader)
    cluster.kill(lost)
    yield threads.deferToThread(shutil.rmtree, cluster.data_dir(lost))
    yield cluster.start_and_wait(lost)                      # a new, empty disk
    refused = "its data is not the data it had"
    yield wait_until(cluster.reactor, lambda: all(refused in cluster.output(n)
                                                  for n in cluster.node_ids if n != lost),
                     30, "the others to refuse the node back on an empty disk")
    yield wait_until(cluster.reactor, lambda: f"node {leader} refuses our links: {refused}"
                     in cluster.output(lost), 30, "the refused node to log why")
    for i in range(3):
        yield alice.send_message(SINK, f"while node {lost} is refused {i}")
    survivors = [n for n in cluster.node_ids if n != lost]
    yield wait_until(cluster.reactor, lambda: _same_applied(cluster, survivors), 30,
                     "the survivors to agree")
    assert (yield cluster.gauges(lost)).get("paxchat_applied_index") == 0
    code, out, err = yield run_admin(cfg, "status")
    assert f"node {leader} refuses node {lost}: {refused}" in out, out
    assert f"node {lost} is refused by node {leader}: {refused}" in out, out   # its own row too
    yield cluster.close_clients()

    # The way back: stop every node, restore each from the survivor's directory.
    yield restore_every_node_from(cluster, leader, tmp_path / "survivor")
    alice = yield logged_in(cluster, "alice")
    bodies = [m["body"] for m in (yield all_history(alice, peer=SINK))]
    assert len(bodies) == 8 and bodies[0] == f"while node {lost} is refused 2"
    yield cluster.close_clients()
    assert (yield cluster.check_equal_states()) > 0
    assert not any(refused in cluster.output(n).split("===== start #")[-1]
                   for n in cluster.node_ids)


@within(150)
@pytest_twisted.inlineCallbacks
def test_a_node_back_on_an_empty_disk_rebuilds_from_the_others_while_they_serve(
        cluster_factory, tmp_path):
    """The way back without stopping anyone: ``paxchat-admin rebuild`` marks
    the new, empty directory; the node votes for nothing until every other
    node has answered, copies the state, and then counts in a quorum again."""
    cluster, cfg, leader, alice = yield chatting(cluster_factory, 5, "before the disk was lost")
    lost, other = [n for n in cluster.node_ids if n != leader]
    cluster.kill(lost)
    yield threads.deferToThread(shutil.rmtree, cluster.data_dir(lost))
    code, out, err = yield threads.deferToThread(admin_main, cfg, "rebuild", "--node", str(leader))
    assert code == 1 and "is not empty" in err
    code, out, err = yield threads.deferToThread(admin_main, cfg, "rebuild", "--node", str(lost))
    assert code == 0 and "is marked to rebuild" in out, out + err
    mark = cluster.data_dir(lost) / "rebuilding"
    assert mark.exists()

    # With another node down it waits for that node's answer: it cannot vouch alone.
    cluster.kill(other)
    yield cluster.start_and_wait(lost)
    waiting = f"node {lost} rebuilds on new data and votes for nothing yet: waiting for node {other}"

    @defer.inlineCallbacks
    def says_waiting():
        code, out, err = yield run_admin(cfg, "status")
        return waiting in out
    yield wait_until(cluster.reactor, says_waiting, 30, "the status to say what it waits for")
    assert f"node {lost} rebuilds on new data (identity" in cluster.output(leader)
    assert "is rebuilt" not in cluster.output(lost)

    yield cluster.start_and_wait(other)
    yield wait_until(cluster.reactor, lambda: "is rebuilt and votes again" in cluster.output(lost),
                     30, "the node to be rebuilt")
    yield wait_until(cluster.reactor, lambda: not mark.exists(), 10, "the mark to go")
    for i in range(3):
        yield alice.send_message(SINK, f"after the rebuild {i}")
    # Its vote now counts: with the third node down, the leader and it commit.
    cluster.kill(other)
    yield alice.send_message(SINK, "carried by the rebuilt node")
    yield cluster.start_and_wait(other)
    bodies = [m["body"] for m in (yield all_history(alice, peer=SINK))]
    assert len(bodies) == 9 and bodies[0] == "carried by the rebuilt node"
    yield cluster.close_clients()
    assert (yield cluster.check_equal_states()) > 0
    code, out, err = yield run_admin(cfg, "status")
    assert "rebuild" not in out, out


@within(150)
@pytest_twisted.inlineCallbacks
def test_a_node_rebuilding_in_a_restored_cluster_takes_its_lineage(cluster_factory, tmp_path):
    """After a restore every node's data names the backup; a rebuilt node's
    new disk takes that lineage from its peers, and keeps it across a restart."""
    from paxchat.lineage import read_lineage
    cluster, cfg, leader, alice = yield chatting(cluster_factory, 2, "before the backup")
    yield cluster.close_clients()
    leader = yield restore_every_node_from(cluster, leader, tmp_path / "copy")
    lineage = read_lineage(cluster.data_dir(leader))
    assert lineage

    lost = next(n for n in cluster.node_ids if n != leader)
    cluster.kill(lost)
    yield threads.deferToThread(shutil.rmtree, cluster.data_dir(lost))
    code, out, err = yield threads.deferToThread(admin_main, cfg, "rebuild", "--node", str(lost))
    assert code == 0, out + err
    yield cluster.start_and_wait(lost)
    yield wait_until(cluster.reactor, lambda: "is rebuilt and votes again" in cluster.output(lost),
                     30, "the node to be rebuilt")
    yield wait_until(cluster.reactor,
                     lambda: not (cluster.data_dir(lost) / "rebuilding").exists(), 10,
                     "the mark to go")
    assert read_lineage(cluster.data_dir(lost)) == lineage
    yield cluster.stop_gracefully(lost)
    yield cluster.start_and_wait(lost)                     # as any node of the restored cluster
    alice = yield logged_in(cluster, "alice")
    yield alice.send_message(SINK, "after the rebuild")
    yield cluster.close_clients()
    assert (yield cluster.check_equal_states()) > 0
    assert "refused" not in cluster.output(lost).split("===== start #")[-1]


def move_node(cluster, node):
    """Give ``node`` new addresses in cluster.ini (a new machine) and a new certificate
    made under the cluster's CA, as docs/operations.md says; returns the new config."""
    import re

    from paxchat import tls
    from tests.ops_support import ports_unused_by
    path = cluster.config.path
    ports = iter(ports_unused_by(path.read_text(), 4))
    section = re.compile(rf"^\[node\.{node}\]\n(?:(?!\[).*\n?)*", re.M)

    def readdress(match):
        return re.sub(r"^(client|peer|metrics|admin) = 127\.0\.0\.1:\d+$",
                      lambda m: f"{m.group(1)} = 127.0.0.1:{next(ports)}", match.group(0), flags=re.M)
    path.write_text(section.sub(readdress, path.read_text()))
    cluster.reload_config()
    for name in (f"node-{node}.pem", f"node-{node}.key"):
        (cluster.config.tls_dir / name).unlink()
    written = tls.ensure_cluster_certs(cluster.config)       # paxchat-certs --if-missing
    assert {p.name for p in written} == {f"node-{node}.key", f"node-{node}.pem"}
    return cluster.config


@within(150)
@pytest_twisted.inlineCallbacks
def test_a_machine_lost_for_good_is_replaced_by_one_at_another_address(cluster_factory):
    """A new machine takes the lost one's place: node N's addresses change in
    cluster.ini, the others take them on SIGHUP, and node N rebuilds on the
    new machine's empty disk."""
    cluster, cfg, leader, alice = yield chatting(cluster_factory, 3, "before the machine was lost")
    lost = next(n for n in cluster.node_ids if n != leader)
    old_peer = cluster.config.node(lost).peer
    cluster.kill(lost)
    yield threads.deferToThread(shutil.rmtree, cluster.data_dir(lost))
    cfg = move_node(cluster, lost)
    assert cfg.node(lost).peer != old_peer
    # The others take the new address on SIGHUP (systemctl reload), without a restart.
    others = [n for n in cluster.node_ids if n != lost]
    starts = dict(cluster.starts)
    for n in others:
        cluster.processes[n].send_signal(signal.SIGHUP)
    reloaded = f"reloaded cluster.ini: new addresses for node {lost}"
    yield wait_until(cluster.reactor, lambda: all(reloaded in cluster.output(n) for n in others),
                     30, "the others to reload cluster.ini")
    assert cluster.starts == starts and all(cluster.alive(n) for n in others)
    # What a reload cannot take is refused, said, and the node goes on as it was.
    text = cluster.config.path.read_text()
    assert "\nbcrypt_cost = 4\n" in text
    cluster.config.path.write_text(text.replace("\nbcrypt_cost = 4\n", "\nbcrypt_cost = 5\n"))
    cluster.processes[others[0]].send_signal(signal.SIGHUP)
    yield wait_until(cluster.reactor, lambda: "did not reload cluster.ini: [cluster] bcrypt_cost"
                     " changed; it goes on as it was" in cluster.output(others[0]), 30,
                     "the refusal of a change a reload cannot take")
    cluster.config.path.write_text(text)
    assert cluster.alive(others[0])
    code, out, err = yield threads.deferToThread(admin_main, cfg, "rebuild", "--node", str(lost))
    assert code == 0, out + err
    yield cluster.start_and_wait(lost)
    yield wait_until(cluster.reactor, lambda: "is rebuilt and votes again" in cluster.output(lost),
                     30, "the node to be rebuilt at its new address")
    yield cluster.close_clients()
    alice = yield logged_in(cluster, "alice")
    leader = yield cluster.wait_leader()
    other = next(n for n in cluster.node_ids if n not in (lost, leader))
    cluster.kill(other)
    yield alice.send_message(SINK, "carried by the node at its new address")
    yield cluster.start_and_wait(other)
    bodies = [m["body"] for m in (yield all_history(alice, peer=SINK))]
    assert bodies[0] == "carried by the node at its new address" and len(bodies) == 4
    yield cluster.close_clients()
    assert (yield cluster.check_equal_states()) > 0
