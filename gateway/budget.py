"""The gateway's outbound memory budget, and whom it sheds when the budget is exceeded.

Each connection's :class:`~wsgate.gateway.outbox.Outbox` bounds what is queued for that client
(``max_outbound_bytes``). That alone lets 10,000 connections queue 40 GiB; the budget
bounds their sum (``outbound_budget_bytes``). Outboxes add to and subtract from
:attr:`OutboundBudget.total` as frames are queued and written: an integer addition per
frame, no task, no scan.

When queuing a frame takes the total past the limit, the gateway sheds at once, before
anything else runs: :func:`choose_victims` picks the connections with the most bytes
queued (they are the furthest behind, and closing them frees the most memory for the
fewest clients), and each is closed with 1013 "try again later", its queue dropped, so
the total is back within the limit before the next frame is queued. Memory queued for
clients thus never passes the budget by more than one frame.

A shed connection still holds memory until its socket is gone: what was handed to the
socket already (aiohttp's and the kernel's buffers) and the socket itself, for up to the
close timeout if the client takes nothing. Until every shed connection has closed, the
budget counts as exceeded (:attr:`OutboundBudget.over`): the gateway answers upgrades
with 503 and ``/readyz`` with 503, so load balancers and reconnecting clients go to
another gateway meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

K = TypeVar("K")


class OutboundBudget:
    """Bytes queued to all clients of one gateway, against ``limit_bytes``.

    :attr:`total` is changed by the outboxes directly. :meth:`shed_started` and
    :meth:`shed_finished` are called once each per connection shed.
    """

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes < 1:
            raise ValueError(f"limit_bytes must be >= 1, got {limit_bytes}")
        self.limit_bytes = limit_bytes
        #: Bytes queued or being written, all outboxes together.
        self.total = 0
        #: Connections shed and not yet closed.
        self.closing = 0

    @property
    def excess(self) -> int:
        """Bytes over the limit (0 or less: within it)."""
        return self.total - self.limit_bytes

    @property
    def over(self) -> bool:
        """Over the limit, or a connection shed for it has not closed yet."""
        return self.total > self.limit_bytes or self.closing > 0

    def shed_started(self) -> None:
        self.closing += 1

    def shed_finished(self) -> None:
        self.closing -= 1


def choose_victims(queued: Iterable[tuple[K, int]], excess: int) -> list[K]:
    """The connections to shed so that at least ``excess`` bytes are freed: those with
    the most bytes queued first, as few as that takes.

    ``queued`` gives each connection with its queued bytes; among equal queues the
    earlier one goes first (the gateway gives them oldest connection first). Connections
    with nothing queued are never chosen: closing them frees nothing. Returns [] when
    ``excess`` <= 0; every connection with something queued if they add up to less.
    """
    if excess <= 0:
        return []
    # sorted() is stable: equal queues keep the order given.
    candidates = sorted(((k, q) for k, q in queued if q > 0), key=lambda kq: -kq[1])
    victims: list[K] = []
    freed = 0
    for key, size in candidates:
        if freed >= excess:
            break
        victims.append(key)
        freed += size
    return victims
