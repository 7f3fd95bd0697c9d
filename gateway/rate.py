"""The message rate limit of one connection: a token bucket, without I/O or timers.

The bucket holds at most ``burst`` tokens and starts full; it gains ``rate`` tokens a
second, computed from the time passed when a message comes (no task, no timer: an idle
connection costs two floats). Each message the client sends takes one token; a message
that finds less than one token is over the limit, and the gateway closes the connection
with 1008. The caller passes the time (the event loop's clock), so tests drive the bucket
with no sleeps.

The gateway reads one message at a time (window 1), so the time a message is taken is
when the gateway reads it, not when it arrived: a client the workers are slow to serve is
held back by that window already, and spends its tokens no faster than it is served.
"""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` held; :meth:`take` one per message.

    ``now`` is any monotonic clock in seconds, the same for every call.
    """

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if not rate > 0 or not burst >= 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, got {rate}, {burst}")
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def take(self, now: float) -> bool:
        """Take a token for a message at ``now``: True if there was one, False if the
        message is over the limit (then nothing is taken)."""
        tokens = self.tokens + (now - self.updated) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self.updated = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False
