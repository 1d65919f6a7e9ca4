"""paxchat: a chat service whose every write is a command in a Multi-Paxos log."""

__version__ = "0.1.0"
