"""Token buckets on the reactor's clock, alone and keyed by account or address.

A bucket holds up to ``burst`` tokens and gains ``rate`` per second; each
allowed request takes one. Time comes from ``clock.seconds()`` so tests
drive it with ``task.Clock``.
"""

from collections import OrderedDict


class TokenBucket:
    __slots__ = ("_clock", "_rate", "_burst", "_tokens", "_stamp")  # one or two per connection

    def __init__(self, clock, limit):
        self._clock = clock
        self._rate = limit.rate
        self._burst = limit.burst
        self._tokens = float(limit.burst)
        self._stamp = clock.seconds()

    def _refill(self):
        now = self._clock.seconds()
        elapsed = max(0.0, now - self._stamp)
        self._stamp = now
        self._tokens = min(self._burst, self._tokens + elapsed * self._rate)

    def allow(self):
        """Take a token if there is one; False means the caller is over its limit."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def full(self):
        self._refill()
        return self._tokens >= self._burst


class KeyedRateLimiter:
    """One bucket per key (an account name, an IP address), with bounded memory.

    A full bucket is the same as no bucket, so full ones are forgotten when
    the table grows past ``max_keys``; if it is still too large, the least
    recently used buckets go (an attacker spraying names then gets fresh
    buckets: we trade exactness for memory under that attack).
    """

    def __init__(self, clock, limit, max_keys=100_000):
        self._clock = clock
        self._limit = limit
        self._max_keys = max_keys
        self._buckets = OrderedDict()

    def allow(self, key):
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self._clock, self._limit)
            if len(self._buckets) > self._max_keys:
                self._shrink()
        else:
            self._buckets.move_to_end(key)
        return bucket.allow()

    def _shrink(self):
        for key in [k for k, b in self._buckets.items() if b.full()]:
            del self._buckets[key]
        # Leave room so the next new keys do not each pay for a full scan.
        target = int(self._max_keys * 0.9)
        while len(self._buckets) > target:
            self._buckets.popitem(last=False)

    def __len__(self):
        return len(self._buckets)
