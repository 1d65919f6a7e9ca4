"""Helpers for the operations tests: a cluster.ini with metrics and admin ports, HTTP GETs."""

import json
import warnings

from twisted.internet import defer, endpoints
from twisted.protocols.basic import LineReceiver
from twisted.web.client import Agent, readBody

from paxchat import config as configmod
from paxchat import tls
from paxchat.devcluster import free_ports, write_local_config


def reactor_():
    from twisted.internet import reactor
    return reactor


def ports_unused_by(text, count):
    """``count`` ports free now and named nowhere in the cluster.ini ``text``: a
    port of the file whose node is stopped, or not started yet, is free too."""
    import re
    taken = {int(p) for p in re.findall(r"^\w+ = [^\n]*:(\d+)$", text, flags=re.M)}
    return [p for p in free_ports(count + len(taken)) if p not in taken][:count]


def write_ops_config(directory, nodes=1, keys=("metrics",), **cluster):
    """write_local_config, plus ``metrics`` (and ``admin``...) = 127.0.0.1:<free port> per node."""
    return configmod.load(write_local_config(directory, nodes=nodes, node_keys=keys, **cluster))


@defer.inlineCallbacks
def http_get(url, timeout=10):
    """(status code, body bytes, headers) of a plain HTTP GET."""
    agent = Agent(reactor_(), connectTimeout=timeout)
    response = yield agent.request(b"GET", url.encode("ascii")).addTimeout(timeout, reactor_())
    with warnings.catch_warnings():
        # Twisted warns when a response's transport lacks abortConnection; it is harmless here.
        warnings.simplefilter("ignore", DeprecationWarning)
        reading = readBody(response)
    body = yield reading
    return response.code, body, response.headers


class JSONLines(LineReceiver):
    """A bare protocol client: request(op, **args) -> Deferred[response]."""

    delimiter = b"\n"

    def __init__(self):
        self.waiting = {}
        self.next_id = 0

    def lineReceived(self, line):
        message = json.loads(line)
        d = self.waiting.pop(message.get("id"), None)
        if d is not None:
            d.callback(message)

    def request(self, op, **args):
        self.next_id += 1
        d = self.waiting[self.next_id] = defer.Deferred()
        self.sendLine(json.dumps({"id": self.next_id, "op": op, **args}).encode())
        return d.addTimeout(20, reactor_())


def connect(cfg, node_id):
    """A JSONLines client connected to the node's client address (TLS if the cluster uses it)."""
    address = cfg.node(node_id).client
    endpoint = endpoints.TCP4ClientEndpoint(reactor_(), address.host, address.port, timeout=5)
    if cfg.client_tls:
        endpoint = endpoints.wrapClientTLS(
            tls.client_connection_options(cfg, address.host), endpoint)
    return endpoints.connectProtocol(endpoint, JSONLines())
