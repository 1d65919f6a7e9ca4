"""When to try which node: the client's reconnection policy, with no I/O.

After a connection drops the client tries the other nodes in turn, starting
with the one after the node it lost, so a dead node is not hammered first.
Each full round that fails waits a little longer (exponential backoff with a
cap and some jitter, so many clients do not stampede a recovering cluster),
and after ``deadline`` seconds without a node the client gives up. Kept apart
from the sockets so the policy is tested by itself.

A rotation also keeps how each attempt of the current round ended
(``failed``), so that once a round is over (``round_over``) the client can
tell "every node refused the connection" (a stopped cluster: say so, and go
on waiting) from "every node presented a certificate TLS refused" (a wrong
ca.pem: waiting cannot mend it).
"""

from __future__ import annotations

import random as _random
from dataclasses import dataclass
from typing import Callable, Sequence

__all__ = ["Attempt", "FailoverPolicy", "Rotation"]

# How an attempt on a node ended, for the round's verdict.
NOT_ACCEPTED = "not_accepted"   # no connection: refused, no route, no answer to connect
UNTRUSTED = "untrusted"         # connected, but TLS refused the node's certificate
ANSWERED = "answered"           # connected; lost, left or unusable after that


@dataclass(frozen=True)
class FailoverPolicy:
    """Timing knobs of failover (seconds)."""

    initial_delay: float = 0.2     # pause after the first failed round
    max_delay: float = 3.0         # the longest pause between rounds
    factor: float = 2.0            # growth of the pause per failed round
    jitter: float = 0.2            # +- this fraction of each pause, at random
    deadline: float = 60.0         # give up after this long without any node
    connect_timeout: float = 5.0   # one TCP/TLS connection attempt
    answer_timeout: float = 20.0   # a node silent this long on a request is treated as dead
    unavailable_window: float = 30.0  # keep retrying `unavailable` answers this long
    unavailable_delay: float = 0.5    # pause before retrying an `unavailable` answer
    call_timeout: float | None = None  # a call with no final answer this long after it was made fails


@dataclass(frozen=True)
class Attempt:
    """How one attempt of a round ended: ``kind`` (NOT_ACCEPTED, UNTRUSTED,
    ANSWERED) and ``why``, a few words for the user."""

    node_id: int
    kind: str
    why: str = ""


class Rotation:
    """One reconnection campaign: yields (node_id, delay) until the deadline passes."""

    def __init__(self, node_ids: Sequence[int], policy: FailoverPolicy, now: float,
                 first: int | None = None, after: int | None = None,
                 random: Callable[[], float] = _random.random):
        if not node_ids:
            raise ValueError("no nodes to connect to")
        ids = list(node_ids)
        if first is not None and first in ids:
            start = ids.index(first)
        elif after is not None and after in ids and len(ids) > 1:
            # Start at a random other node, so the clients of a lost node
            # spread over the rest instead of all landing on its neighbour;
            # the lost node is tried last.
            others = [i for i in ids if i != after]
            start = ids.index(others[min(int(random() * len(others)), len(others) - 1)])
        else:
            # No node chosen: start at a random one, so that the users of a
            # cluster (who share one cluster.ini) spread their connections,
            # and their logins' bcrypt work, over every node instead of all
            # landing on the first one listed.
            start = min(int(random() * len(ids)), len(ids) - 1)
        order = ids[start:] + ids[:start]
        if after is not None and after in order and first is None:
            order.remove(after)
            order.append(after)
        self.order = order
        self.policy = policy
        self.started = now
        self._random = random
        self._attempts = 0
        self._delay = policy.initial_delay
        self.outcomes: dict[int, Attempt] = {}   # this round's, by node

    def failed(self, attempt: Attempt):
        """The attempt just made ended so (the round's verdicts read these)."""
        self.outcomes[attempt.node_id] = attempt

    def round_over(self) -> list[Attempt] | None:
        """Every node's attempt in the round just ended, in order; None in mid-round."""
        if self._attempts == 0 or self._attempts % len(self.order):
            return None
        if any(node not in self.outcomes for node in self.order):
            return None
        return [self.outcomes[node] for node in self.order]

    def expired(self, now: float) -> bool:
        """True once the deadline for finding a node has passed."""
        return now - self.started >= self.policy.deadline

    def next_attempt(self, now: float) -> tuple[int, float] | None:
        """The next node to try and how long to wait before; None past the deadline."""
        if self.expired(now):
            return None
        index = self._attempts % len(self.order)
        delay = 0.0
        if index == 0:
            self.outcomes = {}                   # a new round
        if self._attempts and index == 0:
            delay = self._delay
            self._delay = min(self._delay * self.policy.factor, self.policy.max_delay)
            if self.policy.jitter:
                delay *= 1 + self.policy.jitter * (2 * self._random() - 1)
            # Never sleep past the deadline; the attempt after it reports failure.
            delay = max(0.0, min(delay, self.started + self.policy.deadline - now))
        self._attempts += 1
        return self.order[index], delay
