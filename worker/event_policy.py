"""What becomes of a function route's event once its handler has run: the worker's
per-event policy, with no I/O (:mod:`wsgate.worker.runtime` carries it out on NATS).

Given the kind of event (a message, or the connection's close) and how its handler
ended, :func:`settle` decides

- whether the frames the handler sent are *released* (they leave once its storage
  writes are durable: the output gate) or *dropped* with the failure that gated them;
- the close, if any, that the worker sends for the connection, after released frames;
- whether the connection leaves every durable object before the ack (a close event).

The worker then writes the final ack (:func:`wsgate.batches.final_ack_entry`), which
carries the frames still buffered. An event
is acknowledged whatever its handler did (an exception in a handler ends the
connection, as in Cloudflare Workers, and is not retried); only a failure of the
worker's own steps (the close of a route no longer served, leaving the objects) leaves
it unacknowledged, so that the gateway delivers it again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from wsgate.closecodes import CloseCode


class EventKind(enum.Enum):
    """The kinds of ``ConnectionEvent`` a handler runs for."""

    MESSAGE = "message"
    CLOSED = "closed"

    # Hashed by identity (members are singletons, compared by identity): Enum's own hash
    # is a Python call, and settle() hashes a kind and an outcome for every event.
    __hash__ = object.__hash__


class HandlerOutcome(enum.Enum):
    """How the handler of an event ended."""

    #: It returned, and the writes it made are durable.
    RETURNED = "returned"
    #: It raised, was cancelled from inside, or a write it made failed.
    FAILED = "failed"
    #: No route serves the event's path any more (the app was redeployed without it):
    #: no handler ran.
    NO_ROUTE = "no route"

    __hash__ = object.__hash__  # as EventKind's


@dataclass(frozen=True, slots=True)
class Close:
    """A close the worker sends for the connection."""

    code: int
    reason: str
    #: Whether a failure to send it may be ignored (the event is acked all the same);
    #: if not, the failure fails the event, which then comes again.
    best_effort: bool


@dataclass(frozen=True, slots=True)
class Settlement:
    """What the worker does with an event after its handler (see :func:`settle`)."""

    #: Whether the frames the handler sent leave (else they are dropped, with its gate).
    release_output: bool
    #: The close the worker sends after the released frames, or None.
    close: Close | None
    #: Whether the connection leaves every durable object before the ack.
    leave_objects: bool


#: An exception in a message handler ends the connection with 1011.
HANDLER_FAILED = Close(CloseCode.INTERNAL_ERROR, "internal error", best_effort=True)
#: A message for a route the app no longer serves ends the connection with 1011.
ROUTE_GONE = Close(CloseCode.INTERNAL_ERROR, "route no longer served", best_effort=False)


def settle(kind: EventKind, outcome: HandlerOutcome, *, closed: bool) -> Settlement:
    """The policy for an event of ``kind`` whose handler ended with ``outcome``;
    ``closed``: whether the connection handle is closed (the handler closed it, or this is
    the close event, whose handle never sends)."""
    # Looked up, not built: this runs for every event.
    return _SETTLEMENTS[kind, outcome, closed]


def _decide(kind: EventKind, outcome: HandlerOutcome, closed: bool) -> Settlement:
    leave = kind is EventKind.CLOSED
    if outcome is HandlerOutcome.RETURNED:
        return Settlement(release_output=True, close=None, leave_objects=leave)
    if outcome is HandlerOutcome.FAILED:
        return Settlement(
            release_output=False, close=None if closed else HANDLER_FAILED, leave_objects=leave
        )
    close = ROUTE_GONE if kind is EventKind.MESSAGE and not closed else None
    return Settlement(release_output=True, close=close, leave_objects=leave)


_SETTLEMENTS = {
    (kind, outcome, closed): _decide(kind, outcome, closed)
    for kind in EventKind
    for outcome in HandlerOutcome
    for closed in (False, True)
}

#: A ``ConnectionEvent``'s ``kind`` (``WhichOneof("kind")``) as an EventKind.
EVENT_KINDS = {kind.value: kind for kind in EventKind}
