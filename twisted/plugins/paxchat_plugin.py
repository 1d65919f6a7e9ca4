"""twistd's entry for paxchat: ``twistd -n paxchat --config cluster.ini --node N``.

Lazy on purpose: twistd imports every plugin to list them, so this file
names paxchat.tap without importing it (or Twisted's reactor, or the node).
"""

from twisted.application.service import ServiceMaker

paxchat = ServiceMaker(
    "paxchat",
    "paxchat.tap",
    "A paxchat node: chat replicated by Multi-Paxos across the cluster of cluster.ini",
    "paxchat",
)
