"""The admin channel: mutual TLS with an admin certificate, status table, snapshot, transfer."""

import hashlib
import io
import json
import re
import shutil
import stat

import pytest
import pytest_twisted
from twisted.internet import defer, threads

from paxchat import admin, tls
from paxchat import config as configmod
from paxchat.node import NodeService
from tests.cluster_support import (cluster_factory, requires_replicated_log,  # noqa: F401
                                   wait_until, within)
from tests.ops_support import http_get, ports_unused_by, reactor_, write_ops_config


def make_cluster(tmp_path, nodes=2):
    cfg = write_ops_config(tmp_path, nodes=nodes, keys=("metrics", "admin"), client_tls="off",
                           bcrypt_cost=4)
    tls.make_cluster_certs(cfg)
    tls.make_admin_certificate(cfg)
    return cfg


def run_admin(cfg, *argv):
    """paxchat-admin in a thread (it blocks; the node runs on this reactor): (code, out, err)."""
    out, err = io.StringIO(), io.StringIO()
    d = threads.deferToThread(admin.main, ["--config", str(cfg.path), "--timeout", "5", *argv],
                              out=out, err=err)
    return d.addCallback(lambda code: (code, out.getvalue(), err.getvalue()))


@pytest.fixture
def node_1(tmp_path):
    """Node 1 of a two-node cluster, running in this process (node 2 stays down)."""
    cfg = make_cluster(tmp_path)
    node = NodeService(cfg, 1, reactor_())
    node.startService()
    # The replicated log recovers in threads after the service starts; the
    # admin calls below need it running.
    pytest_twisted.blockon(wait_until(reactor_(), lambda: node.log.replica is not None, 10,
                                      "node 1's replicated log to start"))
    yield cfg, node
    pytest_twisted.blockon(defer.maybeDeferred(node.stopService))


def test_admin_certificate(tmp_path):
    cfg = make_cluster(tmp_path, nodes=1)
    cert = tls.load_node_certificate  # node certificates are not admin ones
    assert tls.admin_name_of(cert(cfg, 1)) is None
    from cryptography import x509
    admin_cert = x509.load_pem_x509_certificate(tls.admin_cert_path(cfg).read_bytes())
    assert tls.admin_name_of(admin_cert) == "paxchat-admin"
    assert tls.node_id_of(admin_cert) is None
    assert stat.S_IMODE(tls.admin_key_path(cfg).stat().st_mode) == 0o600
    assert tls.make_admin_certificate(cfg) == []  # exists: kept


def test_paxchat_certs_admin(tmp_path, capsys):
    cfg = write_ops_config(tmp_path, nodes=1)
    assert tls.main(["--config", str(cfg.path), "--admin"]) == 1
    assert "ca.pem" in capsys.readouterr().err  # no CA yet: says how to make it
    assert tls.main(["--config", str(cfg.path), "--if-missing", "--admin"]) == 0
    assert str(tls.admin_cert_path(cfg)) in capsys.readouterr().out
    before = tls.admin_cert_path(cfg).read_bytes()
    assert tls.main(["--config", str(cfg.path), "--admin"]) == 0
    assert tls.admin_cert_path(cfg).read_bytes() == before


def test_status_table():
    statuses = {
        1: {"role": "leader", "leader": 1, "ballot": [4, 1], "commit_index": 120,
            "applied_index": 120, "clients": 3, "peers": {"2": "connected", "3": "disconnected"}},
        2: {"role": "follower", "leader": 1, "ballot": [4, 1], "commit_index": 118,
            "applied_index": 100, "clients": 0, "peers": {"1": "connected", "3": "disconnected"},
            "clients_turned_away": 0, "clients_refused": 60},
        3: admin.AdminError("node 3 (10.0.0.3:7401) is down: Connection refused"),
        4: {"role": "precandidate", "leader": None, "ballot": [0, 0], "commit_index": 90,
            "applied_index": 90, "clients": 0, "peers": {"1": "refused", "2": "refused"},
            "refused_peers": {"1": "its data was never restored from a backup, ours was"
                                   " restored from backup 3f2a"},
            "refused_by_peers": {"2": "its data is not the data it had"},
            "clients_turned_away": 7},
    }
    lines = admin.status_table(statuses).splitlines()
    assert lines[0].split() == ["NODE", "STATE", "ROLE", "LEADER", "BALLOT", "COMMIT", "APPLIED",
                                "LAG", "CLIENTS", "PEERS"]
    assert lines[1].split() == ["1", "up", "leader", "1", "4.1", "120", "120", "0", "3", "1/2"]
    assert lines[2].split() == ["2", "up", "follower", "1", "4.1", "118", "100", "20", "0", "1/2"]
    assert lines[3].split()[:3] == ["3", "down", "-"]
    assert lines[4].split() == ["4", "up", "precandidate", "-", "0.0", "90", "90", "30", "0", "0/2"]
    assert lines[5:] == [
        "node 2 closed 60 new client connections since it started: they came faster than"
        " connections_per_address from one address",
        "node 3: node 3 (10.0.0.3:7401) is down: Connection refused",
        "node 4 refuses node 1: its data was never restored from a backup, ours was restored"
        " from backup 3f2a",
        "node 4 is refused by node 2: its data is not the data it had",
        "node 4 turned away 7 client connections since it started: it held max_clients"]


def test_the_ballot_column_is_the_followed_leaders_and_a_promise_only_from_an_earlier_build():
    statuses = {
        1: {"role": "leader", "leader": 1, "ballot": [5, 1], "leader_ballot": [5, 1]},
        2: {"role": "follower", "leader": 1, "ballot": [4, 2], "leader_ballot": [5, 1]},  # back from a restart
        3: {"role": "precandidate", "leader": None, "ballot": [9, 3], "leader_ballot": None},
        4: {"role": "follower", "leader": 1, "ballot": [4, 2]},            # an earlier build
    }
    rows = [line.split() for line in admin.status_table(statuses).splitlines()[1:]]
    assert [row[4] for row in rows] == ["5.1", "5.1", "-", "4.2"]


def test_status_says_so_while_the_nodes_builds_and_the_clusters_apply_version_differ():
    def node(build, cluster):
        return {"role": "follower", "applied_index": 5, "commit_index": 5,
                "apply_version": {"build": build, "cluster": cluster, "reported": {},
                                  "committed": True}}
    agreed = {1: node(2, 2), 2: node(2, 2), 3: admin.AdminError("node 3 is down")}
    assert not any(line.startswith("apply version")
                   for line in admin.status_table(agreed).splitlines())
    upgrading = {1: node(2, 1), 2: node(1, 1), 3: node(2, None)}
    assert admin.status_table(upgrading).splitlines()[-1] == (
        "apply version: the cluster's is 1; the nodes' builds know node 1 2, node 2 1, node 3 2."
        " It rises once every node runs a build that knows a higher one and is linked to the leader.")
    unknown = {1: node(1, None)}
    assert "the cluster's is not known yet" in admin.status_table(unknown)


def test_status_shows_a_rebuilding_node_and_what_it_waits_for():
    def node(rebuilding):
        return {"role": "follower", "leader": 1, "ballot": [4, 1], "commit_index": 9,
                "applied_index": 9, "rebuilding": rebuilding}
    statuses = {1: node(None), 2: node({"waiting_for": [3], "catch_up_to": None}),
                3: node({"waiting_for": [], "catch_up_to": 40}),
                4: node({"waiting_for": [], "catch_up_to": None})}
    lines = admin.status_table(statuses).splitlines()
    assert [line.split()[2] for line in lines[1:5]] == ["follower", "rebuilding", "rebuilding",
                                                        "rebuilding"]
    assert lines[5:] == [
        "node 2 rebuilds on new data and votes for nothing yet: waiting for node 3 to answer"
        " (every other node must)",
        "node 3 rebuilds on new data and votes for nothing yet: catching up to index 40, then it"
        " votes",
        "node 4 rebuilds on new data and votes for nothing yet: starting"]


def test_rebuild_marks_an_empty_data_directory_and_refuses_the_rest(tmp_path):
    from paxchat.lineage import check_members, is_rebuilding
    cfg = make_cluster(tmp_path / "cluster", nodes=3)
    code, out, err = admin_main(cfg, "rebuild", "--node", "2")
    directory = cfg.node_data_dir(2)
    assert code == 0 and "is marked to rebuild" in out, err
    assert is_rebuilding(directory) and sorted(p.name for p in directory.iterdir()) == [
        "members", "rebuilding"]
    check_members(directory, cfg.nodes)                 # the members of its cluster.ini
    code, out, err = admin_main(cfg, "rebuild", "--node", "2")    # not empty now
    assert code == 1 and "is not empty" in err
    code, out, err = admin_main(cfg, "rebuild", "--node", "9")
    assert code == 2 and "no [node.9]" in err
    alone = make_cluster(tmp_path / "alone", nodes=1)
    code, out, err = admin_main(alone, "rebuild", "--node", "1")
    assert code == 1 and "cannot rebuild it" in err and not alone.node_data_dir(1).exists()


def test_a_node_that_refuses_the_certificate_is_shown_up_and_refusing_not_down():
    refusal = admin.AdminError("node 1 (10.0.0.1:7401): an admin certificate of the cluster CA is"
                               " needed", 403, {"error": "forbidden"})
    stopping = admin.AdminError("node 2 (10.0.0.2:7402): node 2 is not running", 503, {})
    lines = admin.status_table({1: refusal, 2: stopping}).splitlines()
    assert lines[1].split()[:3] == ["1", "refused", "-"]
    assert lines[2].split()[:3] == ["2", "down", "-"]
    assert lines[3] == f"node 1: {refusal}"


def test_status_exits_1_while_a_node_is_shut_out_for_its_data_not_while_links_come_up():
    import argparse

    def node(n, role="follower", peers="connected", **extra):
        return {"node": n, "role": role, "leader": 1 if role == "follower" else None,
                "peers": {str(p): peers for p in (1, 2, 3) if p != n}, **extra}

    def exit_status(statuses):
        client = type("Client", (), {"statuses": lambda self: statuses})()
        return [admin._status(client, argparse.Namespace(json=as_json), io.StringIO())
                for as_json in (False, True)]
    healthy = {1: node(1, "leader"), 2: node(2), 3: node(3)}
    assert exit_status(healthy) == [0, 0]
    starting = {n: node(n, "precandidate", "disconnected") for n in (1, 2, 3)}
    assert exit_status(starting) == [0, 0]      # just started: linking, no leader yet
    rebuilding = {**healthy, 3: node(3, rebuilding={"waiting_for": [], "catch_up_to": 9})}
    assert exit_status(rebuilding) == [0, 0]
    why = "its data is not the data it had"
    shut_out = {1: node(1, "leader", refused_peers={"3": why}), 2: node(2, refused_peers={"3": why}),
                3: node(3, "precandidate", "refused", refused_by_peers={"1": why, "2": why})}
    assert exit_status(shut_out) == [1, 1]
    # Either side alone is enough (the other's admin may be down or not asked).
    assert exit_status({**healthy, 3: shut_out[3]}) == [1, 1]
    assert exit_status({**healthy, 1: shut_out[1]}) == [1, 1]


@pytest_twisted.inlineCallbacks
def test_status_of_a_live_and_a_down_node(node_1):
    cfg, node = node_1
    code, out, err = yield run_admin(cfg, "status")
    assert code == 1, err  # node 2 is down
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:3]}
    assert rows["1"][1] == "up" and rows["2"][1] == "down"
    assert "node 2" in out and "is down" in out
    code, out, err = yield run_admin(cfg, "status", "--json")
    statuses = json.loads(out)
    assert statuses["1"]["node"] == 1 and "down" in statuses["2"]


@pytest_twisted.inlineCallbacks
def test_only_an_admin_certificate_is_let_in(node_1):
    cfg, node = node_1
    code, out, err = yield run_admin(cfg, "--cert", str(cfg.node_cert_path(1)),
                                     "--key", str(cfg.node_key_path(1)), "status")
    assert code == 2      # no node could be asked, for the certificate: the check is broken
    assert out.splitlines()[1].split()[:2] == ["1", "refused"]
    assert (f"The admin certificate {cfg.node_cert_path(1)} was refused: node 1 (127.0.0.1:"
            in out and "not an admin certificate (a node's own is refused there)" in out)
    assert "give paxchat-admin the admin certificate, not a node's" in out

    def without_certificate():
        import socket
        import ssl
        context = ssl.create_default_context(cafile=str(cfg.ca_path))
        address = cfg.node(1).admin
        with socket.create_connection((address.host, address.port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname=tls.node_name(1)) as sock:
                sock.sendall(b"GET /status HTTP/1.0\r\n\r\n")
                return sock.recv(100)

    with pytest.raises(OSError):
        yield threads.deferToThread(without_certificate)


def operator_config(cfg, directory, ca_from, admin_from):
    """cfg's cluster.ini for an operator whose tls_dir holds ``ca_from``'s ca.pem and
    ``admin_from``'s admin certificate."""
    directory.mkdir(parents=True)
    certs = directory / "certs"
    certs.mkdir()
    shutil.copy(ca_from.ca_path, certs / "ca.pem")
    for path in (tls.admin_cert_path(admin_from), tls.admin_key_path(admin_from)):
        shutil.copy(path, certs / path.name)
    path = directory / "cluster.ini"
    path.write_text(cfg.path.read_text().replace("[cluster]\n", f"[cluster]\ntls_dir = {certs}\n", 1))
    return configmod.load(path)


def another_cluster(directory):
    other = write_ops_config(directory, nodes=1, keys=("admin",))
    tls.make_cluster_certs(other)
    tls.make_admin_certificate(other)
    return other


def ca_name(path):
    from cryptography import x509
    ca = x509.load_pem_x509_certificate(path.read_bytes())
    return ca.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value


@pytest_twisted.inlineCallbacks
def test_a_ca_pem_of_another_cluster_is_named_not_taken_for_nodes_down(node_1, tmp_path):
    """As the paxchat CLI says it (paxchat.tls.ClientCA.refusal): the file, both CAs, the
    fix; status shows the node up but untrusted, and every command exits 2 at once."""
    cfg, node = node_1
    other = another_cluster(tmp_path / "other")
    operator = operator_config(cfg, tmp_path / "operator", ca_from=other, admin_from=cfg)
    wrong = (f"node 1 (127.0.0.1:{cfg.node(1).admin.port}): certificate not signed by the CA in"
             f" {operator.ca_path} (it was issued by \"{ca_name(cfg.ca_path)}\"; ca.pem holds"
             f" \"{ca_name(other.ca_path)}\"). To fix it: if {operator.ca_path} is not this cluster's"
             " CA (copied from the wrong place, or the cluster's certificates were remade since),"
             " copy the cluster's own ca.pem there")
    code, out, err = yield run_admin(operator, "status")
    assert code == 2, (out, err)
    rows = [line.split()[:2] for line in out.splitlines()[1:3]]
    assert rows == [["1", "untrusted"], ["2", "down"]]
    assert f"TLS refused the paxchat servers' certificates: {wrong}" in out
    code, out, err = yield run_admin(operator, "status", "--json")
    assert code == 2 and wrong in json.loads(out)["1"]["untrusted"]
    for argv in (["snapshot", "1"], ["transfer-leadership", "2"],
                 ["backup", str(tmp_path / "copy.backup")]):
        code, out, err = yield run_admin(operator, *argv)
        assert (code, out) == (2, ""), (argv, err)
        assert err.startswith("paxchat-admin: TLS refused the paxchat servers' certificates: ")
        assert wrong in err, argv
    assert not (tmp_path / "copy.backup").exists()


@pytest_twisted.inlineCallbacks
def test_an_admin_certificate_of_another_ca_is_named(node_1, tmp_path):
    cfg, node = node_1
    other = another_cluster(tmp_path / "other")
    operator = operator_config(cfg, tmp_path / "operator", ca_from=cfg, admin_from=other)
    code, out, err = yield run_admin(operator, "status")
    assert code == 2, (out, err)
    assert out.splitlines()[1].split()[:2] == ["1", "refused"]
    admin_pem = tls.admin_cert_path(operator)
    assert (f"The admin certificate {admin_pem} was refused: node 1 (127.0.0.1:"
            f"{cfg.node(1).admin.port}): certificate not signed by the CA in {operator.ca_path}"
            f" (it was issued by \"{ca_name(other.ca_path)}\"; ca.pem holds \"{ca_name(cfg.ca_path)}\")."
            " To fix it: make a new admin certificate where the cluster's ca.key is kept: remove"
            f" admin.pem and admin.key there, run `paxchat-certs --config {operator.path} --admin`"
            " and copy both here") in out
    code, out, err = yield run_admin(operator, "snapshot", "1")
    assert code == 2 and f"The admin certificate {admin_pem} was refused" in err, err


@pytest_twisted.inlineCallbacks
def test_a_refusal_of_the_admin_certificate_lost_in_a_reset_is_still_named(node_1, tmp_path, monkeypatch):
    """Under TLS 1.3 the node refuses the admin certificate after our handshake; a request
    sent meanwhile may make it reset the connection over its alert. Asked again without a
    request, it says it; a connection cut for another reason stays that reason."""
    import http.client
    import ssl

    def cut_short(self, *args, **kwargs):
        raise ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
    monkeypatch.setattr(http.client.HTTPConnection, "request", cut_short)
    cfg, node = node_1
    other = another_cluster(tmp_path / "other")
    operator = operator_config(cfg, tmp_path / "operator", ca_from=cfg, admin_from=other)
    code, out, err = yield run_admin(operator, "snapshot", "1")
    assert code == 2 and f"The admin certificate {tls.admin_cert_path(operator)} was refused" in err, err
    code, out, err = yield run_admin(cfg, "snapshot", "1")       # the cluster's own: taken
    assert (code, err) == (1, f"paxchat-admin: node 1 (127.0.0.1:{cfg.node(1).admin.port}): EOF"
                              " occurred in violation of protocol\n")


def node_certificate(cfg, node_id, *, expired=False, name_of=None):
    """Node ``node_id``'s certificate and key from cfg's CA, expired or naming node ``name_of``."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    ca = tls.read_client_ca(cfg.ca_path).certificate
    ca_key = serialization.load_pem_private_key(cfg.ca_key_path.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = ((now - datetime.timedelta(days=30), now - datetime.timedelta(days=1)) if expired
                  else (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=30)))
    name = tls.node_name(name_of or node_id)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(x509.oid.NameOID.ORGANIZATIONAL_UNIT_NAME, tls.NODE_UNIT),
                x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(9)
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1")), x509.DNSName(name)]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    cfg.node_cert_path(node_id).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    cfg.node_key_path(node_id).write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return end


@pytest.mark.parametrize("fault", ["expired", "another node's"])
@pytest_twisted.inlineCallbacks
def test_a_node_certificate_that_expired_or_is_another_nodes_is_named_with_its_remedy(
        tmp_path, fault, monkeypatch):
    cfg = make_cluster(tmp_path)
    end = node_certificate(cfg, 1, expired=fault == "expired", name_of=2 if fault != "expired" else None)
    # A node refuses to start so (tls.check_node_certificate): this one is as if it
    # started before its certificate expired, or before its files were swapped.
    monkeypatch.setattr(tls, "check_node_certificate", lambda config, node_id, now=None: end)
    node = NodeService(cfg, 1, reactor_())
    node.startService()
    try:
        code, out, err = yield run_admin(cfg, "status")
        assert code == 2, (out, err)      # no node could be asked: node 2 is down
        assert out.splitlines()[1].split()[:2] == ["1", "untrusted"]
        where = f"node 1 (127.0.0.1:{cfg.node(1).admin.port})"
        if fault == "expired":
            assert f"{where}: certificate expired on {end:%Y-%m-%d}." in out
        else:
            assert (f"{where}: certificate not made for paxchat-node-1 (it is for 127.0.0.1,"
                    " paxchat-node-2). To fix it: another node answered there: either that address"
                    " in cluster.ini is another node's, or the node has another node's certificate") in out
        assert ("make node 1 a new certificate where the cluster's ca.key is kept: remove node-1.pem"
                f" and node-1.key there, run `paxchat-certs --config {cfg.path} --if-missing`, copy"
                " both to node 1's machine and restart the node") in out
        code, out, err = yield run_admin(cfg, "snapshot", "1")
        assert code == 2 and f"{where}: certificate" in err
    finally:
        yield defer.maybeDeferred(node.stopService)


def test_status_exits_2_only_when_certificates_kept_every_node_from_answering():
    import argparse
    untrusted = admin.CertificateProblem([admin.CertificateRefusal(
        1, "node 1 (10.0.0.1:7300)", "certificate expired on 2026-01-01", "", "renew it")])
    down = admin.AdminError("node 2 (10.0.0.2:7300) is down: Connection refused")
    up = {"role": "leader", "leader": 3, "peers": {}}

    def exit_status(statuses):
        client = type("Client", (), {"statuses": lambda self: statuses})()
        return admin._status(client, argparse.Namespace(json=False), io.StringIO())
    assert exit_status({1: untrusted, 2: down}) == 2
    assert exit_status({1: untrusted, 2: down, 3: up}) == 1   # node 3 answered: node 1 is in trouble
    assert exit_status({2: down}) == 1


@pytest_twisted.inlineCallbacks
def test_snapshot(node_1):
    cfg, node = node_1
    code, out, err = yield run_admin(cfg, "snapshot", "1")
    index = node.log.replica.snapshot_index
    assert (code, out) == (0, f"node 1 took a snapshot at index {index}\n"), err
    assert index == node.log.applied_index
    code, out, err = yield run_admin(cfg, "snapshot", "2")
    assert code == 1 and "node 2" in err and "down" in err
    code, out, err = yield run_admin(cfg, "snapshot", "7")
    assert code == 2 and "no [node.7] section for snapshot 7 (nodes are 1, 2)" in err
    # The node named as backup, restore and rebuild name theirs.
    code, out, err = yield run_admin(cfg, "snapshot", "--node", "1")
    assert code == 0 and out.startswith("node 1 took a snapshot at index"), err


@pytest.mark.parametrize("argv, why", [
    (["snapshot"], "which node? give N or --node N"),
    (["snapshot", "1", "--node", "2"], "two nodes named (1 and --node 2); give one"),
    (["transfer-leadership"], "which node? give N or --node N"),
    (["transfer-leadership", "1", "--node", "2"], "two nodes named (1 and --node 2); give one"),
])
def test_snapshot_and_transfer_name_one_node(argv, why, capsys):
    with pytest.raises(SystemExit) as exited:
        admin.main(argv)
    assert exited.value.code == 2 and why in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["--timeout", "-1", "status"], ["--timeout", "0", "status"], ["status", "--timeout", "nan"],
    ["--timeout", "soon", "status"], ["transfer-leadership", "2", "--wait", "0"],
    ["transfer-leadership", "2", "--wait", "-5"],
])
def test_waits_and_timeouts_are_seconds_above_0(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        admin.main(argv)
    assert exited.value.code == 2 and "seconds" in capsys.readouterr().err


def test_the_global_options_may_follow_the_command(tmp_path, monkeypatch):
    cfg = write_ops_config(tmp_path, nodes=1, keys=("admin",))
    tls.make_cluster_certs(cfg)
    tls.make_admin_certificate(cfg)
    seen = []

    class Client(admin.AdminClient):
        def __init__(self, config, cert, key, timeout):
            seen.append((config.path, cert, key, timeout))
            super().__init__(config, cert, key, timeout)
    monkeypatch.setattr(admin, "AdminClient", Client)
    cert, key = str(tls.admin_cert_path(cfg)), str(tls.admin_key_path(cfg))
    out, err = io.StringIO(), io.StringIO()
    assert admin.main(["status", "--config", str(cfg.path), "--cert", cert, "--key", key,
                       "--timeout", "2"], out=out, err=err) == 1, err.getvalue()  # node 1 down
    assert "node 1" in out.getvalue() and "down" in out.getvalue()
    # One given before the command is kept when none follows it.
    assert admin.main(["--timeout", "3", "--config", str(cfg.path), "status"], out=out,
                      err=err) == 1
    assert seen == [(cfg.path, cert, key, 2.0), (cfg.path, None, None, 3.0)]


def test_a_mistake_in_cluster_ini_exits_2_not_1_which_says_a_node_is_down(tmp_path):
    bad = tmp_path / "cluster.ini"
    bad.write_text("[cluster]\nheartbeat = soon\n")
    out, err = io.StringIO(), io.StringIO()
    assert admin.main(["--config", str(bad), "status"], out=out, err=err) == 2
    assert err.getvalue().startswith("paxchat-admin: ") and out.getvalue() == ""
    assert admin.main(["--config", str(tmp_path / "missing.ini"), "status"], out=out, err=err) == 2


@pytest_twisted.inlineCallbacks
def test_backup_writes_a_checked_copy_of_the_state(node_1, tmp_path):
    from twisted.logger import formatEvent, globalLogPublisher

    from paxchat.state.kv import check_snapshot
    cfg, node = node_1
    target = tmp_path / "backup.paxchat"
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        code, out, err = yield run_admin(cfg, "backup", str(target), "--node", "1")
    finally:
        globalLogPublisher.removeObserver(events.append)
    index = node.log.applied_index
    size = target.stat().st_size
    assert (code, out) == (0, f"backup of node 1's state at index {index} ({size} bytes) "
                              f"written to {target}\n"), err
    assert check_snapshot(target.read_bytes()) == index
    assert not (tmp_path / "backup.paxchat.part").exists()
    assert any(formatEvent(e) == "admin paxchat-admin took a backup of node 1's state"
               for e in events)                        # logged with the operator's name
    code, out, err = yield run_admin(cfg, "backup", str(tmp_path / "other"), "--node", "2")
    assert code == 1 and "node 2" in err and "down" in err
    assert not (tmp_path / "other").exists() and not (tmp_path / "other.part").exists()
    code, out, err = yield run_admin(cfg, "backup", str(tmp_path), "--node", "1")
    assert code == 1 and "is a directory" in err
    code, out, err = yield run_admin(cfg, "backup", str(tmp_path / "no" / "such"), "--node", "1")
    assert code == 1 and "cannot write" in err
    # Without --node: the node that has applied the most (the only one up here).
    code, out, err = yield run_admin(cfg, "backup", str(tmp_path / "auto"))
    assert code == 0 and out.startswith("backup of node 1's state"), err


@pytest.fixture
def open_umask():
    """A umask that leaves new files readable by all, as many logins have."""
    import os
    before = os.umask(0o022)
    yield
    os.umask(before)


@pytest_twisted.inlineCallbacks
def test_a_backup_is_private_from_its_first_byte(node_1, tmp_path, monkeypatch, open_umask):
    import os
    cfg, node = node_1
    target = tmp_path / "x.backup"
    part = tmp_path / "x.backup.part"
    part.write_bytes(b"left by a backup that was killed")
    part.chmod(0o644)
    modes = []
    download = admin.AdminClient.download

    def watched(self, node_id, path, sink, timeout):
        modes.append(stat.S_IMODE(os.fstat(sink.fileno()).st_mode))
        return download(self, node_id, path, sink, timeout)
    monkeypatch.setattr(admin.AdminClient, "download", watched)
    code, out, err = yield run_admin(cfg, "backup", str(target), "--node", "1")
    assert code == 0, err
    assert modes == [0o600]                       # the .part, while the backup arrives
    assert stat.S_IMODE(target.stat().st_mode) == 0o600 and not part.exists()


@pytest_twisted.inlineCallbacks
def test_a_backup_larger_than_a_piece_arrives_whole(node_1, tmp_path):
    import os

    from paxchat.state.chat import ChatState
    from paxchat.state.kv import SNAPSHOT_CHUNK_BYTES, check_snapshot
    cfg, node = node_1
    filler = os.urandom(3 * SNAPSHOT_CHUNK_BYTES)

    def fill():               # straight into the state: only the image's size matters here
        with node.state.kv.transaction():
            node.state.kv.put("zz/filler", filler)
    yield node.worker.call(fill)
    target = tmp_path / "big.backup"
    code, out, err = yield run_admin(cfg, "backup", str(target), "--node", "1")
    assert code == 0, err
    data = target.read_bytes()
    assert len(data) > 3 * SNAPSHOT_CHUNK_BYTES and check_snapshot(data) == node.log.applied_index
    copy = ChatState.open(str(tmp_path / "copy.sqlite3"))
    copy.restore(node.log.applied_index, [data])
    assert copy.kv.get("zz/filler") == filler
    copy.close()


class _RecordingRequest:
    """What a _PiecesProducer did to the request it sends a backup on."""

    def __init__(self):
        self.written, self.finished, self.unregistered, self.lost = [], 0, 0, 0

    def write(self, data):
        self.written.append(data)

    def finish(self):
        self.finished += 1

    def unregisterProducer(self):
        self.unregistered += 1

    def loseConnection(self):
        self.lost += 1


def test_the_pieces_producer_writes_one_piece_per_turn_and_stops_when_told():
    from paxchat.admin import _PiecesProducer

    request = _RecordingRequest()
    producer = _PiecesProducer(request, [b"ab", memoryview(b"cd"), b"e"])
    for turn in range(1, 4):
        producer.resumeProducing()
        assert request.written == [b"ab", b"cd", b"e"][:turn] and request.finished == 0
    producer.resumeProducing()
    assert (request.finished, request.unregistered) == (1, 1)
    producer.resumeProducing()                      # nothing more, and no second finish
    assert (request.finished, len(request.written)) == (1, 3)

    gone = _RecordingRequest()
    producer = _PiecesProducer(gone, [b"ab", b"cd"])
    producer.resumeProducing()
    producer.stopProducing()                        # the client went away
    producer.resumeProducing()
    assert gone.written == [b"ab"] and gone.finished == 0


def test_the_pieces_producer_waits_for_a_piece_being_read_and_closes_on_a_failed_read():
    from twisted.internet import defer

    from paxchat.admin import _PiecesProducer

    reads = [defer.Deferred(), defer.Deferred()]
    asked = []

    def pieces():
        for read in reads:
            asked.append(read)
            yield read
    request = _RecordingRequest()
    producer = _PiecesProducer(request, pieces())
    producer.resumeProducing()
    producer.resumeProducing()                      # the first is still being read
    assert asked == reads[:1] and request.written == []
    reads[0].callback(b"ab")
    assert request.written == [b"ab"]
    producer.resumeProducing()
    assert asked == reads
    reads[1].errback(OSError("the disk failed"))
    assert (request.lost, request.finished) == (1, 0)
    producer.resumeProducing()
    assert request.written == [b"ab"]


def test_restore_makes_an_empty_data_directory_from_a_backup_and_refuses_the_rest(tmp_path):
    from paxchat.lineage import read_lineage
    from paxchat.node import STATE_FILE
    from paxchat.paxos import messages as M
    from paxchat.paxos.store import recover_log
    from paxchat.state.chat import ChatState
    cfg = make_cluster(tmp_path / "cluster")
    source = ChatState.open(str(tmp_path / "source.sqlite3"))
    source.apply({"op": "create_account", "username": "alice", "pw_hash": "h", "ts": 1.0})
    index, chunks = source.snapshot()
    backup = tmp_path / "backup.paxchat"
    backup.write_bytes(b"".join(chunks))
    digest = source.digest()
    source.close()

    code, out, err = admin_main(cfg, "restore", str(backup), "--node", "2")
    directory = cfg.node_data_dir(2)
    assert code == 0 and f"index {index}" in out, err
    stamp = hashlib.sha256(backup.read_bytes()).hexdigest()
    assert f"restored from backup {stamp[:12]}" in out
    restored = ChatState.open(str(directory / STATE_FILE))
    assert restored.digest() == digest and restored.applied_index() == index
    restored.close()
    assert [M.decode(r) for r in recover_log(directory / "paxos")] == [M.CompactRecord(index)]
    # Stamped with the backup's sha256: only nodes restored from this file speak with it.
    assert read_lineage(directory) == hashlib.sha256(backup.read_bytes()).hexdigest().encode()

    # A data directory that is not empty is never overwritten.
    before = sorted(p.name for p in directory.iterdir())
    code, out, err = admin_main(cfg, "restore", str(backup), "--node", "2")
    assert code == 1 and "not empty" in err and sorted(p.name for p in directory.iterdir()) == before
    # A file that is not a backup changes nothing.
    damaged = tmp_path / "damaged"
    damaged.write_bytes(backup.read_bytes()[:-1] + b"\0")
    for bad, why in ((damaged, "digest"), (tmp_path / "missing", "cannot read")):
        code, out, err = admin_main(cfg, "restore", str(bad), "--node", "1")
        assert code == 1 and why in err and not cfg.node_data_dir(1).exists()
    code, out, err = admin_main(cfg, "restore", str(backup), "--node", "9")
    assert code == 2 and "no [node.9]" in err
    cfg.node_data_dir(1).write_text("not a directory")       # a file where the directory goes
    code, out, err = admin_main(cfg, "restore", str(backup), "--node", "1")
    assert code == 1 and "not empty" in err and cfg.node_data_dir(1).read_text() == "not a directory"
    cfg.node_data_dir(1).unlink()
    code, out, err = admin_main(cfg, "restore", str(tmp_path), "--node", "1")   # not a node's
    assert code == 1 and "not a paxchat data directory" in err
    assert not cfg.node_data_dir(1).exists()


def test_restore_copies_a_stopped_nodes_directory_checks_it_and_stamps_it(tmp_path):
    from paxchat.lineage import (IDENTITY_FILE, LINEAGE_FILE, PEER_IDENTITIES_FILE,
                                 read_lineage, read_or_make_identity, write_lineage,
                                 write_peer_identities)
    from paxchat.node import STATE_FILE
    from paxchat.paxos import messages as M
    from paxchat.paxos.store import recover_log, rewrite_log
    from paxchat.state.chat import ChatState
    cfg = make_cluster(tmp_path / "cluster")
    copy = tmp_path / "copy-of-node-3"                 # as cp -a leaves a stopped node's directory
    copy.mkdir()
    state = ChatState.open(str(copy / STATE_FILE))
    state.apply({"op": "create_account", "username": "alice", "pw_hash": "h", "ts": 1.0})
    digest = state.digest()
    state.close()
    ballot = M.Ballot(3, 3)
    records = [M.encode(M.CompactRecord(1)),
               M.encode(M.AcceptRecord(ballot, 2, ((b'{"op": "later"}',),)))]
    rewrite_log(str(copy / "paxos"), records)
    (copy / "lock").touch()
    write_lineage(copy, b"ab" * 32)                    # a stamp of its own: not copied,
    read_or_make_identity(copy, 3)                     # nor its identity, nor its peers'
    write_peer_identities(copy, {1: b"1" * 32})

    stamps = set()
    for n in (1, 2):
        code, out, err = admin_main(cfg, "restore", str(copy), "--node", str(n))
        assert code == 0 and f"holds a copy of {copy}" in out, err
        directory = cfg.node_data_dir(n)
        restored = ChatState.open(str(directory / STATE_FILE))
        assert restored.digest() == digest
        restored.close()
        assert recover_log(directory / "paxos") == records        # the log as it was, in full
        assert not (directory / "lock").exists()
        assert not (directory / IDENTITY_FILE).exists()             # made at the node's start
        assert not (directory / PEER_IDENTITIES_FILE).exists()
        stamps.add(read_lineage(directory))
        assert f"restored from backup {read_lineage(directory)[:12].decode()}" in out
    # Every node restored from the same copy carries the same stamp, not the copy's own.
    assert len(stamps) == 1 and stamps != {b"ab" * 32}

    # A damaged copy is refused where it was copied to, and nothing is kept.
    (copy / STATE_FILE).write_bytes(b"not a database" * 100)
    shutil.rmtree(cfg.node_data_dir(1))
    code, out, err = admin_main(cfg, "restore", str(copy), "--node", "1")
    assert code == 1 and "nothing was kept" in err and not cfg.node_data_dir(1).exists()
    assert (copy / LINEAGE_FILE).exists()                     # the copy itself is untouched


def test_restore_refuses_the_directory_of_a_running_node_and_changes_nothing(tmp_path):
    import fcntl
    import os

    from paxchat.node import STATE_FILE
    from paxchat.paxos import messages as M
    from paxchat.paxos.store import rewrite_log
    from paxchat.state.chat import ChatState
    cfg = make_cluster(tmp_path / "cluster")
    running = tmp_path / "node-3"
    running.mkdir()
    ChatState.open(str(running / STATE_FILE)).close()
    rewrite_log(str(running / "paxos"), [M.encode(M.CompactRecord(0))])
    # Held as a running node's log holds it (paxos/store.py).
    fd = os.open(running / "paxos" / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, out, err = admin_main(cfg, "restore", str(running), "--node", "1")
    finally:
        os.close(fd)
    assert (code, out) == (1, "")
    assert err == (f"paxchat-admin: {running} is in use by a running node; stop it first "
                   "(a copy of a running node's directory is not a backup)\n")
    assert not cfg.node_data_dir(1).exists()
    # Stopped (the lock let go), the same directory restores.
    code, out, err = admin_main(cfg, "restore", str(running), "--node", "1")
    assert code == 0 and f"holds a copy of {running}" in out, err


def modes_under(directory):
    """{path relative to ``directory``: mode} of everything in it, itself as '.'."""
    return {str(p.relative_to(directory)): stat.S_IMODE(p.stat().st_mode)
            for p in [directory, *directory.rglob("*")]}


def test_restored_data_is_as_private_as_a_nodes_own(tmp_path, open_umask):
    from paxchat.node import STATE_FILE
    from paxchat.state.chat import ChatState
    cfg = make_cluster(tmp_path / "cluster")
    source = ChatState.open(str(tmp_path / "source.sqlite3"))
    source.apply({"op": "create_account", "username": "alice", "pw_hash": "h", "ts": 1.0})
    index, chunks = source.snapshot()
    source.close()
    backup = tmp_path / "backup.paxchat"
    backup.write_bytes(b"".join(chunks))
    cfg.node_data_dir(1).mkdir(mode=0o755, parents=True)   # made empty beforehand, open to all
    code, out, err = admin_main(cfg, "restore", str(backup), "--node", "1")
    assert code == 0, err
    restored = modes_under(cfg.node_data_dir(1))
    assert STATE_FILE in restored and "paxos" in restored
    code, out, err = admin_main(cfg, "restore", str(cfg.node_data_dir(1)), "--node", "2")
    assert code == 0, err
    copied = modes_under(cfg.node_data_dir(2))
    for modes in (restored, copied):
        assert {path: mode for path, mode in modes.items()
                if mode != (0o700 if (path == "." or path == "paxos") else 0o600)} == {}


def admin_main(cfg, *argv):
    """paxchat-admin run here (for commands that need no node): (code, out, err)."""
    out, err = io.StringIO(), io.StringIO()
    code = admin.main(["--config", str(cfg.path), *argv], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest_twisted.inlineCallbacks
def test_transfer_leadership(node_1):
    cfg, node = node_1
    asked = []
    node.log.status = lambda: {"role": "leader", "leader": 1, "ballot": [3, 1],
                               "commit_index": 9, "applied_index": 9, "peers": {}}
    node.log.transfer_leadership = asked.append
    code, out, err = yield run_admin(cfg, "transfer-leadership", "2", "--wait", "0.3")
    assert asked == [2]
    assert code == 1 and "node 1 is handing leadership to node 2" in out
    # Node 2 is down: it cannot; the status says node 1 still leads.
    assert err == "paxchat-admin: node 2 did not take over within 0.3 s; node 1 still leads\n"
    code, out, err = yield run_admin(cfg, "transfer-leadership", "1")
    assert (code, out) == (0, "node 1 already leads\n")
    code, out, err = yield run_admin(cfg, "transfer-leadership", "--node", "1")
    assert (code, out) == (0, "node 1 already leads\n")
    code, out, err = yield run_admin(cfg, "transfer-leadership", "9")
    assert code == 2 and "no [node.9] section for transfer-leadership 9 (nodes are 1, 2)" in err

    client = admin.AdminClient(cfg)
    for body in ({"target": 1}, {"target": "2"}, {"target": 99}, {}):
        with pytest.raises(admin.AdminError) as info:
            yield threads.deferToThread(client.call, 1, "POST", "/transfer-leadership", body)
        assert info.value.code == 400
    with pytest.raises(admin.AdminError) as info:
        yield threads.deferToThread(client.call, 1, "GET", "/nothing")
    assert info.value.code == 404


def test_no_transfer_to_a_node_that_rebuilds(tmp_path):
    import argparse
    import io

    class Client:
        config = make_cluster(tmp_path, nodes=3)
        calls = []

        def statuses(self):
            return {1: {"role": "leader", "leader": 1}, 2: {"role": "follower", "leader": 1,
                    "rebuilding": {"waiting_for": [], "catch_up_to": 40}},
                    3: {"role": "follower", "leader": 1, "rebuilding": None}}

        def call(self, *args):
            self.calls.append(args)
            return {"role": "leader", "ballot": [3, 3]}
    client = Client()
    with pytest.raises(admin.AdminError, match="node 2 rebuilds on new data .* cannot lead"):
        admin._transfer(client, argparse.Namespace(target=2, wait=1.0), io.StringIO())
    assert client.calls == []
    out = io.StringIO()
    assert admin._transfer(client, argparse.Namespace(target=3, wait=1.0), out) == 0
    assert client.calls[0] == (1, "POST", "/transfer-leadership", {"target": 3})
    assert "node 3 leads now" in out.getvalue()


def test_no_transfer_to_a_node_whose_certificate_is_refused(tmp_path):
    """It could not be watched taking over: said up front, nothing asked of the leader."""
    import argparse
    untrusted = admin.CertificateProblem([admin.CertificateRefusal(
        2, "node 2 (10.0.0.12:7300)", "certificate expired on 2026-01-01", "", "renew it")])

    class Client:
        config = make_cluster(tmp_path, nodes=3)
        calls = []

        def statuses(self):
            return {1: {"role": "leader", "leader": 1}, 2: untrusted, 3: {"role": "follower", "leader": 1}}

        def call(self, *args):
            self.calls.append(args)
    with pytest.raises(admin.CertificateProblem) as info:
        admin._transfer(Client(), argparse.Namespace(target=2, wait=1.0), io.StringIO())
    assert info.value is untrusted and Client.calls == []


@pytest.mark.parametrize("after, why", [
    ({1: "follower", 2: "follower", 3: "follower"},
     "node 2 did not take over within 0.2 s, and no node leads now: node 1 stepped down and the"
     " nodes elect a leader (status shows which)"),
    ({1: "follower", 2: "follower", 3: "leader"}, "node 2 did not take over within 0.2 s; node 3"
                                                  " leads now"),
], ids=["no-leader", "another-leader"])
def test_a_transfer_that_timed_out_says_who_leads_now(tmp_path, after, why):
    import argparse

    class Client:
        config = make_cluster(tmp_path, nodes=3)
        roles = {1: "leader", 2: "follower", 3: "follower"}

        def statuses(self):
            return {n: {"role": role, "leader": 1} for n, role in self.roles.items()}

        def call(self, node, method, path, body=None):
            if method == "POST":
                self.roles = after            # as the nodes say once the transfer is asked
            return {"role": self.roles[node]}
    with pytest.raises(admin.AdminError) as info:
        admin._transfer(Client(), argparse.Namespace(target=2, wait=0.2), io.StringIO())
    assert str(info.value) == why


@pytest_twisted.inlineCallbacks
def test_transfer_refused_for_a_target_that_could_not_take_over(node_1):
    from paxchat.paxos.core import CannotTransfer
    cfg, node = node_1

    def refuse(target):
        raise CannotTransfer(f"node {target} is not linked to node 1 (disconnected)")
    node.log.transfer_leadership = refuse
    client = admin.AdminClient(cfg)
    with pytest.raises(admin.AdminError) as info:
        yield threads.deferToThread(client.call, 1, "POST", "/transfer-leadership", {"target": 2})
    assert info.value.code == 409 and info.value.body["error"] == "cannot_transfer"
    assert str(info.value).endswith("node 2 is not linked to node 1 (disconnected); node 1 keeps"
                                    " leading")


@pytest_twisted.inlineCallbacks
def test_transfer_refused_by_a_follower(node_1):
    cfg, node = node_1

    class NotLeader(Exception):
        leader_hint = 2

    def refuse(target):
        raise NotLeader()

    node.log.transfer_leadership = refuse
    client = admin.AdminClient(cfg)
    with pytest.raises(admin.AdminError) as info:
        yield threads.deferToThread(client.call, 1, "POST", "/transfer-leadership", {"target": 2})
    assert info.value.code == 409 and info.value.body["leader"] == 2


def test_missing_admin_certificate_says_how_to_make_it(tmp_path, capsys):
    cfg = write_ops_config(tmp_path, nodes=1, keys=("admin",))
    tls.make_cluster_certs(cfg)
    assert admin.main(["--config", str(cfg.path), "status"]) == 2
    err = capsys.readouterr().err
    assert "admin.pem" in err and "paxchat-certs" in err and "--admin" in err


def test_an_admin_certificate_that_is_missing_or_not_its_keys_exits_2(tmp_path):
    cfg = make_cluster(tmp_path, nodes=1)
    missing = tmp_path / "certs" / "nonexist.pem"
    code, out, err = admin_main(cfg, "--cert", str(missing), "status")
    assert (code, out) == (2, "")
    assert err.startswith(f"paxchat-admin: cannot read the admin certificate file {missing} "
                          "(No such file or directory); run `paxchat-certs") and "--admin" in err
    code, out, err = admin_main(cfg, "--key", str(cfg.node_key_path(1)), "status")
    assert (code, out) == (2, "")
    assert err.startswith(f"paxchat-admin: {cfg.node_key_path(1)} is not the key of "
                          f"{tls.admin_cert_path(cfg)}; run `paxchat-certs")
    garbled = tmp_path / "garbled.pem"
    garbled.write_text("not a certificate")
    code, out, err = admin_main(cfg, "--cert", str(garbled), "status")
    assert code == 2 and f"{garbled} and {tls.admin_key_path(cfg)} are not a PEM" in err


@pytest.mark.parametrize("damage, why", [
    (lambda ca: ca.unlink(), "cannot read the cluster CA certificate {ca} (No such file or directory)"),
    (lambda ca: ca.write_text("not a certificate"), "{ca} holds no PEM certificate"),
], ids=["missing", "garbled"])
def test_a_missing_or_garbled_ca_certificate_exits_2_naming_it(tmp_path, damage, why):
    cfg = make_cluster(tmp_path, nodes=1)
    damage(cfg.ca_path)
    code, out, err = admin_main(cfg, "status")
    assert (code, out) == (2, "")
    assert err.startswith("paxchat-admin: " + why.format(ca=cfg.ca_path)) and err.count("\n") == 1
    # The cluster's own CA put back; a new one is only for a cluster without certificates.
    assert "copy the cluster's own ca.pem here" in err and "only a cluster with no certificates" in err


def test_node_without_admin_address(tmp_path):
    cfg = write_ops_config(tmp_path, nodes=1, keys=())
    tls.make_cluster_certs(cfg)
    tls.make_admin_certificate(cfg)
    statuses = admin.AdminClient(cfg).statuses()
    assert "has no admin address" in str(statuses[1])


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    """``paxchat-admin status --json | head``: no traceback once head has what it wants."""
    import os
    import subprocess
    import sys
    cfg = write_ops_config(tmp_path, nodes=3, keys=("admin",))   # every node down
    tls.make_cluster_certs(cfg)
    tls.make_admin_certificate(cfg)
    read, write = os.pipe()
    os.close(read)                                  # the reader is gone before the first byte
    try:
        result = subprocess.run(
            [sys.executable, "-m", "paxchat.admin", "--config", str(cfg.path), "--timeout", "2",
             "status", "--json"], stdout=write, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True, timeout=60)
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (1, "")      # 1: every node is down


@pytest_twisted.inlineCallbacks
def test_a_reader_that_goes_away_leaves_the_commands_own_exit_status(node_1):
    """``paxchat-admin snapshot 1 | head -0`` under ``set -o pipefail``: 0, it was done."""
    cfg, node = node_1

    class GoneReader:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")
    err = io.StringIO()
    d = threads.deferToThread(admin.main, ["--config", str(cfg.path), "--timeout", "5", "snapshot", "1"],
                              out=GoneReader(), err=err)
    code = yield d
    assert (code, err.getvalue()) == (0, "")
    assert node.log.replica.snapshot_index == node.log.applied_index


# -- a real replicated cluster of twistd nodes ------------------------------------------

def add_ops_addresses(cluster):
    """Give every node of a Cluster admin and metrics addresses (those it lacks) and the admin cert."""
    path = cluster.config.path
    missing = [key for key in ("admin", "metrics")
               if any(getattr(n, key) is None for n in cluster.config.nodes.values())]
    text = path.read_text()
    ports = iter(ports_unused_by(text, len(missing) * len(cluster.node_ids)))
    text = re.sub(r"^peer = .*$", lambda m: m.group(0) + "".join(
        f"\n{key} = 127.0.0.1:{next(ports)}" for key in missing), text, flags=re.M)
    path.write_text(text)
    cluster.config = configmod.load(path)
    tls.make_admin_certificate(cluster.config)
    return cluster.config


@requires_replicated_log
@within(120)
@pytest_twisted.inlineCallbacks
def test_status_and_transfer_on_a_replicated_cluster(cluster_factory):  # noqa: F811
    cluster = cluster_factory(3)
    cfg = add_ops_addresses(cluster)
    yield cluster.start_and_wait()
    leader = yield cluster.wait_leader()

    seen = {}

    @defer.inlineCallbacks
    def every_link_up():
        code, out, err = yield run_admin(cfg, "status")
        assert code == 0, out + err
        seen["rows"] = {int(line.split()[0]): line.split() for line in out.splitlines()[1:]}
        return all(row[9] == "2/2" for row in seen["rows"].values())

    yield wait_until(reactor_(), every_link_up, 20, "every peer link up in the status table")
    rows = seen["rows"]
    assert sorted(rows) == cluster.node_ids
    assert all(row[1] == "up" for row in rows.values())
    assert [n for n, row in rows.items() if row[2] == "leader"] == [leader]

    target = next(n for n in cluster.node_ids if n != leader)
    code, out, err = yield run_admin(cfg, "transfer-leadership", str(target))
    assert code == 0, out + err
    # The ballot as the status table shows it (round.node).
    assert re.fullmatch(rf"node {target} leads now \(ballot \d+\.{target}\)",
                        out.splitlines()[-1]), out
    assert (yield cluster.wait_leader()) == target

    code, body, _ = yield http_get(f"http://{cfg.node(target).metrics}/metrics")
    assert code == 200 and b'paxchat_role{role="leader"} 1.0' in body
    assert "asked node" in cluster.output(leader) and "hand leadership" in cluster.output(leader)

    # A target that is down is refused up front: no transfer starts, and the leader keeps
    # leading (it used to step down, leaving the cluster without a leader for a while).
    cluster.kill(leader)

    def unlinked():
        d = threads.deferToThread(admin.AdminClient(cfg).call, target, "GET", "/status")
        return d.addCallback(lambda status: status["peers"][str(leader)] != "connected")
    yield wait_until(reactor_(), unlinked, 20, f"node {target} to see node {leader} gone")
    code, out, err = yield run_admin(cfg, "transfer-leadership", str(leader))
    assert (code, out) == (1, ""), out + err
    assert err.endswith(f"node {leader} is not linked to node {target} (disconnected); node"
                        f" {target} keeps leading\n"), err
    code, out, err = yield run_admin(cfg, "status", "--json")
    assert json.loads(out)[str(target)]["role"] == "leader"
