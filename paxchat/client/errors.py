"""The ways a paxchat request can fail, as exceptions a caller can tell apart.

A server's refusal (``ServerError``) carries the protocol's error code so
callers can react to it (``bad_credentials``, ``no_such_user``...); losing the
way to every node (``Unreachable``) is a different kind of failure and must not
look like one.
"""

from __future__ import annotations

__all__ = ["CertificateRefused", "ClientError", "ClosedUnanswered", "ConnectionDropped", "NoMajority",
           "RequestTooLarge", "ServerError", "TimedOut", "Unreachable", "UntrustedNodes"]


class ClientError(Exception):
    """Base of every error the paxchat client library raises."""


class ServerError(ClientError):
    """The server answered ``ok: false``; ``code`` is the protocol error code."""

    def __init__(self, code: str, message: str = ""):
        super().__init__(code, message)
        self.code = code
        self.message = message or code

    def __str__(self):
        return f"{self.code}: {self.message}"


class ConnectionDropped(ClientError):
    """The connection closed before the answer came; the request may or may not have run."""


class Unreachable(ClientError):
    """No node could be reached (or re-reached) before the deadline."""


class NoMajority(Unreachable):
    """Nodes answered, but too few are up to agree on anything (each said ``unavailable``).

    An ``Unreachable`` still, for callers that only tell reachable from
    not, but one that must not send the user to check the servers are
    running: some are, only not a majority.
    """


class ClosedUnanswered(Unreachable):
    """Nodes took the connection but closed it before answering anything.

    What a node speaking TLS does to a client with ``client_tls`` off (it
    sends no TLS record the client could recognise), and a node without
    TLS to one with it on; but also what a node over its
    ``connections_per_address`` does. The client cannot tell these apart,
    so the message names them all instead of sending the user to check
    that a cluster is running that evidently is.
    """


class CertificateRefused(ClientError):
    """TLS verification refused one node's certificate (why one connection ended).

    ``chain``: the certificates the node presented (``cryptography``
    objects, leaf first), so the refusal can be explained against the CA
    the client trusts; ``hostname``: the certificate was signed by that CA
    but is not made for the address connected to. ``detail`` is what TLS said.
    """

    def __init__(self, detail: str, chain=(), hostname: bool = False):
        super().__init__(detail)
        self.detail = detail
        self.chain = tuple(chain)
        self.hostname = hostname


class UntrustedNodes(Unreachable):
    """Nodes were reached, but TLS refused their certificates, and no node could be used.

    A wrong ``ca.pem`` on the client (copied from elsewhere, or left over
    from before the cluster's certificates were remade) looks so to every
    node at once; retrying cannot mend it, so the client gives up on it
    after one round over the nodes instead of waiting out its deadline.
    ``refusals``: (where, problem, detail) per node, e.g. ("node 1
    (127.0.0.1:7101)", "certificate not signed by the CA in certs/ca.pem",
    "issued by ...").
    """

    def __init__(self, refusals, advice: str = ""):
        self.refusals = tuple(refusals)
        self.advice = advice
        super().__init__(self.summary())

    def summary(self) -> str:
        """Which nodes, and what is wrong with their certificates, nodes with the same fault together."""
        groups: dict = {}
        for where, problem, detail in self.refusals:
            groups.setdefault((problem, detail), []).append(where)
        parts = []
        for (problem, detail), places in groups.items():
            names = places[0] if len(places) == 1 else ", ".join(places[:-1]) + " and " + places[-1]
            parts.append(f"{names}: {problem}" + (f" ({detail})" if detail else ""))
        return "; ".join(parts)

    @property
    def problem(self) -> str:
        """The first node's fault alone, short enough for a status bar."""
        return self.refusals[0][1] if self.refusals else "certificate refused"


class RequestTooLarge(ClientError):
    """A request line over the server's frame limit: refused before sending, never retried.

    The server would answer ``frame_too_large`` and close the connection, so
    sending it could only fail (and, resent after the close, fail forever).
    """

    def __init__(self, op: str, size: int, limit: int):
        super().__init__(op, size, limit)
        self.op = op
        self.size = size
        self.limit = limit

    def __str__(self):
        if self.op == "send_message":
            return (f"That message is too large to send: {self.size:,} bytes once encoded, at most"
                    f" {self.limit:,} (emoji and many other characters take 4 bytes each).")
        return f"That request is too large to send: {self.size:,} bytes once encoded, at most {self.limit:,}."


class TimedOut(ClientError):
    """No final answer within the policy's ``call_timeout``; a write may or may not have been applied.

    ``change``: the call would have changed something (a message sent, read,
    deleted...), so the sentence says it may have been made; a read says
    only that no answer came.
    """

    def __init__(self, seconds: float, change: bool = True):
        super().__init__(seconds)
        self.seconds = seconds
        self.change = change

    def __str__(self):
        sentence = f"The cluster gave no answer within {self.seconds:g} seconds (too few servers may be up)"
        return sentence + ("; the change may or may not have been made." if self.change else ".")
