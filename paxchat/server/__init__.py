"""The client-facing server: JSON lines over TCP or TLS (docs/protocol.md)."""

from .factory import ChatServerFactory
from .protocol import ChatProtocol
from .settings import RateLimit, ServerSettings

__all__ = ["ChatProtocol", "ChatServerFactory", "RateLimit", "ServerSettings"]
