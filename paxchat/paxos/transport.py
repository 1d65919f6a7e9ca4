"""Peer links between the nodes: length-prefixed frames over mutual TLS.

Every node listens on its peer address and keeps one outbound connection to
each other node (a ClientService, so it reconnects with backoff). A node
sends on its own outbound connection and receives on the connections others
opened to it, so no two nodes ever have to agree on which link to use.

Who a frame comes from is taken from the peer's certificate, verified by
TLS against the cluster CA and then mapped to a node id; nothing in a frame
can claim another sender. Paxos tolerates lost messages, so ``send`` drops
rather than queues: when the peer is not connected, or when the link's
write buffer is already over its bound. Bad input from a peer (an oversize
frame, a frame the receiver cannot decode) drops that connection only.

A zero-length frame is a keepalive: each side sends one every
``ping_interval`` seconds and drops a connection that has been silent for
``idle_timeout``, so a peer that vanished without closing is noticed.

Nodes whose data descends from different restores must not vote together,
nor may a node whose data is not the data it had (``paxchat/lineage.py``).
Every link opens with a *hello* each way: a frame of a zero byte, the
sender's lineage, ``/`` and its data identity (Paxos messages never start
with a zero byte). The first non-empty frame on a link is the peer's
hello. A peer whose lineage differs from ours, or whose identity is not
the one we knew, is sent a refusal saying why (``REFUSAL``), and the link
is closed before any of its frames is passed on. A peer refused so, or
refusing us, is dialled again after ``LINEAGE_RETRY_SECONDS``, or at once
when a link it opened passes (the operator put it right).

A node rebuilding after its disk was lost (``paxchat/lineage.py``) ends
its hello with ``/rebuilding``. It votes for nothing until every peer has
told it what its lost disk may have promised (``paxos/core.py``), so its
peers let it in whatever identity and lineage it names: they remember its
new identity and close every link of the old one at once, before passing
on any frame of the new, so nothing the lost disk's node sent can arrive
after they answered the rebuilding one. A rebuilding node without a
lineage takes the first non-empty one a peer names (a cluster restored
from a backup), and keeps it. Earlier builds refuse such a hello (they
read no identity in it).

After its hello a node sends its *build*: a frame of a zero byte, ``v``
and the highest apply version its build knows (``paxchat/upgrades.py``),
so a leader knows what every peer's build can apply. A node of an earlier
build sends none, and skips ours as it skips any frame it cannot decode.

A node of an earlier build sends no hello, and skips ours as a frame it
cannot decode (logged at debug level). A link that opens without a hello
is taken as such a node's, unchecked, unless that peer said hello before:
then it is refused. A restored node refuses it either way (its lineage is
not ours).
"""

import struct

from twisted.application import service
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import endpoints, interfaces
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from paxchat.lineage import IDENTITY, describe
from paxchat.logs import OccasionalByKind
from paxchat.tcp import no_delay

__all__ = ["PeerTransport", "PeerProtocol", "MAX_FRAME_BYTES"]

log = Logger(namespace="paxchat.paxos.transport")

MAX_FRAME_BYTES = 16 * 1024 * 1024
_FRAME_PREFIX = struct.Struct(">I")           # Int32StringReceiver's length prefix
PAUSED_WRITE_LIMIT = 8 * 1024 * 1024
PING_INTERVAL = 1.0
IDLE_TIMEOUT = 5.0
HANDSHAKE_TIMEOUT = 10.0
# Inbound connections still in their TLS handshake, at most: past it a new
# one is closed at once, so a flood of strangers cannot exhaust memory or
# file descriptors (the handshake timeout clears the ones already open).
MAX_UNAUTHENTICATED_INBOUND = 32
HELLO = b"\x00"                              # first byte of a hello frame
REFUSAL = HELLO + b"!"                       # "your data may not vote with ours", and why
BUILD = HELLO + b"v"                         # the apply version the sender's build knows
REBUILDING = b"rebuilding"                   # ends the hello of a node rebuilding on a new disk
# A peer of another lineage stays so until an operator acts: dial it rarely.
LINEAGE_RETRY_SECONDS = 30.0
LINEAGE_REPORT_SECONDS = 60.0


@implementer(interfaces.IHandshakeListener, interfaces.IPushProducer)
class PeerProtocol(Int32StringReceiver):
    """One authenticated peer link; frames in, frames out, nothing else.

    ``expected_peer`` is the node an outbound connection dialled; None on the
    listening side, where any other node of the cluster may connect.
    """

    MAX_LENGTH = MAX_FRAME_BYTES

    def __init__(self, owner, expected_peer=None):
        self._owner = owner
        self.expected_peer = expected_peer
        self.peer_id = None
        self._inbuf = bytearray()             # bytes read and not yet framed
        self._paused = False
        self._written_while_paused = 0
        self._last_heard = None
        self._timer = None
        self._refused = None
        self._peer_lineage = None              # unknown until its first non-empty frame
        self._peer_identity = None             # the data identity its hello named
        self.peer_build = None                 # the apply version its build knows, once it says
        self._gone = None                      # fires in connectionLost, once asked for
        self._closing = False

    @property
    def direction(self):
        return "inbound" if self.expected_peer is None else "outbound"

    def _where(self):
        try:
            return str(self.transport.getPeer())
        except Exception:
            return "?"

    def connectionMade(self):
        no_delay(self.transport)
        self._owner._connections.add(self)
        self._last_heard = self._owner.clock.seconds()
        self._timer = self._owner.clock.callLater(self._owner.handshake_timeout, self._handshake_late)
        self.transport.registerProducer(self, True)

    def _handshake_late(self):
        self._timer = None
        self.refuse(f"no TLS handshake within {self._owner.handshake_timeout} s")

    def handshakeCompleted(self):
        """TLS checked the CA (and, outbound, the host name); now check which node this is."""
        try:
            certificate = self.transport.getPeerCertificate()
            peer_id = self._owner.identify(certificate)
        except Exception as e:
            peer_id, certificate = None, e
        owner = self._owner
        if not owner.running:
            self.refuse("the transport is stopping")
        elif peer_id is None or peer_id not in owner.peer_ids:
            self.refuse(f"its certificate names no other node of the cluster ({peer_id!r})")
        elif self.expected_peer is not None and peer_id != self.expected_peer:
            self.refuse(f"it is node {peer_id}, not node {self.expected_peer}")
        else:
            self._authenticated(peer_id)

    def _authenticated(self, peer_id):
        self.peer_id = peer_id
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._owner.clock.callLater(self._owner.ping_interval, self._ping)
        self.sendString(self._owner.hello())                    # before any other frame
        if self._owner.build_version is not None:
            self.sendString(BUILD + str(self._owner.build_version).encode("ascii"))
        self._owner._peer_up(self)

    def refuse(self, why):
        """Drop this connection for a reason worth an operator's attention."""
        if self._refused is None:
            self._refused = why
            log.warn("peer connection {direction} {where} dropped: {why}",
                     direction=self.direction, where=self._where(), why=why)
        self.transport.abortConnection()

    def _ping(self):
        self._timer = None
        silent = self._owner.clock.seconds() - self._last_heard
        if silent > self._owner.idle_timeout:
            self.refuse(f"node {self.peer_id} silent for {silent:.1f} s")
            return
        self.sendString(b"")
        self._timer = self._owner.clock.callLater(self._owner.ping_interval, self._ping)

    def dataReceived(self, data):
        """Cut frames out of the stream, in time linear in its bytes.

        Int32StringReceiver joins its whole unread buffer to every read: a
        1 MiB snapshot chunk arriving in 32 KiB reads was copied 16 MiB
        over. Here reads are appended to one ``bytearray`` and each frame is
        copied out once; the framing (and ``sendString``) stay its.
        """
        self._last_heard = self._owner.clock.seconds()
        buf = self._inbuf
        buf += data
        at, end = 0, len(buf)
        while end - at >= 4:
            (length,) = _FRAME_PREFIX.unpack_from(buf, at)
            if length > self.MAX_LENGTH:
                del buf[:]
                self.lengthLimitExceeded(length)
                return
            if end - at - 4 < length:
                break
            frame = bytes(buf[at + 4:at + 4 + length])
            at += 4 + length
            self.stringReceived(frame)
        if at:
            del buf[:at]

    def stringReceived(self, frame):
        if self.peer_id is None or self._refused is not None:
            return
        if not frame:
            return                                  # keepalive
        if frame[:2] == REFUSAL:
            self._told_refused(frame[2:].decode("utf-8", "replace"))
            return
        if self._peer_lineage is None:
            hello = frame[:1] == HELLO
            rebuilding = False
            if hello:
                lineage, _, identity = frame[1:].partition(b"/")
                identity, _, flag = identity.partition(b"/")
                rebuilding = flag == REBUILDING
            else:
                lineage, identity = b"", None       # a node of an earlier build
            if not self._same_data(lineage, identity, rebuilding):
                return
            if hello:
                return                              # for the transport alone
        if frame[:2] == BUILD:
            self._peer_built(frame[2:])
            return
        if self._owner._refusing_us:
            self._owner._refusing_us.pop(self.peer_id, None)   # it speaks to us again
        try:
            self._owner._deliver(self.peer_id, frame)
        except Exception:
            log.failure("frame from node {peer} rejected; dropping the connection",
                        peer=self.peer_id)
            self.refuse("it sent a frame that could not be handled")

    def _same_data(self, lineage, identity, rebuilding=False):
        """Take the peer's lineage and identity (None: it sent no hello); close the
        link, telling it ours, unless its data may vote with ours (or it
        rebuilds, and votes for nothing until it may)."""
        owner = self._owner
        self._peer_lineage = lineage
        self._peer_identity = identity
        if owner.rebuilding and not owner.lineage and lineage and not rebuilding:
            owner._adopt_lineage(lineage)
        if rebuilding:
            why = owner._welcome_rebuilding(self, identity)
        elif lineage != owner.lineage:
            why = f"its data was {describe(lineage)}, ours was {describe(owner.lineage)}"
        else:
            why = owner._check_identity(self.peer_id, identity)
        if why is None:
            owner._refused_data.pop(self.peer_id, None)
            if owner._lineage_refusals.pop(self.peer_id, None):
                owner._dial_now(self.peer_id)       # it was put right: do not wait
            return True
        owner._refuse_data(self, why)
        self._refused = why
        self.sendString(REFUSAL + why.encode("utf-8"))  # so its own log says why
        self._close_soon()
        return False

    def _peer_built(self, raw):
        if raw.isdigit() and len(raw) <= 10:
            self.peer_build = int(raw)
        else:
            log.debug("node {peer} named its build unreadably: {raw!r}", peer=self.peer_id,
                      raw=raw[:32])

    def _told_refused(self, why):
        """The peer refuses our data: say so, and dial it rarely, as if we had refused it."""
        self._refused = f"it refuses our links: {why}"
        self._owner._refused_by(self, why)
        self._close_soon()

    def close(self):
        """Close with TLS's close_notify, so the peer sees a clean close; fires when gone."""
        if self._gone is None:
            self._gone = Deferred()
            if self in self._owner._connections:
                self._close_soon()
            else:
                self._gone.callback(None)      # gone already
        return self._gone

    def _close_soon(self):
        # Close once what was written is out: TLS closes only without a
        # producer. Whatever the peer does, the link is gone a ping later.
        if self._closing:
            return                              # under way: its abort timer stands
        self._closing = True
        owner = self._owner
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = owner.clock.callLater(owner.ping_interval, self.transport.abortConnection)
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def lengthLimitExceeded(self, length):
        self.refuse(f"it announced a {length}-byte frame (limit {self.MAX_LENGTH})")

    def send(self, frame):
        """Write ``frame`` unless the link is backed up; True if written."""
        if self.peer_id is None or self._refused is not None:
            return False
        if self._paused:
            if self._written_while_paused + len(frame) > self._owner.paused_write_limit:
                return False
            self._written_while_paused += len(frame) + 4
        self.sendString(frame)
        return True

    # IPushProducer: the transport tells us when its buffer is full or drained.
    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        self._written_while_paused = 0

    def stopProducing(self):
        pass

    def connectionLost(self, reason):
        self._owner._connections.discard(self)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.peer_id is not None:
            self._owner._peer_down(self, reason)
        else:
            if self._refused is None:
                log.warn("peer connection {direction} {where} failed before it was"
                         " authenticated: {why}", direction=self.direction,
                         where=self._where(), why=reason.getErrorMessage())
            self._owner._link_failed(self)
        if self._gone is not None:
            self._gone.callback(None)          # last: the link is all gone by now


class _InboundFactory(TLSMemoryBIOFactory):
    """The listening side: TLS first, but not for more than a bounded number of strangers."""

    def __init__(self, owner):
        super().__init__(owner._server_options, False, _PeerFactory(owner))
        self._owner = owner
        self.turned_away = 0

    def buildProtocol(self, addr):
        owner = self._owner
        waiting = sum(1 for c in owner._connections if c.peer_id is None and c.expected_peer is None)
        if waiting >= owner.max_unauthenticated:
            self.turned_away += 1
            if self.turned_away % 100 == 1:
                log.warn("peer connection from {where} closed: {waiting} inbound connections are"
                         " already waiting for their TLS handshake ({count} turned away so far)",
                         where=str(addr), waiting=waiting, count=self.turned_away)
            return None
        return super().buildProtocol(addr)


class _PeerFactory(Factory):
    # Not "Starting factory" at every dial: the links' own up and down lines say what happened.
    noisy = False

    def __init__(self, owner, expected_peer=None):
        self._owner = owner
        self._expected = expected_peer

    def buildProtocol(self, addr):
        return PeerProtocol(self._owner, self._expected)


def _server_endpoint(reactor, address):
    host, port = address
    if ":" in host:
        return endpoints.TCP6ServerEndpoint(reactor, port, interface=host)
    return endpoints.TCP4ServerEndpoint(reactor, port, interface=host)


class PeerTransport(service.MultiService):
    """Links to every other node of the cluster; see the module docstring.

    @param peers: ``{node_id: (host, port)}`` of every other node.
    @param listen: this node's ``(host, port)``; port 0 picks a free one
        (``listening`` fires with the port).
    @param server_options: TLS context factory for accepted connections; it
        must require a client certificate signed by the cluster CA.
    @param client_options: ``client_options(peer_id)`` -> a client connection
        creator that presents our certificate and verifies that peer.
    @param identify: ``identify(certificate) -> node id | None``.
    @param on_message: ``on_message(from_node_id, frame_bytes)``; an exception
        from it drops that peer connection.
    """

    def __init__(self, reactor, node_id, peers, listen, server_options, client_options,
                 identify, on_message, *, ping_interval=PING_INTERVAL, idle_timeout=IDLE_TIMEOUT,
                 handshake_timeout=HANDSHAKE_TIMEOUT, paused_write_limit=PAUSED_WRITE_LIMIT,
                 max_unauthenticated=MAX_UNAUTHENTICATED_INBOUND, retry_policy=None,
                 lineage=b"", identity=b"", known_identities=None, remember=None,
                 build_version=None, rebuilding=False, adopt_lineage=None):
        super().__init__()
        self.clock = reactor
        self._reactor = reactor
        self.node_id = node_id
        self.peers = {int(n): (a[0], a[1]) for n, a in peers.items() if int(n) != node_id}
        self.peer_ids = frozenset(self.peers)
        self._listen_address = (listen[0], listen[1])
        self._server_options = server_options
        self._client_options = client_options
        self.identify = identify
        self.on_message = on_message
        self.ping_interval = ping_interval
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.max_unauthenticated = max_unauthenticated
        self.paused_write_limit = paused_write_limit
        self._retry_policy = retry_policy or backoffPolicy(initialDelay=0.1, maxDelay=5.0)
        self._outbound = {}                  # peer id -> authenticated PeerProtocol
        self._inbound = {}                   # peer id -> newest authenticated PeerProtocol
        self._observers = []
        self._failed_links = {}              # peer id -> outbound links that failed in a row
        self.lineage = lineage               # paxchat.lineage: b"" unless restored from a backup
        self.identity = identity             # our data's identity (paxchat.lineage)
        self.known_identities = dict(known_identities or {})   # peer id -> its data's identity
        self.remember = remember             # remember(known_identities), to keep them on disk
        self.build_version = build_version   # said after our hello (None: not said)
        self.rebuilding = rebuilding         # our hello says so, until the node votes again
        self.adopt_lineage = adopt_lineage   # adopt_lineage(lineage): keep the one taken on disk
        self._lineage_refusals = {}          # peer id -> outbound links refused for it in a row
        self._lineage_reports = OccasionalByKind(self.clock, LINEAGE_REPORT_SECONDS)
        self._refused_data = {}              # peer id -> why, while its data may not vote
        self._refusing_us = {}               # peer id -> why it refuses our data
        self._connections = set()            # every open PeerProtocol, authenticated or not
        self._port = None
        self.listening = Deferred()          # fires with the IListeningPort
        self.sent = 0
        self.dropped = 0
        self.received = 0

    @classmethod
    def from_config(cls, reactor, config, node_id, on_message, **kwargs):
        """The transport of node ``node_id`` of a ClusterConfig, with the cluster's certificates."""
        from paxchat import tls
        me = config.node(node_id)
        peers = {n.id: (n.peer.host, n.peer.port) for n in config.peers_of(node_id)}
        server = tls.peer_server_options(config, node_id)
        creators = {peer: tls.peer_client_options(config, node_id, tls.node_name(peer))
                    for peer in peers}
        return cls(reactor, node_id, peers, (me.peer.host, me.peer.port), server,
                   creators.__getitem__, tls.node_id_of, on_message, **kwargs)

    def _client_service(self, peer_id):
        host, port = self.peers[peer_id]
        endpoint = endpoints.HostnameEndpoint(self._reactor, host, port, timeout=5)
        factory = TLSMemoryBIOFactory(self._client_options(peer_id), True,
                                      _PeerFactory(self, peer_id))
        client = ClientService(endpoint, factory, clock=self._reactor,
                               retryPolicy=lambda attempt: self.retry_delay(peer_id, attempt))
        client.setName(f"peer-{peer_id}")
        return client

    def readdress(self, peer_id, host, port):
        """Dial ``peer_id`` at ``host:port`` from now on (its node moved to another
        machine, and cluster.ini was reloaded). Its link to the old address goes."""
        if self.peers.get(peer_id) == (host, port):
            return False
        self.peers[peer_id] = (host, port)
        self._failed_links.pop(peer_id, None)
        name = f"peer-{peer_id}"
        if self.running and name in self.namedServices:
            self.removeService(self.getServiceNamed(name))    # stops it, and closes its link
            self._client_service(peer_id).setServiceParent(self)
        log.info("node {node} dials node {peer} at {host}:{port} from now on", node=self.node_id,
                 peer=peer_id, host=host, port=port)
        return True

    def _dial_now(self, peer_id):
        """Dial ``peer_id`` at once instead of when its backoff ends (no link to it is up)."""
        name = f"peer-{peer_id}"
        if not self.running or peer_id in self._outbound or name not in self.namedServices:
            return
        self.removeService(self.getServiceNamed(name))    # a client waiting to dial: it stops
        self._client_service(peer_id).setServiceParent(self)

    def retry_delay(self, peer_id, attempt):
        """Seconds before dialling ``peer_id`` again after ``attempt`` failed TCP connects."""
        # ClientService counts only TCP connects as attempts; a link that
        # connects but fails TLS or authentication backs off as well.
        delay = self._retry_policy(attempt + self._failed_links.get(peer_id, 0))
        if self._lineage_refusals.get(peer_id):
            delay = max(delay, LINEAGE_RETRY_SECONDS)
        return delay

    # -- service ------------------------------------------------------------

    def startService(self):
        endpoint = _server_endpoint(self._reactor, self._listen_address)
        d = endpoint.listen(_InboundFactory(self))

        def listening(port):
            self._port = port
            log.info("node {node} listening for peers on {address}", node=self.node_id,
                     address=port.getHost())
            self.listening.callback(port)

        def failed(failure):
            # Not logged here: whoever started us reads it from `listening` and says it once
            # (a node: "could not start: Couldn't listen on ...", no traceback).
            self.listening.errback(failure)

        d.addCallbacks(listening, failed)
        for peer_id in sorted(self.peers):
            if f"peer-{peer_id}" not in self.namedServices:
                self._client_service(peer_id).setServiceParent(self)
        super().startService()

    def stopService(self):
        # Links close with close_notify first, so both sides log a clean
        # close, not a lost connection; only then do the dialling services
        # and the port stop, finding nothing left to cut. A link the peer
        # does not finish is cut a ping later, and one made meanwhile goes
        # the same way at the end.
        d = self._close_links()
        d.addBoth(lambda _: service.MultiService.stopService(self))
        d.addBoth(lambda _: self._stop_listening())
        d.addBoth(lambda _: self._close_links())
        return d

    def _close_links(self):
        return gatherResults([protocol.close() for protocol in list(self._connections)])

    def _stop_listening(self):
        if self._port is not None:
            port, self._port = self._port, None
            return port.stopListening()
        return None

    # -- sending, receiving, state -------------------------------------------

    def send(self, to_node_id, frame):
        """Send ``frame`` (non-empty bytes) to a node; False when it was dropped."""
        if not frame:
            raise ValueError("a peer frame is never empty (empty frames are keepalives)")
        if len(frame) > MAX_FRAME_BYTES:
            raise ValueError(f"a peer frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
        for link in (self._outbound.get(to_node_id), self._inbound.get(to_node_id)):
            if link is not None and link.send(frame):
                self.sent += 1
                return True
        self.dropped += 1
        return False

    def connected_peers(self):
        """Node ids with an authenticated outbound link."""
        return set(self._outbound)

    def peer_state(self, node_id):
        """'connected' or 'disconnected', as our outbound link to ``node_id`` is, or
        'refused' while its data may not vote with ours."""
        if node_id in self._refused_data or node_id in self._refusing_us:
            return "refused"
        return "connected" if node_id in self._outbound else "disconnected"

    def peer_builds(self):
        """``{node id: apply version}`` of the peers linked now that said what their build knows."""
        builds = {}
        for protocol in (*self._outbound.values(), *self._inbound.values()):
            if protocol.peer_build is not None and protocol._refused is None:
                builds[protocol.peer_id] = protocol.peer_build
        return builds

    def refusals(self):
        """``{node id: why}`` for the peers refused for their data."""
        return dict(self._refused_data)

    def refused_by(self):
        """``{node id: why}`` for the peers that refuse our data, as they told us."""
        return dict(self._refusing_us)

    def hello(self):
        """The frame that opens our links: our lineage and our data's identity."""
        return HELLO + self.lineage + b"/" + self.identity + (b"/" + REBUILDING if self.rebuilding else b"")

    def _adopt_lineage(self, lineage):
        """Rebuilding on an empty disk: take the cluster's lineage as ours."""
        self.lineage = lineage
        log.info("node {node} takes its peers' lineage: {lineage}", node=self.node_id,
                 lineage=describe(lineage))
        if self.adopt_lineage is not None:
            self.adopt_lineage(lineage)

    def _welcome_rebuilding(self, protocol, identity):
        """Let a rebuilding peer in: remember its identity, and cut its old links."""
        peer = protocol.peer_id
        if not identity or not IDENTITY.fullmatch(identity):
            return "its hello names no data identity we can read"
        old = self.known_identities.get(peer)
        if old != identity:
            self._remember_identity(peer, identity)
            log.info("node {peer} rebuilds on new data (identity {new}, was {old}); links of"
                     " its old data are closed", peer=peer, new=identity[:12].decode("ascii"),
                     old=(old or b"unknown")[:12].decode("ascii", "replace"))
        for other in list(self._connections):
            if (other is not protocol and other.peer_id == peer
                    and other._peer_identity not in (None, identity)):
                other._refused = "its node rebuilds on new data"
                other.transport.abortConnection()
        return None

    def _check_identity(self, peer, identity):
        """None if ``identity`` is the one we knew for ``peer`` (or the first we hear);
        else why it may not vote with us. ``identity`` None: it sent no hello."""
        known = self.known_identities.get(peer)
        if identity is None:
            if known is None:
                return None                    # a node of an earlier build
            return ("it opened a link without saying which data it has, though it did before"
                    " (an earlier build, on data a later one had?)")
        if not identity:
            return None                        # a bare transport (tests, tools)
        if not IDENTITY.fullmatch(identity):
            return "its hello names no data identity we can read"
        if known is None:
            self._remember_identity(peer, identity)
            return None
        if known == identity:
            return None
        return (f"its data is not the data it had (identity {identity[:12].decode('ascii', 'replace')},"
                f" we knew {known[:12].decode('ascii', 'replace')}): a new disk, or a directory"
                " copied in by hand")

    def _remember_identity(self, peer, identity):
        """``peer``'s data is ``identity`` from now on, here and on disk."""
        self.known_identities[peer] = identity
        if self.remember is not None:
            self.remember(dict(self.known_identities))

    def add_state_observer(self, observer):
        """Call ``observer(node_id, direction, connected)`` on each link up or down."""
        self._observers.append(observer)

    def _deliver(self, peer_id, frame):
        self.received += 1
        self.on_message(peer_id, frame)

    def _link_failed(self, protocol):
        if protocol.expected_peer is not None:
            peer = protocol.expected_peer
            self._failed_links[peer] = self._failed_links.get(peer, 0) + 1

    def _refused_by(self, protocol, why):
        peer = protocol.peer_id
        self._refusing_us[peer] = why
        count = self._refusal_counted(protocol, ("by", peer))
        if count:
            log.error(
                "node {peer} refuses our links: {why} ({count} time(s) since the last report)."
                " This node's data may not vote with the others'; restore every node from the"
                " same backup to bring it back (docs/operations.md, Backups), or, if this node's"
                " disk was lost, stop it, move its data directory aside and run paxchat-admin"
                " rebuild",
                peer=peer, why=why, count=count)

    def _refusal_counted(self, protocol, key):
        """Dial that peer rarely; how many refusals to report now (0: not yet)."""
        if protocol.direction == "outbound":
            peer = protocol.peer_id
            self._lineage_refusals[peer] = self._lineage_refusals.get(peer, 0) + 1
        return self._lineage_reports.happened(key)

    def _refuse_data(self, protocol, why):
        peer = protocol.peer_id
        self._refused_data[peer] = why
        count = self._refusal_counted(protocol, peer)
        if count:
            log.error(
                "node {peer}: {why}; its links are refused ({count} time(s) since the last"
                " report). A node restored alone, or one whose data was lost or copied, would"
                " forget votes the others count on; restore every node from the same backup"
                " (docs/operations.md, Backups), or, for a node whose disk was lost, move its"
                " directory aside and run paxchat-admin rebuild", peer=peer, why=why, count=count)

    def _peer_up(self, protocol):
        if protocol.direction == "outbound":
            self._failed_links.pop(protocol.peer_id, None)
        links = self._outbound if protocol.direction == "outbound" else self._inbound
        old = links.get(protocol.peer_id)
        links[protocol.peer_id] = protocol
        if old is not None:
            old.close()
        log.info("peer link {direction} with node {peer} up ({where})",
                 direction=protocol.direction, peer=protocol.peer_id, where=protocol._where())
        self._notify(protocol.peer_id, protocol.direction, True)

    def _peer_down(self, protocol, reason):
        links = self._outbound if protocol.direction == "outbound" else self._inbound
        current = links.get(protocol.peer_id) is protocol
        log.info("peer link {direction} with node {peer} down: {why}",
                 direction=protocol.direction, peer=protocol.peer_id,
                 why=protocol._refused or (reason.getErrorMessage() if current else "replaced"))
        if current:
            del links[protocol.peer_id]
            self._notify(protocol.peer_id, protocol.direction, False)

    def _notify(self, peer_id, direction, up):
        for observer in list(self._observers):
            try:
                observer(peer_id, direction, up)
            except Exception:
                log.failure("peer state observer failed")
