"""The node's HTTP listeners: ``/metrics`` and the admin API's site.

A module of its own so that a node serving neither (no ``metrics`` or
``admin`` address) never imports twisted.web: that and what it pulls in
are ~30 ms of every node's start-up, which a restarted node spends before
it can catch up.
"""

from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.web import resource, server

__all__ = ["MetricsResource", "listen_http"]


class MetricsResource(resource.Resource):
    """``GET /metrics``: Prometheus text format, rendered on the reactor thread."""

    isLeaf = True

    def __init__(self, metrics):
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request):
        if request.path not in (b"/metrics", b"/metrics/"):
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"not found: metrics are at /metrics\n"
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self._metrics.exposition()


class _QuietSite(server.Site):
    """A Site that logs neither its start nor every request (scrapes come every few seconds)."""

    noisy = False

    def log(self, request):
        pass


def listen_http(reactor, address, root, context_factory=None):
    """Listen at once (raising CannotListenError) on ``address`` with a quiet Site over ``root``."""
    site = _QuietSite(root)
    site.displayTracebacks = False
    if context_factory is not None:
        return reactor.listenSSL(address.port, site, context_factory, interface=address.host)
    return reactor.listenTCP(address.port, site, interface=address.host)
