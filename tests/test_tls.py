"""Cluster certificates and the TLS options: files, checks, and real handshakes on loopback."""

import ssl as stdlib_ssl
import stat

import pytest
import pytest_twisted
from cryptography import x509
from OpenSSL import SSL
from twisted.internet.error import ConnectionDone
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID
from twisted.internet import defer, endpoints, protocol
from twisted.internet.interfaces import IHandshakeListener
from zope.interface import implementer

from paxchat import clienttls
from paxchat import config as configmod
from paxchat import tls

INI = """\
[cluster]
data_dir = data
tls_dir = {tls_dir}
bcrypt_cost = 4
[node.1]
client = 127.0.0.1:7101
peer = 127.0.0.1:7201
[node.2]
client = localhost:7102
peer = 127.0.0.1:7202
[node.3]
client = 0.0.0.0:7103
peer = 127.0.0.1:7203
"""


def make_config(directory, tls_dir="certs"):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "cluster.ini"
    path.write_text(INI.format(tls_dir=tls_dir))
    return configmod.load(path)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cfg = make_config(tmp_path_factory.mktemp("cluster"))
    tls.make_cluster_certs(cfg)
    return cfg


@pytest.fixture(scope="module")
def other_cluster(tmp_path_factory):
    cfg = make_config(tmp_path_factory.mktemp("other"))
    tls.make_cluster_certs(cfg)
    return cfg


def load(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_node_certificates_verify_against_the_ca(cluster):
    ca = load(cluster.ca_path)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for node_id in cluster.nodes:
        cert = load(cluster.node_cert_path(node_id))
        cert.verify_directly_issued_by(ca)
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert tls.node_id_of(cert) == node_id


def test_certificates_do_not_verify_against_another_ca(cluster, other_cluster):
    with pytest.raises((ValueError, TypeError, Exception)):
        load(cluster.node_cert_path(1)).verify_directly_issued_by(load(other_cluster.ca_path))


def test_subject_alt_names(cluster):
    def sans(node_id):
        ext = load(cluster.node_cert_path(node_id)).extensions.get_extension_for_oid(
            ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
        return ({str(ip) for ip in ext.value.get_values_for_type(x509.IPAddress)},
                set(ext.value.get_values_for_type(x509.DNSName)))
    assert sans(1) == ({"127.0.0.1"}, {"paxchat-node-1"})
    assert sans(2) == ({"127.0.0.1"}, {"localhost", "paxchat-node-2"})
    ips, names = sans(3)
    assert "0.0.0.0" not in ips and "127.0.0.1" in ips and "localhost" in names


def test_file_modes(cluster):
    assert stat.S_IMODE(cluster.tls_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(cluster.ca_key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(cluster.ca_path.stat().st_mode) == 0o644
    for node_id in cluster.nodes:
        assert stat.S_IMODE(cluster.node_key_path(node_id).stat().st_mode) == 0o600
        assert stat.S_IMODE(cluster.node_cert_path(node_id).stat().st_mode) == 0o644
    assert sorted(p.name for p in cluster.tls_dir.iterdir()) == sorted(
        ["ca.pem", "ca.key"] + [f"node-{n}.{e}" for n in (1, 2, 3) for e in ("pem", "key")])


def test_overwrite_refused_then_forced(tmp_path):
    cfg = make_config(tmp_path)
    tls.make_cluster_certs(cfg)
    before = cfg.ca_path.read_bytes()
    with pytest.raises(tls.CertificatesExist, match="--force"):
        tls.make_cluster_certs(cfg)
    assert cfg.ca_path.read_bytes() == before
    tls.make_cluster_certs(cfg, force=True)
    assert cfg.ca_path.read_bytes() != before
    load(cfg.node_cert_path(1)).verify_directly_issued_by(load(cfg.ca_path))
    assert stat.S_IMODE(cfg.node_key_path(1).stat().st_mode) == 0o600


def test_if_missing_adds_only_missing_node_under_the_same_ca(tmp_path):
    cfg = make_config(tmp_path)
    assert len(tls.ensure_cluster_certs(cfg)) == 8
    assert tls.ensure_cluster_certs(cfg) == []
    node1 = cfg.node_cert_path(1).read_bytes()
    cfg.node_cert_path(2).unlink()
    cfg.node_key_path(2).unlink()
    assert tls.ensure_cluster_certs(cfg) == [cfg.node_cert_path(2), cfg.node_key_path(2)]
    assert cfg.node_cert_path(1).read_bytes() == node1
    load(cfg.node_cert_path(2)).verify_directly_issued_by(load(cfg.ca_path))


def test_if_missing_refuses_without_the_ca_key(tmp_path):
    cfg = make_config(tmp_path)
    tls.make_cluster_certs(cfg)
    cfg.ca_key_path.unlink()
    cfg.node_cert_path(3).unlink()
    with pytest.raises(tls.CertificatesExist, match="ca.key is missing"):
        tls.ensure_cluster_certs(cfg)


def test_command_line(tmp_path, capsys):
    cfg = make_config(tmp_path)
    assert tls.main(["--config", str(cfg.path)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert tls.main(["--config", str(cfg.path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("paxchat-certs: ") and "--if-missing" in err and "--force" in err and err.count("\n") == 1
    assert tls.main(["--config", str(cfg.path), "--if-missing"]) == 0
    assert tls.main(["--config", str(cfg.path), "--force"]) == 0
    assert tls.main(["--config", str(tmp_path / "nope.ini")]) == 1
    assert "nope.ini: no such file" in capsys.readouterr().err


def test_missing_files_name_the_file_and_the_fix(tmp_path):
    cfg = make_config(tmp_path)
    for load_it in (lambda: tls.load_ca(cfg), lambda: tls.peer_server_options(cfg, 1),
                    lambda: tls.client_server_context(cfg, 2)):
        with pytest.raises(tls.CertificateFilesError) as info:
            load_it()
        message = str(info.value)
        assert "paxchat-certs" in message and str(cfg.tls_dir) in message and "\n" not in message


def test_a_client_missing_the_ca_is_told_to_copy_the_clusters_not_to_make_one(tmp_path):
    """paxchat-certs on a client's machine would make a CA that signed none of the nodes."""
    cfg = make_config(tmp_path)
    for load_it in (lambda: tls.client_connection_options(cfg, "127.0.0.1"),
                    lambda: tls.client_options_for_ca(cfg.ca_path, "127.0.0.1")):
        with pytest.raises(tls.CertificateFilesError) as info:
            load_it()
        assert str(info.value) == (
            f"cannot read {cfg.ca_path} (No such file or directory); copy the cluster's own"
            " ca.pem here from one of its nodes or its operator (docs/deploy.md step 3): a client"
            " trusts only the CA that signed the nodes' certificates")


def test_garbage_and_mismatched_files(tmp_path):
    cfg = make_config(tmp_path)
    tls.make_cluster_certs(cfg)
    cfg.node_key_path(2).write_bytes(cfg.node_key_path(1).read_bytes())
    with pytest.raises(tls.CertificateFilesError, match="do not belong together"):
        tls.load_node_certificate(cfg, 2)
    cfg.ca_path.write_text("not a certificate")
    with pytest.raises(tls.CertificateFilesError, match="ca.pem is not a PEM certificate"):
        tls.load_ca(cfg)


def test_a_node_whose_files_are_wrong_is_told_to_fix_its_own_not_to_remake_the_cluster(tmp_path):
    """`paxchat-certs --force` makes a new CA for every node: on one machine of a running
    cluster it cuts that node off; the advice is the node's own pair, or a new one."""
    cfg = make_config(tmp_path)
    tls.make_cluster_certs(cfg)
    cfg.node_key_path(2).write_bytes(cfg.node_key_path(1).read_bytes())
    with pytest.raises(tls.CertificateFilesError) as mismatched:
        tls.load_node_certificate(cfg, 2)
    cfg.node_key_path(2).unlink()
    with pytest.raises(tls.CertificateFilesError) as missing:
        tls.load_node_certificate(cfg, 2)
    pair_back = ("put node 2's own node-2.pem and node-2.key back, or make it a new pair from the"
                 " cluster CA where ca.key is kept: remove node-2.pem and node-2.key there, run"
                 f" `paxchat-certs --config {cfg.path} --if-missing` and copy both here"
                 ' (docs/operations.md, "A node whose disk was lost")')
    assert str(mismatched.value) == (
        f"{cfg.node_key_path(2)} and {cfg.node_cert_path(2)} do not belong together (the key is"
        f" not the one the certificate was made for); {pair_back}")
    assert str(missing.value).startswith(f"cannot read {cfg.node_key_path(2)} (No such file or"
                                         f" directory); {pair_back}; ")
    for message in (str(mismatched.value), str(missing.value)):
        assert "--force" not in message and "\n" not in message
    # paxchat-certs itself, run on a node's machine (no ca.key), sends it where ca.key is kept.
    cfg.ca_key_path.unlink()
    with pytest.raises(tls.CertificatesExist) as elsewhere:
        tls.ensure_cluster_certs(cfg)
    assert "run this where the cluster's ca.key is kept" in str(elsewhere.value)
    assert "only to replace the whole cluster's certificates, --force" in str(elsewhere.value)


def test_node_id_of_twisted_certificates(cluster):
    assert tls.node_id_of(tls.load_node_certificate(cluster, 3)) == 3
    assert tls.node_id_of(tls.load_ca(cluster)) is None


def test_node_id_of_other_certificates():
    assert tls.node_id_of(None) is None
    key = ec.generate_private_key(ec.SECP256R1())
    import datetime
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "paxchat-node-3")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    assert tls.node_id_of(cert) is None  # no node unit: not a node certificate


# -- real handshakes -------------------------------------------------------

@implementer(IHandshakeListener)
class Probe(protocol.Protocol):
    """Records the TLS handshake, the peer's node id and what arrives."""

    def __init__(self, greet=False):
        self.greet = greet
        self.handshake = defer.Deferred()
        self.lost = defer.Deferred()
        self.received = b""

    def handshakeCompleted(self):
        peer = self.transport.getPeerCertificate()
        self.handshake.callback(tls.node_id_of(peer))
        if self.greet:
            self.transport.write(b"hello\n")

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost.callback(reason.value)


def serve(reactor, options, servers):
    """Listen with ``options``: Twisted TLS options (peer port) or a stdlib context (client port)."""
    factory = protocol.Factory()

    def build(addr):
        probe = Probe(greet=True)
        servers.append(probe)
        return probe
    factory.buildProtocol = build
    if isinstance(options, stdlib_ssl.SSLContext):
        return clienttls.TLSServerEndpoint(reactor, 0, options, interface="127.0.0.1").listen(factory)
    return endpoints.SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1").listen(factory)


def connect(reactor, port, creator):
    client = Probe()
    endpoint = endpoints.wrapClientTLS(
        creator, endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port, timeout=5))
    return endpoints.connectProtocol(endpoint, client).addCallback(lambda _: client)


def bounded(d, reactor, seconds=10):
    return d.addTimeout(seconds, reactor)


def reactor_():
    from twisted.internet import reactor
    return reactor


@pytest_twisted.inlineCallbacks
def test_peer_mutual_tls_handshake_names_both_nodes(cluster):
    reactor = reactor_()
    servers = []
    port = yield serve(reactor, tls.peer_server_options(cluster, 1), servers)
    try:
        client = yield connect(reactor, port, tls.peer_client_options(cluster, 2, tls.node_name(1)))
        assert (yield bounded(client.handshake, reactor)) == 1
        assert (yield bounded(servers[0].handshake, reactor)) == 2
        client.transport.loseConnection()
        yield bounded(client.lost, reactor)
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_peer_with_a_certificate_from_another_ca_is_refused(cluster, other_cluster):
    reactor = reactor_()
    servers = []
    port = yield serve(reactor, tls.peer_server_options(cluster, 1), servers)
    try:
        # Trusts our CA (so it would accept our server) but presents a foreign certificate.
        creator = tls.ssl.optionsForClientTLS(
            "127.0.0.1", trustRoot=tls.load_ca(cluster),
            clientCertificate=tls.load_node_certificate(other_cluster, 2))
        client = yield connect(reactor, port, creator)
        assert isinstance((yield bounded(client.lost, reactor)), SSL.Error)
        assert client.received == b""
        assert servers and not servers[0].handshake.called
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_peer_without_a_client_certificate_is_refused(cluster):
    reactor = reactor_()
    servers = []
    port = yield serve(reactor, tls.peer_server_options(cluster, 1), servers)
    try:
        client = yield connect(reactor, port, tls.client_connection_options(cluster, "127.0.0.1"))
        assert isinstance((yield bounded(client.lost, reactor)), SSL.Error)
        assert client.received == b""
        assert servers and not servers[0].handshake.called
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_peer_client_checks_which_node_answers(cluster):
    reactor = reactor_()
    servers = []
    port = yield serve(reactor, tls.peer_server_options(cluster, 1), servers)
    try:
        client = yield connect(reactor, port, tls.peer_client_options(cluster, 2, tls.node_name(3)))
        assert not isinstance((yield bounded(client.lost, reactor)), ConnectionDone)
        assert not client.handshake.called
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_client_tls_trusts_the_cluster_ca(cluster):
    reactor = reactor_()
    servers = []
    port = yield serve(reactor, tls.client_server_context(cluster, 1), servers)
    try:
        client = yield connect(reactor, port, tls.client_connection_options(cluster, "127.0.0.1"))
        assert (yield bounded(client.handshake, reactor)) == 1
        yield bounded(servers[0].handshake, reactor)  # no client certificate asked: None
        client.transport.loseConnection()
        yield bounded(client.lost, reactor)
        creator = tls.client_options_for_ca(cluster.ca_path, "127.0.0.1")
        client = yield connect(reactor, port, creator)
        assert (yield bounded(client.handshake, reactor)) == 1
        client.transport.loseConnection()
        yield bounded(client.lost, reactor)
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_client_refuses_a_server_from_another_ca(cluster, other_cluster):
    reactor = reactor_()
    servers = []
    port = yield serve(reactor, tls.client_server_context(other_cluster, 1), servers)
    try:
        client = yield connect(reactor, port, tls.client_connection_options(cluster, "127.0.0.1"))
        assert not isinstance((yield bounded(client.lost, reactor)), ConnectionDone)
        assert not client.handshake.called and client.received == b""
    finally:
        yield port.stopListening()


def chat_client_over(reactor, port, creator):
    """A paxchat ChatClient over client TLS to ``port``; fires with (client, Deferred of its on_lost reason)."""
    from paxchat.client.connection import ChatClient
    lost = defer.Deferred()
    client = ChatClient(on_lost=lambda reason: lost.callback([reason]))
    endpoint = endpoints.wrapClientTLS(
        creator, endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port, timeout=5))
    return endpoints.connectProtocol(endpoint, client).addCallback(lambda _: (client, lost))


@pytest_twisted.inlineCallbacks
def test_a_node_certificate_from_another_ca_is_told_apart_and_named(cluster, other_cluster):
    """Twisted says only "certificate verify failed": the client keeps what the node
    presented, and the CA it trusts says which CA signed it instead."""
    from paxchat.client.errors import CertificateRefused, ConnectionDropped
    reactor = reactor_()
    port = yield serve(reactor, tls.client_server_context(other_cluster, 1), [])
    try:
        ca = tls.read_client_ca(cluster.ca_path)
        client, lost = yield chat_client_over(reactor, port, ca.options("127.0.0.1"))
        hello = client.request("hello")                 # held until the handshake, as the client does
        [reason] = yield bounded(lost, reactor)
        assert reason.check(CertificateRefused) and not reason.value.hostname
        assert (yield hello.addErrback(lambda f: f.type)) is ConnectionDropped
        [leaf] = reason.value.chain
        assert leaf == x509.load_pem_x509_certificate(other_cluster.node_cert_path(1).read_bytes())
        problem, detail, advice = ca.refusal(reason.value.chain, "127.0.0.1")
        def ca_name(cfg):
            ca = x509.load_pem_x509_certificate(cfg.ca_path.read_bytes())
            return ca.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
        ours, theirs = ca_name(cluster), ca_name(other_cluster)
        assert problem == f"certificate not signed by the CA in {cluster.ca_path}"
        assert detail == f'it was issued by "{theirs}"; ca.pem holds "{ours}"'
        assert advice.startswith(f"if {cluster.ca_path} is not this cluster's CA (copied from the wrong"
                                 " place, or the cluster's certificates were remade since), copy")
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_a_node_certificate_for_another_address_is_told_apart(cluster):
    from paxchat.client.errors import CertificateRefused
    reactor = reactor_()
    port = yield serve(reactor, tls.client_server_context(cluster, 1), [])
    try:
        ca = tls.read_client_ca(cluster.ca_path)
        client, lost = yield chat_client_over(reactor, port, ca.options("pax9.example"))  # not its name
        [reason] = yield bounded(lost, reactor)
        assert reason.check(CertificateRefused) and reason.value.hostname
        problem, detail, advice = ca.refusal(reason.value.chain, "pax9.example", hostname=True)
        assert problem == "certificate not made for pax9.example"
        assert detail == "it is for 127.0.0.1, paxchat-node-1"
        assert "address in cluster.ini" in advice
    finally:
        yield port.stopListening()


def test_a_client_ca_is_read_again_only_when_its_file_changed(tmp_path, other_cluster):
    import shutil
    cfg = make_config(tmp_path)
    tls.make_cluster_certs(cfg)
    ca = tls.read_client_ca(cfg.ca_path)
    first = ca.certificate
    before = ca.options_now("127.0.0.1")
    assert ca.reload() is False and ca.options_now("127.0.0.1") is before
    cfg.ca_path.write_text("not a certificate")
    with pytest.raises(tls.CertificateFilesError):
        ca.reload()
    assert ca.certificate == first                    # a file that cannot be used changes nothing
    shutil.copy(other_cluster.ca_path, cfg.ca_path)
    assert ca.reload() is True
    assert ca.certificate == load(other_cluster.ca_path) and ca.options_now("127.0.0.1") is not before
    assert ca.reload() is False


def test_an_expired_node_certificate_is_not_called_another_cas(tmp_path):
    import datetime
    from cryptography.hazmat.primitives import hashes, serialization
    cfg = make_config(tmp_path)
    tls.make_cluster_certs(cfg)
    ca = tls.read_client_ca(cfg.ca_path)
    ca_key = serialization.load_pem_private_key(cfg.ca_key_path.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    long_ago = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    expired = (x509.CertificateBuilder().subject_name(ca.certificate.subject)
               .issuer_name(ca.certificate.subject).public_key(key.public_key()).serial_number(7)
               .not_valid_before(long_ago).not_valid_after(long_ago + datetime.timedelta(days=365))
               .sign(ca_key, hashes.SHA256()))
    problem, _, advice = ca.refusal([expired], "127.0.0.1")
    assert problem == "certificate expired on 2020-12-31"
    assert "new certificate" in advice and "ca.pem" not in advice


def test_a_node_does_not_start_on_a_certificate_the_others_would_refuse(tmp_path, other_cluster):
    import datetime
    import shutil
    cfg = make_config(tmp_path)
    tls.make_cluster_certs(cfg)
    expires = tls.check_node_certificate(cfg, 1)
    assert expires == load(cfg.node_cert_path(1)).not_valid_after_utc
    # Out of its dates: expired, or not yet valid (this machine's clock is wrong).
    day = datetime.timedelta(days=1)
    with pytest.raises(tls.CertificateFilesError) as expired:
        tls.check_node_certificate(cfg, 1, now=expires + day)
    assert str(expired.value).startswith(f"{cfg.node_cert_path(1)} expired on {expires:%Y-%m-%d}:")
    assert "--if-missing" in str(expired.value)
    with pytest.raises(tls.CertificateFilesError, match="is this machine's clock right"):
        tls.check_node_certificate(cfg, 1, now=expires - 3650 * day)
    # Another node's pair (files swapped or copied from another machine).
    for suffix in ("pem", "key"):
        shutil.copy(cfg.tls_dir / f"node-2.{suffix}", cfg.tls_dir / f"node-1.{suffix}")
    with pytest.raises(tls.CertificateFilesError) as another_node:
        tls.check_node_certificate(cfg, 1)
    assert str(another_node.value).startswith(f"{cfg.node_cert_path(1)} is node 2's certificate, not node 1's;")
    # Node 1's pair from another cluster's CA (its certificates were remade elsewhere).
    for suffix in ("pem", "key"):
        shutil.copy(other_cluster.tls_dir / f"node-1.{suffix}", cfg.tls_dir / f"node-1.{suffix}")
    with pytest.raises(tls.CertificateFilesError) as another_ca:
        tls.check_node_certificate(cfg, 1)
    assert f"was not made by the cluster CA in {cfg.ca_path}" in str(another_ca.value)
