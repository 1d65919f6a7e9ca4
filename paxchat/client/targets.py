"""Where the nodes are: (node id, endpoint) pairs built from cluster.ini or addresses.

The client library takes endpoints rather than host names so that tests can
hand it in-memory ones and TLS is decided once, here, from the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from twisted.internet.endpoints import TCP4ClientEndpoint, HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint

__all__ = ["NodeTarget", "targets_from_addresses", "targets_from_config"]


@dataclass(frozen=True)
class NodeTarget:
    """One node the client may connect to.

    ``ca``: the ``paxchat.tls.ClientCA`` its certificate is checked
    against, when known, to say why TLS refused it.
    """

    node_id: int
    endpoint: IStreamClientEndpoint
    label: str
    ca: object = None


def _tcp_endpoint(reactor, host: str, port: int, timeout: float):
    if host.replace(".", "").isdigit():
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


def targets_from_addresses(reactor, addresses: Mapping[int, tuple[str, int]] | Iterable[tuple[str, int]],
                           tls: Callable[[str], object] | None = None,
                           timeout: float = 5.0, ca_path=None) -> list[NodeTarget]:
    """Targets for ``{node_id: (host, port)}`` (or a list, numbered from 1).

    ``tls(host)``, when given, returns the client TLS connection creator for
    that host (e.g. ``lambda h: optionsForClientTLS(h, trustRoot=ca)``);
    else ``ca_path``, the cluster CA every node's certificate is checked
    against (read here, and again by the client when it starts a campaign
    and the file changed: ``ClientCA.reload``).
    """
    ca = None
    if tls is None and ca_path is not None:
        from paxchat import tls as cluster_tls
        ca = cluster_tls.read_client_ca(ca_path)
        tls = ca.options
    if not isinstance(addresses, Mapping):
        addresses = {i: a for i, a in enumerate(addresses, 1)}
    targets = []
    for node_id, address in addresses.items():
        host, port = (address.host, address.port) if hasattr(address, "host") else address
        endpoint = _tcp_endpoint(reactor, host, int(port), timeout)
        if tls is not None:
            endpoint = wrapClientTLS(tls(host), endpoint)
        label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        targets.append(NodeTarget(int(node_id), endpoint, label, ca))
    return targets


def targets_from_config(reactor, config, timeout: float = 5.0) -> list[NodeTarget]:
    """Every node's client address from a ``ClusterConfig``, over TLS if ``client_tls`` is on."""
    return targets_from_addresses(
        reactor, {node_id: node.client for node_id, node in config.nodes.items()}, timeout=timeout,
        ca_path=config.ca_path if config.client_tls else None)
