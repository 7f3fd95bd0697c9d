"""Idempotency keys: a write that carries one is applied at most once.

Workers key every write of an event handler by ``<connection id>:<sequence>:<n>`` (the n-th
write of that handler run), so the writes of a redelivered event, which replay the same
keys in the same order, are recognised and not applied again. The key is recorded in the
same SQLite transaction as the write's effect, so both are durable together or not at all.
Keys are remembered for ``idempotency_retention_s`` (an hour by default, far above any
redelivery window), then pruned.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from wsgate.clock import now_ms
from wsgate.placement import task_key
from wsgate.stateservice.component import StateContext
from wsgate.stateservice.storage import DATABASE_ERRORS, Operation, Sql
from wsgate.supervision import stop_task

log = logging.getLogger(__name__)


_LOOKUP = "SELECT count, result FROM applied WHERE key = ?"

#: How often keys past their retention are pruned.
PRUNE_INTERVAL_S = 60.0


@dataclass(frozen=True)
class Applied:
    """What a keyed write did: its count (and a transaction's result), and whether this
    time it was only recognised (``replayed``), not applied."""

    count: int
    result: bytes | None = None
    replayed: bool = False


@dataclass(frozen=True)
class Idempotent:
    """Run ``op`` unless ``key`` was applied before; record ``key`` with its outcome.

    ``op`` may be None (a transaction with no writes still records its result).
    """

    op: Operation[int] | None
    key: str
    result: bytes | None = None
    writes = True

    def __call__(self, conn: Sql) -> Applied:
        row = conn.execute(
            "SELECT count, result FROM applied WHERE key = ?", (self.key,)
        ).fetchone()
        if row is not None:
            count, result = row
            return Applied(count, None if result is None else bytes(result), replayed=True)
        count = self.op(conn) if self.op is not None else 0
        conn.execute(
            "INSERT INTO applied (key, count, result, at_ms) VALUES (?, ?, ?, ?)",
            (self.key, count, self.result, now_ms()),
        )
        return Applied(count, self.result)


@dataclass(frozen=True)
class LookupApplied:
    """The record of ``key`` (replayed=True) if it was applied, else None."""

    key: str
    writes = False

    def __call__(self, conn: Sql) -> Applied | None:
        row = conn.execute(
            "SELECT count, result FROM applied WHERE key = ?", (self.key,)
        ).fetchone()
        if row is None:
            return None
        return Applied(row[0], None if row[1] is None else bytes(row[1]), replayed=True)


@dataclass(frozen=True)
class PruneApplied:
    """Forget keys applied before ``before_ms``; returns how many."""

    before_ms: int
    writes = True

    def __call__(self, conn: Sql) -> int:
        return conn.execute("DELETE FROM applied WHERE at_ms < ?", (self.before_ms,)).rowcount


class IdempotencyPruner:
    """Background part of the state service: prunes keys past their retention."""

    def __init__(self, context: StateContext, interval_s: float = PRUNE_INTERVAL_S) -> None:
        self._context = context
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def register(self, server: Any) -> None:
        """No gRPC service of its own."""

    async def start(self) -> None:
        """Start pruning every ``interval_s`` seconds."""
        self._task = self._context.spawn("idempotency_pruner", self._prune_forever())

    async def close(self) -> None:
        """Stop pruning."""
        task, self._task = self._task, None
        await stop_task(task)

    async def prune_once(self) -> int:
        """Prune now; returns how many keys were forgotten."""
        retention_ms = int(self._context.config.idempotency_retention_s * 1000)
        return await self._context.storage.run(PruneApplied(now_ms() - retention_ms))

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            if not self._context.ownership.owns_key(task_key("prune-applied")):
                continue  # another replica prunes for the tier
            try:
                pruned = await self.prune_once()
            except (*DATABASE_ERRORS, RuntimeError):
                log.warning("pruning idempotency keys failed", exc_info=True)
                continue
            if pruned:
                log.info("forgot %d idempotency keys past their retention", pruned)
