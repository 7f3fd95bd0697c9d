"""Connections per client IP address: a count per address and a bound on it. No I/O.

A slot is held from the moment a connection's client is known (its TCP accept, or the
PROXY header, or the upgrade request when X-Forwarded-For names it) until the connection
closes, so both open WebSockets and connections still in their handshake count.
"""

from __future__ import annotations


class IpConnectionLimit:
    """At most ``limit`` slots per address; ``limit`` 0 turns the bound (and the count) off.

    :meth:`acquire` and :meth:`release` must pair up: the caller releases exactly the
    slots it acquired.
    """

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self.limit = limit
        self._held: dict[str, int] = {}

    def acquire(self, ip: str) -> bool:
        """Take a slot for ``ip``; False (nothing taken) when it holds ``limit`` already."""
        if not self.limit:
            return True
        held = self._held.get(ip, 0)
        if held >= self.limit:
            return False
        self._held[ip] = held + 1
        return True

    def release(self, ip: str) -> None:
        """Give back one slot of ``ip``."""
        if not self.limit:
            return
        held = self._held.get(ip, 0)
        if held <= 1:
            # Forgotten at zero: the map holds only addresses with connections open.
            self._held.pop(ip, None)
        else:
            self._held[ip] = held - 1

    def held(self, ip: str) -> int:
        """Slots ``ip`` holds now."""
        return self._held.get(ip, 0)

    def __len__(self) -> int:
        """Addresses holding at least one slot."""
        return len(self._held)
