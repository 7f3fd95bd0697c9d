"""The output gate: what a handler sends leaves only after the storage writes it made are
durable, as in Cloudflare Durable Objects.

Each handler run (a connect, an event, an alarm) has one :class:`OutputGate`, reachable
through :data:`current_gate`. Storage writes register with it as they start (they start
at once, awaited or not); everything that lets output leave the worker (publishing
buffered sends, a close, ``send_many``, a broadcast, the final ack with its messages)
first waits for :meth:`OutputGate.open`. So a client never sees a value that a crash of the
worker or of the state service then loses: if a write fails, the output it gated is
dropped and the handler fails. A write *refused* by a quota or for the disk (ObjectQuota-
Exceeded, StorageFull) is not a failure of durability: it applied nothing, so it holds
nothing back, and its exception is the handler's own (awaited, it can be caught and
answered; not awaited, it is lost, as the write is).

The gate also numbers the run's writes for their idempotency keys: the n-th write of the
handler of event ``seq`` on connection ``id`` carries ``id:seq:n``, the same key each
time the event is redelivered.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

from wsgate.errors import StateError
from wsgate.state_errors import EXHAUSTED_TYPES


class OutputGate:
    """The writes of one handler run, and the numbering of their idempotency keys.

    ``key_prefix`` is None where writes need no key (outside any event). With
    ``sequence``, the keys' prefix is ``f"{key_prefix}:{sequence}"`` (an event's
    connection id and sequence), made at the first write: most handler runs write nothing,
    and a gate is made for every event.
    """

    __slots__ = ("_key_prefix", "_next", "_sequence", "_writes")

    def __init__(self, key_prefix: str | None, sequence: int | None = None) -> None:
        self._key_prefix = key_prefix
        self._sequence = sequence
        self._next = 0
        # A list once something is held (most runs hold nothing: no list made for them).
        self._writes: list[asyncio.Future[Any]] | tuple[()] = ()

    def next_key(self) -> str:
        """The idempotency key of the next write of this run ("" when there is none)."""
        if self._key_prefix is None:
            return ""
        if self._sequence is not None:
            self._key_prefix = f"{self._key_prefix}:{self._sequence}"
            self._sequence = None
        self._next += 1
        return f"{self._key_prefix}:{self._next}"

    def hold(self, write: asyncio.Future[Any]) -> None:
        """Keep output behind ``write`` until it completes."""
        if self._writes:
            self._writes.append(write)
        else:
            self._writes = [write]

    async def open(self) -> None:
        """Wait for every write registered so far (and any registered meanwhile); raise the
        first failure: the output it gated must then be dropped. Any number of callers may
        wait at once; each sees the same outcome."""
        waited = 0
        while waited < len(self._writes):
            batch = self._writes[waited:]
            waited = len(self._writes)
            # return_exceptions: wait for all of them, and retrieve every exception.
            await asyncio.gather(*batch, return_exceptions=True)
        for write in self._writes:
            if write.cancelled():
                raise StateError("a storage write of this handler was cancelled")
            failure = write.exception()
            if failure is not None and not isinstance(failure, EXHAUSTED_TYPES):
                raise failure

    def abandon(self) -> None:
        """Stop gating: the handler failed and its output is dropped. The writes go on;
        their outcome no longer matters to anyone (failures are only logged)."""
        writes, self._writes = self._writes, ()
        for write in writes:
            write.add_done_callback(_retrieve)

    @property
    def holds_writes(self) -> bool:
        """Whether any write was registered (done or not): then :meth:`open` has work."""
        return bool(self._writes)

    @property
    def closed(self) -> bool:
        """Whether some write of this run has not completed yet."""
        return any(not write.done() for write in self._writes)


def _retrieve(write: asyncio.Future[Any]) -> None:
    # Marks the exception as retrieved, so asyncio does not report it a second time.
    if not write.cancelled():
        write.exception()


#: The gate of the handler running in this context (None outside handlers).
current_gate: contextvars.ContextVar[OutputGate | None] = contextvars.ContextVar(
    "wsgate_output_gate", default=None
)


async def open_current_gate() -> None:
    """Wait until the running handler's writes are durable (nothing outside handlers)."""
    gate = current_gate.get()
    if gate is not None:
        await gate.open()
