"""Peer links: framing (StringTransport) and mutual TLS between real transports on 127.0.0.1."""

import datetime
import socket
import struct

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings, strategies as st
from twisted.internet import defer, endpoints, protocol, ssl
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory

from paxchat.paxos.transport import MAX_FRAME_BYTES, PeerTransport

try:
    from paxchat.tls import node_id_of
except ImportError:                                   # paxchat.tls not there yet
    def node_id_of(certificate):
        if certificate is None:
            return None
        name = certificate.to_cryptography().subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        prefix = "paxchat-node-"
        value = name[0].value if name else ""
        return int(value[len(prefix):]) if value.startswith(prefix) else None


def reactor():
    from twisted.internet import reactor as global_reactor
    return global_reactor


# -- certificates -------------------------------------------------------------

def _pem(cert, key):
    return (cert.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()))


class CA:
    """A throwaway cluster CA issuing node certificates named as paxchat.tls names them."""

    def __init__(self, label="test CA"):
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, label)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.key, hashes.SHA256()))
        self.trust = ssl.Certificate.loadPEM(self.cert.public_bytes(serialization.Encoding.PEM))

    def node(self, node_id):
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "paxchat node"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"paxchat-node-{node_id}")]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(f"paxchat-node-{node_id}")]), critical=False)
            .sign(self.key, hashes.SHA256()))
        return ssl.PrivateCertificate.loadPEM(_pem(cert, key))

    def server_options(self, own):
        return ssl.CertificateOptions(
            privateKey=own.privateKey.original, certificate=own.original, verify=True,
            caCerts=[self.trust.original], requireCertificate=True,
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2)

    def client_options(self, own, peer_id):
        return ssl.optionsForClientTLS(
            f"paxchat-node-{peer_id}", trustRoot=self.trust, clientCertificate=own,
            extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2})


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- helpers ------------------------------------------------------------------

@pytest.fixture
def captured_log():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def texts(events):
    return [formatEvent(e) for e in events if e.get("log_namespace", "").startswith("paxchat")]


def poll_until(condition, timeout=10.0):
    """A Deferred firing once ``condition()`` holds; fails after ``timeout`` seconds."""
    r = reactor()
    d = defer.Deferred()
    deadline = r.seconds() + timeout

    def check():
        if condition():
            d.callback(None)
        elif r.seconds() > deadline:
            d.errback(AssertionError("condition not met in time"))
        else:
            r.callLater(0.01, check)

    check()
    return d


class Cluster:
    """Real transports for node ids on 127.0.0.1, stopped at the end of the test."""

    def __init__(self, ca, ids):
        self.ca = ca
        self.ports = {n: free_port() for n in ids}
        self.certs = {n: ca.node(n) for n in ids}
        self.inbox = {n: [] for n in ids}
        self.running = {}

    def start(self, node_id, on_message=None, **kwargs):
        own = self.certs[node_id]
        peers = {n: ("127.0.0.1", p) for n, p in self.ports.items() if n != node_id}
        transport = PeerTransport(
            reactor(), node_id, peers, ("127.0.0.1", self.ports[node_id]),
            self.ca.server_options(own), lambda peer: self.ca.client_options(own, peer),
            node_id_of,
            on_message or (lambda sender, frame: self.inbox[node_id].append((sender, frame))),
            retry_policy=lambda attempt: 0.05, **kwargs)
        transport.startService()
        self.running[node_id] = transport
        return transport

    @defer.inlineCallbacks
    def stop(self, node_id):
        yield self.running.pop(node_id).stopService()

    @defer.inlineCallbacks
    def stop_all(self):
        for node_id in list(self.running):
            yield self.stop(node_id)


@pytest.fixture
def cluster():
    made = []

    def make(ids, ca=None):
        c = Cluster(ca or CA(), ids)
        made.append(c)
        return c

    yield make
    for c in made:
        pytest_twisted.blockon(c.stop_all())


class RawPeer(protocol.Protocol):
    """A TLS client that writes whatever the test says, to play a broken or hostile peer."""

    def __init__(self):
        self.lost = defer.Deferred()

    def connectionLost(self, reason):
        self.lost.callback(reason.getErrorMessage())


@defer.inlineCallbacks
def raw_connect(port, creator):
    factory = protocol.Factory.forProtocol(RawPeer)
    endpoint = endpoints.TCP4ClientEndpoint(reactor(), "127.0.0.1", port)
    tls = yield endpoint.connect(TLSMemoryBIOFactory(creator, True, factory))
    return tls.wrappedProtocol


def frame(payload):
    return struct.pack(">I", len(payload)) + payload


# -- real reactor, real TLS ---------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_two_nodes_exchange_frames_over_mutual_tls(cluster):
    c = cluster([1, 2])
    a, b = c.start(1), c.start(2)
    yield a.listening
    yield b.listening
    yield poll_until(lambda: a.peer_state(2) == "connected" and b.peer_state(1) == "connected")
    assert a.send(2, b"prepare 1")
    assert b.send(1, b"promise 1")
    big = bytes(range(256)) * 8192                         # 2 MiB, several TLS records
    assert a.send(2, big)
    yield poll_until(lambda: len(c.inbox[2]) == 2 and len(c.inbox[1]) == 1)
    assert c.inbox[2] == [(1, b"prepare 1"), (1, big)]
    assert c.inbox[1] == [(2, b"promise 1")]
    assert a.connected_peers() == {2}


@pytest_twisted.inlineCallbacks
def test_send_to_a_node_that_is_down_drops(cluster):
    c = cluster([1, 2])
    a = c.start(1)
    yield a.listening
    assert a.send(2, b"lost") is False
    assert a.dropped == 1 and a.peer_state(2) == "disconnected"
    with pytest.raises(ValueError):
        a.send(2, b"")


@pytest_twisted.inlineCallbacks
def test_certificate_from_another_ca_is_refused_and_logged(cluster, captured_log):
    c = cluster([1, 2])
    a = c.start(1)
    yield a.listening
    stranger_ca = CA("another CA")
    impostor = cluster([2], ca=stranger_ca)
    impostor.ports = {1: c.ports[1], 2: free_port()}
    impostor.certs = {2: stranger_ca.node(2)}
    impostor.inbox = {2: []}
    b = impostor.start(2)
    yield b.listening
    yield poll_until(lambda: any("failed before it was authenticated" in t
                                 for t in texts(captured_log)))
    assert a.peer_state(2) == "disconnected" and not a._inbound
    assert not b.send(1, b"hello")
    assert c.inbox[1] == []


@pytest_twisted.inlineCallbacks
def test_peer_without_client_certificate_is_refused(cluster, captured_log):
    c = cluster([1, 2])
    a = c.start(1)
    yield a.listening
    creator = ssl.optionsForClientTLS("paxchat-node-1", trustRoot=c.ca.trust)
    peer = yield raw_connect(c.ports[1], creator)
    peer.transport.write(frame(b"let me in"))
    yield peer.lost
    assert not a._inbound and c.inbox[1] == []
    yield poll_until(lambda: any("failed before it was authenticated" in t
                                 for t in texts(captured_log)))


@pytest_twisted.inlineCallbacks
def test_node_of_no_cluster_is_refused(cluster, captured_log):
    c = cluster([1, 2])
    a = c.start(1)
    yield a.listening
    outsider = c.ca.node(9)                                    # signed, but not in the cluster
    peer = yield raw_connect(c.ports[1], c.ca.client_options(outsider, 1))
    peer.transport.write(frame(b"hi"))
    yield peer.lost
    yield poll_until(lambda: any("names no other node" in t for t in texts(captured_log)))
    assert c.inbox[1] == []


@pytest_twisted.inlineCallbacks
def test_client_refuses_a_server_that_is_another_node(cluster, captured_log):
    c = cluster([1, 2, 3])
    # Node 1 believes node 2 listens where node 3 does.
    c.ports[2] = c.ports[3]
    a = c.start(1)
    three = c.start(3)
    yield a.listening
    yield three.listening
    yield poll_until(lambda: three.peer_state(1) == "connected")
    # Node 1's own failed link (node 3 dialling "node 2" at its own port fails and logs too).
    yield poll_until(lambda: a._failed_links.get(2, 0) >= 1)
    assert any("outbound" in t and "failed before it was authenticated" in t for t in texts(captured_log))
    assert a.peer_state(2) == "disconnected"
    assert not a.send(2, b"to the wrong node")


@pytest_twisted.inlineCallbacks
def test_oversize_and_garbage_frames_drop_only_that_connection(cluster, captured_log):
    c = cluster([1, 2, 3])

    def on_message(sender, payload):
        if payload == b"garbage":
            raise ValueError("cannot decode")
        c.inbox[1].append((sender, payload))

    a = c.start(1, on_message=on_message)
    b = c.start(2)
    yield a.listening
    yield b.listening
    yield poll_until(lambda: b.peer_state(1) == "connected")

    hostile = yield raw_connect(c.ports[1], c.ca.client_options(c.certs[3], 1))
    hostile.transport.write(struct.pack(">I", MAX_FRAME_BYTES + 1) + b"x" * 100)
    yield hostile.lost
    assert any("announced a" in t for t in texts(captured_log))

    garbled = yield raw_connect(c.ports[1], c.ca.client_options(c.certs[3], 1))
    garbled.transport.write(frame(b"garbage") + frame(b"never delivered"))
    yield garbled.lost
    assert any("could not be handled" in t for t in texts(captured_log))

    assert b.send(1, b"still serving")
    yield poll_until(lambda: (2, b"still serving") in c.inbox[1])
    assert (3, b"never delivered") not in c.inbox[1]
    assert b.peer_state(1) == "connected"


@pytest_twisted.inlineCallbacks
def test_reconnects_after_the_peer_restarts(cluster):
    c = cluster([1, 2])
    states = []
    a = c.start(1)
    a.add_state_observer(lambda peer, direction, up: states.append((peer, direction, up)))
    c.start(2)
    yield poll_until(lambda: a.peer_state(2) == "connected")
    yield c.stop(2)
    yield poll_until(lambda: a.peer_state(2) == "disconnected")
    assert not a.send(2, b"while down")
    b = c.start(2)
    yield b.listening
    yield poll_until(lambda: a.peer_state(2) == "connected")
    assert a.send(2, b"after restart")
    yield poll_until(lambda: (1, b"after restart") in c.inbox[2])
    assert (2, "outbound", True) in states and (2, "outbound", False) in states


@pytest_twisted.inlineCallbacks
def test_a_node_that_stops_closes_its_links_cleanly(cluster, captured_log):
    c = cluster([1, 2])
    a, b = c.start(1), c.start(2)
    # Both links of each side up: a peer's state says connected once either is.
    yield poll_until(lambda: a.peer_state(2) == "connected" and b.peer_state(1) == "connected"
                     and 2 in a._inbound and 1 in b._inbound)
    yield c.stop(2)
    # The stopped node's own links were all down, and said so, when its stop fired.
    own = [t for t in texts(captured_log) if "with node 1 down" in t]
    assert len(own) == 2 and all("closed cleanly" in t for t in own), own
    assert not b._inbound and not b._outbound
    yield poll_until(lambda: a.peer_state(2) == "disconnected" and 2 not in a._inbound)
    down = [t for t in texts(captured_log) if "with node 2 down" in t]
    assert len(down) == 2 and all("closed cleanly" in t for t in down), down


@pytest_twisted.inlineCallbacks
def test_silent_peer_is_dropped(cluster, captured_log):
    c = cluster([1, 2])
    a = c.start(1, ping_interval=0.05, idle_timeout=0.3)
    yield a.listening
    mute = yield raw_connect(c.ports[1], c.ca.client_options(c.certs[2], 1))
    # The raw peer completes TLS but never sends a keepalive.
    yield poll_until(lambda: 2 in a._inbound)
    reason = yield mute.lost
    assert reason is not None
    assert any("silent" in t for t in texts(captured_log))


# -- framing, without sockets -------------------------------------------------

class CertTransport(StringTransport):
    def __init__(self, certificate):
        super().__init__()
        self.certificate = certificate
        self.aborted = False

    def getPeerCertificate(self):
        return self.certificate

    def abortConnection(self):
        self.aborted = True
        self.loseConnection()


def unit_transport(on_message=None, lineage=b"", **options):
    clock = MemoryReactorClock()
    inbox = []
    t = PeerTransport(clock, 1, {2: ("127.0.0.1", 1), 3: ("127.0.0.1", 2)}, ("127.0.0.1", 0),
                      None, lambda peer: None, lambda cert: cert,
                      on_message or (lambda s, f: inbox.append((s, f))), lineage=lineage,
                      **options)
    t.running = True                      # as if started, without listening or dialling
    return t, clock, inbox


def connect(t, certificate, expected_peer=None):
    """A link to ``t`` from node ``certificate``, authenticated (``t`` has said hello on it)."""
    from paxchat.paxos.transport import PeerProtocol
    proto = PeerProtocol(t, expected_peer)
    transport = CertTransport(certificate)
    proto.makeConnection(transport)
    proto.handshakeCompleted()
    return proto, transport


def test_frames_split_and_joined_are_delivered_whole():
    t, clock, inbox = unit_transport()
    proto, transport = connect(t, 2)
    data = frame(b"one") + frame(b"") + frame(b"two" * 1000)
    for i in range(len(data)):
        proto.dataReceived(data[i:i + 1])
    assert inbox == [(2, b"one"), (2, b"two" * 1000)]
    assert t.peer_ids == {2, 3} and 2 in t._inbound


def test_a_frame_of_megabytes_in_tls_sized_reads_is_delivered_whole_and_nothing_is_kept():
    t, clock, inbox = unit_transport()
    proto, transport = connect(t, 2)
    big = bytes(range(256)) * (3 * 4096 + 7)                       # ~3 MiB
    data = frame(b"a") + frame(big) + frame(b"b")
    for i in range(0, len(data), 32768):
        proto.dataReceived(data[i:i + 32768])
    assert inbox == [(2, b"a"), (2, big), (2, b"b")]
    assert not proto._inbuf


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(max_size=3000).filter(lambda f: not f.startswith(b"\x00")), max_size=12),
       st.data())
def test_frames_come_out_the_same_whatever_the_reads(frames, data):
    # (Paxos messages never start with a zero byte: such a first frame is a hello.)
    t, clock, inbox = unit_transport()
    proto, transport = connect(t, 2)
    stream = b"".join(frame(f) for f in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    for a, b in zip([0] + cuts, cuts + [len(stream)]):
        proto.dataReceived(stream[a:b])
    assert inbox == [(2, f) for f in frames if f]                 # empty frames are keepalives
    assert not proto._inbuf and not transport.aborted


def test_sending_writes_a_length_prefixed_frame():
    t, clock, inbox = unit_transport()
    proto, transport = connect(t, 3, expected_peer=3)
    assert t.send(3, b"accept")
    assert transport.value() == frame(b"\x00/") + frame(b"accept")     # after the hello
    clock.advance(t.ping_interval)
    assert transport.value().endswith(frame(b""))           # keepalive


def test_frames_before_authentication_are_ignored_and_unknown_nodes_refused():
    t, clock, inbox = unit_transport()
    proto, transport = connect(t, 7)                             # not a node of the cluster
    assert transport.aborted and proto.peer_id is None
    proto.dataReceived(frame(b"sneaky"))
    assert inbox == []
    proto, transport = connect(t, 2, expected_peer=3)            # the wrong node answered
    assert transport.aborted and 2 not in t._outbound


def test_oversize_length_prefix_aborts_without_reading_on():
    t, clock, inbox = unit_transport()
    proto, transport = connect(t, 2)
    proto.dataReceived(struct.pack(">I", MAX_FRAME_BYTES + 1) + b"x" * 10 + frame(b"later"))
    assert transport.aborted and inbox == []


def test_decoder_error_drops_the_connection_not_the_node():
    def picky(sender, payload):
        raise ValueError("undecodable")

    t, clock, inbox = unit_transport(on_message=picky)
    proto, transport = connect(t, 2)
    proto.dataReceived(frame(b"??"))
    assert transport.aborted


def test_backed_up_link_drops_instead_of_buffering():
    t, clock, inbox = unit_transport()
    t.paused_write_limit = 100
    proto, transport = connect(t, 2, expected_peer=2)
    proto.pauseProducing()
    assert t.send(2, b"x" * 60)
    assert not t.send(2, b"y" * 60)
    assert t.dropped == 1
    proto.resumeProducing()
    assert t.send(2, b"z" * 60)


def test_handshake_that_never_finishes_is_dropped():
    from paxchat.paxos.transport import PeerProtocol
    t, clock, inbox = unit_transport()
    proto = PeerProtocol(t)
    transport = CertTransport(None)
    proto.makeConnection(transport)
    clock.advance(t.handshake_timeout + 1)
    assert transport.aborted


@pytest_twisted.inlineCallbacks
def test_from_config_uses_the_cluster_certificates(tmp_path):
    from paxchat import config as configmod
    from paxchat import tls

    ports = [free_port(), free_port()]
    text = "[cluster]\ntls_dir = certs\ndata_dir = data\n" + "".join(
        f"[node.{n}]\nclient = 127.0.0.1:{free_port()}\npeer = 127.0.0.1:{port}\n"
        for n, port in zip((1, 2), ports))
    config = configmod.loads(text, path=str(tmp_path / "cluster.ini"))
    tls.make_cluster_certs(config)
    inbox = []
    nodes = [PeerTransport.from_config(reactor(), config, n,
                                       lambda sender, payload: inbox.append((sender, payload)),
                                       retry_policy=lambda attempt: 0.05, identity=b"%d" % n * 32)
             for n in (1, 2)]
    try:
        for node in nodes:
            node.startService()
            yield node.listening
        yield poll_until(lambda: nodes[0].peer_state(2) == "connected")
        assert nodes[0].send(2, b"over the cluster's own TLS")
        yield poll_until(lambda: inbox == [(1, b"over the cluster's own TLS")])
        # Hellos went both ways, with the identities.
        assert nodes[1].known_identities == {1: b"1" * 32}
    finally:
        for node in nodes:
            yield node.stopService()


# -- hellos: lineage and identity of the data behind each link ----------------

RESTORED = b"ab" * 32                 # the sha256 of a backup, as paxchat-admin restore stamps it
OURS, THEIRS = b"0" * 32, b"1" * 32   # data identities


def test_links_open_with_a_hello_naming_lineage_and_identity_and_remember_the_peer():
    remembered = []
    t, clock, inbox = unit_transport(identity=OURS, remember=remembered.append)
    proto, transport = connect(t, 2)
    assert transport.value() == frame(b"\x00/" + OURS)           # before anything else
    proto.dataReceived(frame(b"") + frame(b"\x00/" + THEIRS) + frame(b"accept"))
    assert inbox == [(2, b"accept")] and not transport.disconnecting
    assert remembered == [{2: THEIRS}] and t.known_identities == {2: THEIRS}
    proto, transport = connect(t, 2)                              # the same data again
    proto.dataReceived(frame(b"\x00/" + THEIRS) + frame(b"again"))
    assert inbox[-1] == (2, b"again") and len(remembered) == 1


def test_nodes_of_one_lineage_speak():
    t, clock, inbox = unit_transport(lineage=RESTORED, identity=OURS)
    proto, transport = connect(t, 2)
    assert transport.value() == frame(b"\x00" + RESTORED + b"/" + OURS)
    proto.dataReceived(frame(b"\x00" + RESTORED + b"/" + THEIRS) + frame(b"accept"))
    assert inbox == [(2, b"accept")] and not transport.disconnecting


def test_a_restored_peer_is_refused_by_a_node_never_restored_and_told_why(captured_log):
    t, clock, inbox = unit_transport()
    proto, transport = connect(t, 2)
    proto.dataReceived(frame(b"\x00" + RESTORED + b"/" + THEIRS) + frame(b"accept"))
    assert inbox == []
    why = b"its data was restored from backup abababababab, ours was never restored from a backup"
    assert transport.value() == frame(b"\x00/") + frame(b"\x00!" + why)   # our hello, then why
    assert transport.disconnecting and transport.producer is None   # closed after that frame
    clock.advance(t.ping_interval)
    assert transport.aborted                                     # even if the peer holds on
    [line] = [x for x in texts(captured_log) if "refused" in x]
    assert ("node 2: its data was restored from backup abababababab, ours was never restored"
            in line)
    assert "restore every node from the same backup" in line


def test_a_restored_node_refuses_a_node_of_an_earlier_build():
    t, clock, inbox = unit_transport(lineage=RESTORED)
    proto, transport = connect(t, 3, expected_peer=3)
    proto.dataReceived(frame(b"") + frame(b"accept"))           # a keepalive decides nothing
    assert inbox == [] and transport.disconnecting
    assert "never restored" in proto._refused


def test_a_node_refused_by_a_peer_says_why_and_dials_it_rarely(captured_log):
    from paxchat.paxos.transport import LINEAGE_RETRY_SECONDS
    t, clock, inbox = unit_transport(identity=OURS)
    t._retry_policy = lambda attempt: 0.1
    proto, transport = connect(t, 2, expected_peer=2)
    proto.dataReceived(frame(b"\x00/" + THEIRS) + frame(b"\x00!its data is not the data it had")
                       + frame(b"accept"))
    assert inbox == [] and transport.disconnecting
    assert t.peer_state(2) == "refused" and t.refusals() == {}   # it refuses us, not we it
    assert t.refused_by() == {2: "its data is not the data it had"}
    assert t.retry_delay(2, 1) == LINEAGE_RETRY_SECONDS
    [line] = [x for x in texts(captured_log) if "refuses our links" in x]
    assert line.startswith("node 2 refuses our links: its data is not the data it had (1 time(s)")
    assert line.endswith("move its data directory aside and run paxchat-admin rebuild")
    # Put right, it speaks to us again: no longer refused, dialled as usual.
    proto, transport = connect(t, 2)
    proto.dataReceived(frame(b"\x00/" + THEIRS) + frame(b"accept"))
    assert inbox == [(2, b"accept")] and t.peer_state(2) != "refused" and t.refused_by() == {}


def test_nodes_restored_from_different_backups_refuse_each_other():
    t, clock, inbox = unit_transport(lineage=RESTORED)
    proto, transport = connect(t, 2)
    proto.dataReceived(frame(b"\x00" + b"cd" * 32 + b"/") + frame(b"accept"))
    assert inbox == [] and transport.disconnecting


def test_a_peer_back_with_other_data_is_refused(captured_log):
    t, clock, inbox = unit_transport(identity=OURS, known_identities={2: THEIRS})
    proto, transport = connect(t, 2)
    proto.dataReceived(frame(b"\x00/" + b"2" * 32) + frame(b"accept"))
    assert inbox == [] and transport.disconnecting
    why = ("its data is not the data it had (identity 222222222222, we knew 111111111111):"
           " a new disk, or a directory copied in by hand")
    assert t.refusals() == {2: why} and t.peer_state(2) == "refused"
    [line] = [x for x in texts(captured_log) if "refused" in x]
    assert line.startswith(f"node 2: {why}; its links are refused")
    assert line.endswith("move its directory aside and run paxchat-admin rebuild")
    assert t.known_identities == {2: THEIRS}                      # not forgotten for it
    proto, transport = connect(t, 2)                              # a peer that said hello before
    proto.dataReceived(frame(b"accept"))                          # now says none
    assert inbox == [] and "without saying which data" in t.refusals()[2]


def test_a_rebuilding_peer_on_new_data_is_let_in_remembered_and_its_old_links_cut(captured_log):
    remembered = []
    t, clock, inbox = unit_transport(lineage=RESTORED, identity=OURS,
                                     known_identities={2: THEIRS}, remember=remembered.append)
    old, old_transport = connect(t, 2)
    old.dataReceived(frame(b"\x00" + RESTORED + b"/" + THEIRS) + frame(b"old 1"))
    unheard, unheard_transport = connect(t, 3)             # another node's link: untouched
    new_identity = b"2" * 32
    new, new_transport = connect(t, 2)
    # No lineage yet (a new disk): let in all the same, as a rebuilding node.
    new.dataReceived(frame(b"\x00/" + new_identity + b"/rebuilding") + frame(b"query"))
    assert inbox == [(2, b"old 1"), (2, b"query")] and not new_transport.disconnecting
    assert old_transport.aborted and not unheard_transport.disconnecting
    old.dataReceived(frame(b"old 2"))                       # what was still on its way: dropped
    assert inbox[-1] == (2, b"query")
    assert t.known_identities == {2: new_identity} and remembered == [{2: new_identity}]
    [line] = [x for x in texts(captured_log) if "rebuilds" in x]
    assert "node 2 rebuilds on new data (identity 222222222222, was 111111111111)" in line
    # Once rebuilt it speaks as any node, and its old data stays refused.
    again, again_transport = connect(t, 2)
    again.dataReceived(frame(b"\x00" + RESTORED + b"/" + new_identity) + frame(b"vote"))
    assert inbox[-1] == (2, b"vote")
    back, _ = connect(t, 2)
    back.dataReceived(frame(b"\x00" + RESTORED + b"/" + THEIRS) + frame(b"stale"))
    assert inbox[-1] == (2, b"vote") and "not the data it had" in t.refusals()[2]


def test_a_rebuilding_node_says_so_and_takes_the_first_lineage_it_hears():
    adopted = []
    t, clock, inbox = unit_transport(identity=OURS, rebuilding=True, adopt_lineage=adopted.append)
    proto, transport = connect(t, 2)
    assert transport.value() == frame(b"\x00/" + OURS + b"/rebuilding")
    proto.dataReceived(frame(b"\x00" + RESTORED + b"/" + THEIRS) + frame(b"report"))
    assert inbox == [(2, b"report")] and adopted == [RESTORED] and t.lineage == RESTORED
    other, other_transport = connect(t, 3)
    assert other_transport.value() == frame(b"\x00" + RESTORED + b"/" + OURS + b"/rebuilding")
    other.dataReceived(frame(b"\x00" + b"cd" * 32 + b"/" + THEIRS) + frame(b"report"))
    assert inbox == [(2, b"report")] and other_transport.disconnecting    # another lineage
    assert adopted == [RESTORED]
    t.rebuilding = False
    assert connect(t, 2)[1].value() == frame(b"\x00" + RESTORED + b"/" + OURS)


@pytest_twisted.inlineCallbacks
def test_a_peer_readdressed_is_dialled_at_its_new_address(cluster, captured_log):
    c = cluster([1, 2])
    a = c.start(1)
    c.start(2)
    yield poll_until(lambda: a.peer_state(2) == "connected")
    yield c.stop(2)
    c.ports[2] = free_port()                      # node 2 on another machine
    b = c.start(2)
    yield b.listening
    assert a.readdress(2, "127.0.0.1", c.ports[2]) is True
    assert a.readdress(2, "127.0.0.1", c.ports[2]) is False        # nothing new
    assert a.peers[2] == ("127.0.0.1", c.ports[2])
    yield poll_until(lambda: a.send(2, b"at the new address")
                     and (1, b"at the new address") in c.inbox[2])
    assert any(f"node 1 dials node 2 at 127.0.0.1:{c.ports[2]} from now on" in x
               for x in texts(captured_log))


def test_a_hello_with_an_unreadable_identity_is_refused():
    t, clock, inbox = unit_transport(identity=OURS)
    proto, transport = connect(t, 2)
    proto.dataReceived(frame(b"\x00/not an identity") + frame(b"accept"))
    assert inbox == [] and t.refusals() == {2: "its hello names no data identity we can read"}
    assert t.known_identities == {}


def test_a_node_of_an_earlier_build_sends_no_hello_and_is_not_checked():
    t, clock, inbox = unit_transport(identity=OURS)
    proto, transport = connect(t, 3, expected_peer=3)
    assert transport.value() == frame(b"\x00/" + OURS)           # it skips ours
    proto.dataReceived(frame(b"accept"))
    assert inbox == [(3, b"accept")] and t.known_identities == {} and t.refusals() == {}


def test_after_the_hello_each_side_says_what_its_build_can_apply():
    t, clock, inbox = unit_transport(identity=OURS, build_version=3)
    proto, transport = connect(t, 2)
    assert transport.value() == frame(b"\x00/" + OURS) + frame(b"\x00v3")
    proto.dataReceived(frame(b"\x00/" + THEIRS) + frame(b"\x00v2") + frame(b"accept"))
    assert inbox == [(2, b"accept")] and t.peer_builds() == {2: 2}
    old, _ = connect(t, 3, expected_peer=3)       # an earlier build says nothing after its hello
    old.dataReceived(frame(b"\x00/" + THEIRS) + frame(b"accept"))
    assert t.peer_builds() == {2: 2}
    proto.dataReceived(frame(b"\x00vxx") + frame(b"\x00v" + b"9" * 11))   # unreadable: ignored
    assert t.peer_builds() == {2: 2} and not transport.disconnecting
    proto.connectionLost(Failure(ConnectionDone()))
    assert t.peer_builds() == {}                  # not counted while not linked
    silent, transport = connect(unit_transport(identity=OURS)[0], 2)
    assert transport.value() == frame(b"\x00/" + OURS)            # a transport told no build


def test_an_outbound_link_refused_for_its_lineage_is_dialled_rarely(captured_log):
    from paxchat.paxos.transport import LINEAGE_RETRY_SECONDS
    t, clock, inbox = unit_transport()
    t._retry_policy = lambda attempt: 0.1

    def delay(attempt):
        return t.retry_delay(2, attempt)

    assert delay(1) == 0.1
    for _ in range(3):
        proto, transport = connect(t, 2, expected_peer=2)
        proto.dataReceived(frame(b"\x00" + RESTORED + b"/"))
        proto.connectionLost(Failure(ConnectionDone()))
        assert delay(1) == LINEAGE_RETRY_SECONDS
        clock.advance(LINEAGE_RETRY_SECONDS)
    # One report a minute, counting the refusals in between.
    lines = [x for x in texts(captured_log) if "refused" in x]
    assert len(lines) == 2 and "(1 time(s)" in lines[0] and "(2 time(s)" in lines[1]
    # The peer put right: the next link of the same lineage resets the wait.
    proto, transport = connect(t, 2, expected_peer=2)
    proto.dataReceived(frame(b"\x00/") + frame(b"accept"))
    assert inbox == [(2, b"accept")] and delay(1) == 0.1


@pytest_twisted.inlineCallbacks
def test_real_links_between_lineages_carry_nothing_and_both_sides_say_so(cluster, captured_log):
    c = cluster([1, 2, 3])
    a, b, d = c.start(1), c.start(2, lineage=RESTORED), c.start(3, lineage=RESTORED)
    for t in (a, b, d):
        yield t.listening
    yield poll_until(lambda: b.peer_state(3) == "connected" and d.peer_state(2) == "connected")
    for sender, to in ((a, 2), (b, 1), (b, 3), (d, 2)):
        sender.send(to, b"prepare " + str(sender.node_id).encode())
    yield poll_until(lambda: c.inbox[2] == [(3, b"prepare 3")] and c.inbox[3] == [(2, b"prepare 2")])
    refusals = lambda: [x for x in texts(captured_log) if "its links are refused" in x]  # noqa: E731
    yield poll_until(lambda: any(x.startswith("node 2:") for x in refusals())
                     and any(x.startswith("node 1:") for x in refusals()))
    # The links between lineages close, and are not dialled again at once.
    yield poll_until(lambda: not any(p.peer_id == 1 for p in b._connections | d._connections)
                     and not a._outbound)
    assert a.peer_state(2) == a.peer_state(3) == b.peer_state(1) == d.peer_state(1) == "refused"
    assert a.refusals() == {
        2: "its data was restored from backup abababababab, ours was never restored from a backup",
        3: "its data was restored from backup abababababab, ours was never restored from a backup"}
    assert c.inbox[1] == []
    assert b.peer_state(3) == "connected" and b.refusals() == {1: b.refusals()[1]}

    # Node 2 put right (started again, never restored): node 1 does not wait
    # out its 30 s before dialling it, once it hears from node 2.
    yield c.stop(2)
    b = c.start(2)
    yield b.listening
    yield poll_until(lambda: b.peer_state(1) == "connected")
    b.send(1, b"promise 2")
    yield poll_until(lambda: c.inbox[1] == [(2, b"promise 2")] and a.peer_state(2) == "connected")
    assert a.refusals() == {3: a.refusals()[3]}


def test_strangers_waiting_for_their_handshake_are_capped(captured_log):
    from twisted.internet.address import IPv4Address
    from twisted.internet.ssl import CertificateOptions

    from paxchat.paxos.transport import PeerProtocol, _InboundFactory
    t, clock, inbox = unit_transport()
    t._server_options = CertificateOptions()
    t.max_unauthenticated = 2
    factory = _InboundFactory(t)
    addr = IPv4Address("TCP", "127.0.0.1", 50000)
    strangers = [PeerProtocol(t) for _ in range(2)]
    for proto in strangers:
        proto.makeConnection(CertTransport(None))                 # handshakes under way
    assert factory.buildProtocol(addr) is None                    # the third is closed at once
    assert factory.turned_away == 1
    assert any("waiting for their TLS handshake" in line for line in texts(captured_log))
    connect(t, 2)                                                 # a peer that did authenticate
    assert factory.buildProtocol(addr) is None                    # does not count: still two waiting
    clock.advance(t.handshake_timeout + 1)                        # the strangers time out
    for proto in strangers:
        assert proto.transport.aborted
        proto.connectionLost(Failure(ConnectionDone()))
    assert factory.buildProtocol(addr) is not None
