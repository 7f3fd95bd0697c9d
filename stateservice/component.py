"""What a part of the state service (storage, membership, alarms) gets from the server, and
what it gives back: its gRPC servicer and its background work.

The server builds one :class:`StateContext` at start and hands it to every part; parts never
reach into the server itself, so each lives in its own module and is tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from nats.aio.client import Client as NatsClient

from wsgate.config import StateConfig
from wsgate.stateservice.leases import ObjectLeases
from wsgate.stateservice.locks import ObjectLocks
from wsgate.stateservice.ownership import Ownership
from wsgate.stateservice.quotas import Quotas
from wsgate.stateservice.storage import Storage
from wsgate.supervision import Spawn, unsupervised


@dataclass(frozen=True)
class StateContext:
    """Shared by the parts of one state service process."""

    config: StateConfig
    #: The database (SQLite or PostgreSQL); every part submits its operations here.
    storage: Storage
    #: Per-object order between transactions and the writes that must wait for them.
    locks: ObjectLocks
    #: The bus: broadcasts to gateways, presence from gateways, alarms to workers.
    nc: NatsClient
    #: Which worker hosts which object's activation; writes from outside are refused there.
    leases: ObjectLeases
    #: Which objects this replica serves (all of them, on SQLite).
    ownership: Ownership
    #: The quotas on objects and the disk, with their refusal counts (default: made from
    #: ``config``; the server passes its own, which its metrics read).
    quotas: Quotas = field(default=None)  # type: ignore[assignment]
    #: Starts the parts' background loops (the server's supervisor: a crash turns /readyz
    #: to 503 and is counted).
    spawn: Spawn = unsupervised

    def __post_init__(self) -> None:
        if self.quotas is None:
            object.__setattr__(self, "quotas", Quotas(self.config))


class Component(Protocol):
    """One part of the state service."""

    def register(self, server: Any) -> None:
        """Add this part's servicer(s) to the ``grpc.aio.Server`` (before it starts)."""
        ...

    async def start(self) -> None:
        """Start background work (subscriptions, timers). Called once the server listens."""
        ...

    async def close(self) -> None:
        """Stop background work; called after the gRPC server stopped, before storage closes."""
        ...
