"""The seams between paxchat's layers, as zope interfaces.

The client server only ever talks to an ``ICommandLog``: one node's local
log in development, the Multi-Paxos replica in a cluster.
"""

from zope.interface import Attribute, Interface


class Unavailable(Exception):
    """No quorum could commit the command in time (protocol code ``unavailable``)."""


class ICommandLog(Interface):
    """An ordered, durable log of commands applied to the chat state."""

    node_id = Attribute("This node's id (int).")

    def submit(command):
        """Commit ``command`` and apply it.

        @return: a Deferred firing with the protocol response dict once the
            command is applied on this node, or failing with L{Unavailable}.
        """

    def read_barrier():
        """A Deferred firing when local state reflects every write acknowledged before the call."""

    def add_observer(observer):
        """Call ``observer(command, response)`` for each command applied here, in log order."""

    def add_leader_observer(observer):
        """Call ``observer(leader)`` on the reactor thread each time ``leader_id()`` changes."""

    def leader_id():
        """The id of the node believed to lead, or None."""
