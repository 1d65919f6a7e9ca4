"""cluster.ini -> frozen config objects.

Every node, tool and test reads the cluster from one ini file; a mistake in
it must stop a node before it starts, with one line that names the file,
section and key at fault rather than a traceback.
"""

from __future__ import annotations

import configparser
import ipaddress
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

__all__ = ["Address", "ClusterConfig", "ConfigError", "NodeConfig", "load", "loads",
           "what_a_reload_cannot_take"]


class ConfigError(Exception):
    """A mistake in cluster.ini; ``str()`` is one line naming file, section and key."""

    def __init__(self, path, message, section=None, key=None):
        self.path = str(path)
        self.section = section
        self.key = key
        self.message = message
        super().__init__(str(self))

    def __str__(self):
        where = self.path
        if self.section is not None:
            where += f": [{self.section}]"
        if self.key is not None:
            where += f" {self.key}"
        return f"{where}: {self.message}"


@dataclass(frozen=True, order=True)
class Address:
    """A host and TCP port; ``str()`` gives ``host:port`` (IPv6 hosts in brackets)."""

    host: str
    port: int

    def __str__(self):
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class NodeConfig:
    """One ``[node.N]`` section."""

    id: int
    client: Address
    peer: Address
    metrics: Address | None = None
    admin: Address | None = None


@dataclass(frozen=True)
class ClusterConfig:
    """The whole cluster as one node, tool or test sees it."""

    path: Path
    data_dir: Path
    tls_dir: Path
    nodes: Mapping[int, NodeConfig]
    client_tls: bool = True
    heartbeat_interval: float = 0.05
    election_timeout_min: float = 0.3
    election_timeout_max: float = 0.6
    max_clock_drift: float = 0.05
    request_timeout: float = 5.0
    snapshot_interval: int = 10000
    bcrypt_cost: int = 12
    session_ttl: float = 7 * 24 * 3600.0
    # Replicated writes a client may make per second, per connection and per
    # account (bursts of 2.5 s worth pass): a guard against runaway clients.
    writes_per_connection: float = 200.0
    writes_per_account: float = 400.0
    # Client connections a node holds at once, logged in or not; past it a new
    # one is told to go elsewhere (node_stopping, reason "full") and closed.
    max_clients: int = 10000
    # New client connections a node accepts per second from one IP address
    # (bursts of 10 s worth pass); past it they are closed at once, before
    # the TLS handshake: a client reconnecting in a loop cannot take a core.
    connections_per_address: float = 20.0
    source_name: str = field(default="", repr=False)

    def node(self, node_id, asked_as=None) -> NodeConfig:
        """The node with this id, or a ConfigError naming the known ids and where the id
        was given (``asked_as``, default ``--node N``)."""
        try:
            return self.nodes[node_id]
        except (KeyError, TypeError):
            known = ", ".join(str(n) for n in self.nodes)
            raise ConfigError(
                self.source_name or self.path,
                f"no [node.{node_id}] section for {asked_as or f'--node {node_id}'}"
                f" (nodes are {known})",
            ) from None

    def peers_of(self, node_id) -> list[NodeConfig]:
        """Every other node, by id."""
        self.node(node_id)
        return [n for i, n in self.nodes.items() if i != node_id]

    @property
    def lease_duration(self) -> float:
        """How long a leader may serve reads on its own after a quorum heard it.

        Derived, as the Paxos core does: it must end before any follower's
        election timer can, even with clocks running ``max_clock_drift`` apart.
        """
        d = self.max_clock_drift
        return self.election_timeout_min * (1 - d) / (1 + d) - self.heartbeat_interval

    @property
    def quorum(self) -> int:
        """The size of a majority of the nodes."""
        return len(self.nodes) // 2 + 1

    @property
    def ca_path(self) -> Path:
        return self.tls_dir / "ca.pem"

    @property
    def ca_key_path(self) -> Path:
        return self.tls_dir / "ca.key"

    def node_cert_path(self, node_id) -> Path:
        return self.tls_dir / f"node-{self.node(node_id).id}.pem"

    def node_key_path(self, node_id) -> Path:
        return self.tls_dir / f"node-{self.node(node_id).id}.key"

    def node_data_dir(self, node_id) -> Path:
        return self.data_dir / f"node-{self.node(node_id).id}"


def what_a_reload_cannot_take(old: ClusterConfig, new: ClusterConfig, node_id: int) -> str | None:
    """Why node ``node_id``, running with ``old``, cannot take ``new`` without a
    restart; None when only other nodes' addresses differ (a node moved to
    another machine), which a running node takes on SIGHUP."""
    if set(new.nodes) != set(old.nodes):
        return (f"it lists other node ids ({', '.join(map(str, sorted(new.nodes)))}, not"
                f" {', '.join(map(str, sorted(old.nodes)))})")
    if new.nodes[node_id] != old.nodes[node_id]:
        return f"the addresses of this node, node {node_id}, changed"
    same = replace(new, nodes=old.nodes, source_name=old.source_name)
    changed = [f.name for f in fields(ClusterConfig) if getattr(same, f.name) != getattr(old, f.name)]
    if changed:
        return "[cluster] " + ", ".join(changed) + (" changes" if len(changed) > 1 else " changed")
    return None


# -- parsing ---------------------------------------------------------------

_NODE_SECTION = re.compile(r"node\.([0-9]+)\Z")
_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?\Z")
_NODE_KEYS = ("client", "peer", "metrics", "admin")

# key -> (parser, default); the defaults are ClusterConfig's own.
_FIELDS = ClusterConfig.__dataclass_fields__


def _number(kind, low=None, high=None, low_open=False):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a valid {'integer' if kind is int else 'number'}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{text!r} is not a finite number")
        if low is not None and (value <= low if low_open else value < low):
            raise ValueError(f"{text!r} must be {'above' if low_open else 'at least'} {low}")
        if high is not None and value > high:
            raise ValueError(f"{text!r} must be at most {high}")
        return value
    return parse


def _boolean(text):
    try:
        return {"1": True, "yes": True, "true": True, "on": True,
                "0": False, "no": False, "false": False, "off": False}[text.lower()]
    except KeyError:
        raise ValueError(f"{text!r} is not a valid boolean (use on/off, yes/no, true/false)") from None


_CLUSTER_KEYS = {
    "data_dir": None,
    "tls_dir": None,
    "client_tls": _boolean,
    "heartbeat_interval": _number(float, 0, low_open=True),
    "election_timeout_min": _number(float, 0, low_open=True),
    "election_timeout_max": _number(float, 0, low_open=True),
    "max_clock_drift": _number(float, 0, 0.5),
    "request_timeout": _number(float, 0, low_open=True),
    "snapshot_interval": _number(int, 1),
    "bcrypt_cost": _number(int, 4, 31),
    "session_ttl": _number(float, 0, low_open=True),
    "writes_per_connection": _number(float, 0, low_open=True),
    "writes_per_account": _number(float, 0, low_open=True),
    "max_clients": _number(int, 1),
    "connections_per_address": _number(float, 0, low_open=True),
}


def parse_address(text) -> Address:
    """``host:port`` or ``[v6]:port`` -> Address; ValueError if it is not one."""
    bad = ValueError(f"{text!r} is not a valid host:port")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise bad
    if host.startswith("["):
        if not host.endswith("]"):
            raise bad
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad from None
    elif ":" in host:
        raise bad
    else:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if host.replace(".", "").isdigit() or not _HOST_NAME.match(host):
                raise bad from None
    port = int(port)
    if not 1 <= port <= 65535:
        raise bad
    return Address(host, port)


def load(path) -> ClusterConfig:
    """Read and check a cluster.ini; every mistake is a one-line ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, "no such file") from None
    except IsADirectoryError:
        raise ConfigError(path, "is a directory, not a cluster.ini file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(path, f"cannot read it: {getattr(e, 'strerror', None) or e}") from None
    return loads(text, path)


def loads(text, path="cluster.ini") -> ClusterConfig:
    """Parse cluster.ini text; relative paths resolve against ``path``'s directory."""
    path = Path(path)
    name = str(path)
    parser = configparser.ConfigParser(interpolation=None, strict=True, empty_lines_in_values=False,
                                       inline_comment_prefixes=(";", "#"))
    try:
        parser.read_string(text, source=name)
    except configparser.DuplicateSectionError as e:
        raise ConfigError(name, f"section appears twice (line {e.lineno})", e.section) from None
    except configparser.DuplicateOptionError as e:
        raise ConfigError(name, f"set twice (line {e.lineno})", e.section, e.option) from None
    except configparser.MissingSectionHeaderError as e:
        raise ConfigError(name, f"line {e.lineno}: text before the first [section]: {e.line.strip()!r}") from None
    except configparser.ParsingError as e:
        lineno, line = e.errors[0]
        raise ConfigError(name, f"line {lineno}: cannot parse {line.strip()!r}") from None
    except configparser.Error as e:
        raise ConfigError(name, " ".join(str(e).split())) from None

    base = path.resolve().parent
    if not parser.has_section("cluster"):
        raise ConfigError(name, "missing section", "cluster")

    values = {}
    cluster = parser["cluster"]
    for key, raw in cluster.items():
        if key not in _CLUSTER_KEYS:
            raise ConfigError(name, f"unknown key (known keys: {', '.join(_CLUSTER_KEYS)})", "cluster", key)
        raw = raw.strip()
        if key in ("data_dir", "tls_dir"):
            if not raw:
                raise ConfigError(name, "must name a directory", "cluster", key)
            values[key] = base / Path(raw).expanduser()
            continue
        try:
            values[key] = _CLUSTER_KEYS[key](raw)
        except ValueError as e:
            raise ConfigError(name, str(e), "cluster", key) from None
    values.setdefault("data_dir", base / "data")
    values.setdefault("tls_dir", base / "certs")

    def get(key):
        return values.get(key, _FIELDS[key].default)

    if get("election_timeout_min") > get("election_timeout_max"):
        raise ConfigError(name, f"{get('election_timeout_min')} is above election_timeout_max "
                          f"{get('election_timeout_max')}", "cluster", "election_timeout_min")
    drift = get("max_clock_drift")
    lease = get("election_timeout_min") * (1 - drift) / (1 + drift) - get("heartbeat_interval")
    if lease <= 0:
        raise ConfigError(name, f"{get('heartbeat_interval')} leaves no leader lease: it must be "
                          f"below election_timeout_min * (1 - max_clock_drift) / (1 + max_clock_drift) "
                          f"= {get('election_timeout_min') * (1 - drift) / (1 + drift):g}",
                          "cluster", "heartbeat_interval")

    nodes = {}
    seen = {}
    for section in parser.sections():
        if section == "cluster":
            continue
        match = _NODE_SECTION.match(section)
        if not match or int(match.group(1)) < 1:
            raise ConfigError(name, "unknown section (expected [cluster] or [node.N] with N >= 1)", section)
        node_id = int(match.group(1))
        if node_id in nodes:
            raise ConfigError(name, f"node {node_id} appears twice", section)
        addresses = {}
        for key, raw in parser[section].items():
            if key not in _NODE_KEYS:
                raise ConfigError(name, f"unknown key (known keys: {', '.join(_NODE_KEYS)})", section, key)
            try:
                address = parse_address(raw.strip())
            except ValueError as e:
                raise ConfigError(name, str(e), section, key) from None
            other = seen.get((address.host, address.port))
            if other is not None:
                raise ConfigError(name, f"{str(address)!r} is already used by [{other[0]}] {other[1]}",
                                  section, key)
            seen[(address.host, address.port)] = (section, key)
            addresses[key] = address
        for key in ("client", "peer"):
            if key not in addresses:
                raise ConfigError(name, "missing key", section, key)
        nodes[node_id] = NodeConfig(node_id, addresses["client"], addresses["peer"],
                                    addresses.get("metrics"), addresses.get("admin"))
    if not nodes:
        raise ConfigError(name, "no [node.N] sections: a cluster needs at least one node")

    return ClusterConfig(
        path=path.resolve(),
        nodes=MappingProxyType(dict(sorted(nodes.items()))),
        source_name=name,
        **values,
    )
