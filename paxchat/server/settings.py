"""What the client server can be tuned with, in one frozen object.

The server never reads cluster.ini itself: ``ServerSettings.from_config``
takes what it needs from a ``ClusterConfig`` and the rest keeps the defaults
documented in docs/protocol.md.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RateLimit:
    """A token bucket: ``burst`` requests at once, refilled at ``rate`` per second."""

    rate: float
    burst: float


def _writes(rate):
    """A write limit of ``rate`` per second that lets 2.5 s worth through at once."""
    return RateLimit(rate=rate, burst=2.5 * rate)


def _connections(rate):
    """New connections from one address: ``rate`` per second, 10 s worth at once
    (a group behind one NAT address reconnecting together after a failover)."""
    return RateLimit(rate=rate, burst=10 * rate)


@dataclass(frozen=True)
class ServerSettings:
    node_id: int
    # What ``hello`` lists: ({"id": int, "client": "host:port"}, ...), by id.
    nodes: tuple = ()
    bcrypt_cost: int = 12
    # A session made by ``login`` lasts this many seconds unless it ends sooner.
    session_ttl: float = 7 * 24 * 3600.0
    # Password checks and hashes (login, resume, create_account, delete_account).
    login_per_connection: RateLimit = field(default_factory=lambda: RateLimit(rate=1.0, burst=10))
    login_per_account: RateLimit = field(default_factory=lambda: RateLimit(rate=0.2, burst=10))
    # Replicated writes by a logged-in user.
    writes_per_connection: RateLimit = field(default_factory=lambda: RateLimit(rate=200.0, burst=500))
    writes_per_account: RateLimit = field(default_factory=lambda: RateLimit(rate=400.0, burst=1000))
    # Requests one connection may have unanswered; past it the server stops reading.
    max_pending_per_connection: int = 64
    # What the answers to one connection's unanswered requests may weigh,
    # each counted at the most it could: past it the server stops reading
    # until answers go out. A history or read_messages answer counts ~1 MiB,
    # so two fit; one request is always read, however big its answer may be.
    max_answer_bytes_in_flight: int = 2 << 20
    # Bytes of events a connection whose output is full may owe for a while:
    # past it, the client must catch up within output_stall_seconds or be
    # dropped (a burst of big events fills a reading client's buffer too).
    max_output_backlog: int = 1 << 20
    output_stall_seconds: float = 10.0
    # Past this a connection is dropped at once, however briefly behind.
    max_output_burst: int = 16 << 20
    # What all the node's connections may owe together: past it, any
    # connection over max_output_backlog is dropped at once.
    max_output_debt: int = 256 << 20
    # Client connections the node holds at once (cluster.ini ``max_clients``).
    max_clients: int = 10000
    # New client connections accepted from one IP address (cluster.ini
    # ``connections_per_address``); past it they are closed before any TLS.
    connections_per_address: RateLimit = field(default_factory=lambda: _connections(20.0))

    @classmethod
    def from_config(cls, config, node_id, **overrides):
        """Settings for node ``node_id`` of a ``paxchat.config.ClusterConfig``."""
        nodes = tuple(
            {"id": nid, "client": str(node.client)} for nid, node in sorted(config.nodes.items())
        )
        return cls(
            node_id=node_id,
            nodes=nodes,
            bcrypt_cost=config.bcrypt_cost,
            session_ttl=config.session_ttl,
            writes_per_connection=_writes(config.writes_per_connection),
            writes_per_account=_writes(config.writes_per_account),
            max_clients=config.max_clients,
            connections_per_address=_connections(config.connections_per_address),
            **overrides,
        )
