"""The paxchat client: a Twisted library with failover, the ``paxchat`` CLI and the Tk app.

``from paxchat.client import PaxchatClient, ServerError`` is all most programs need.
"""

from .api import PaxchatClient, Status
from .errors import ClientError, ClosedUnanswered, ConnectionDropped, NoMajority, ServerError, Unreachable
from .failover import FailoverPolicy

__all__ = ["ClientError", "ClosedUnanswered", "ConnectionDropped", "FailoverPolicy", "NoMajority",
           "PaxchatClient", "ServerError", "Status", "Unreachable"]
