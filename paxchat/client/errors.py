"""The ways a paxchat request can fail, as exceptions a caller can tell apart.

A server's refusal (``ServerError``) carries the protocol's error code so
callers can react to it (``bad_credentials``, ``no_such_user``...); losing the
way to every node (``Unreachable``) is a different kind of failure and must not
look like one.
"""

from __future__ import annotations

__all__ = ["ClientError", "ConnectionDropped", "ServerError", "Unreachable"]


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
