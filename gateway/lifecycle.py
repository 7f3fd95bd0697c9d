"""The life of one gateway connection, without I/O.

The aiohttp handler feeds what happens on the socket into :class:`ConnectionLifecycle`
and sends the envelopes it returns; tests drive it with no sockets. It numbers events,
remembers who started closing, and makes sure the ``Closed`` event is produced exactly
once and last.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from wsgate.closecodes import CloseCode
from wsgate.v1 import envelope_pb2 as pb


class Phase(enum.Enum):
    """Where a connection is. Moves only forward: OPEN → CLOSING → CLOSED."""

    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(frozen=True)
class CloseIntent:
    """The first request to close: who asked, with which code and reason."""

    initiator: pb.CloseInitiator.ValueType
    code: int
    reason: str


class ConnectionLifecycle:
    """Sequence numbers and the close handshake's bookkeeping for one accepted connection."""

    def __init__(self, connection_id: str, path: str) -> None:
        self.connection_id = connection_id
        self.path = path
        self.phase = Phase.OPEN
        self.close_intent: CloseIntent | None = None
        #: The highest sequence a worker has acknowledged.
        self.acked_through = 0
        self._sequence = 0

    @property
    def last_sequence(self) -> int:
        """The sequence of the latest event produced (0 before any)."""
        return self._sequence

    def message_event(self, message: pb.Message) -> pb.ConnectionEvent:
        """The event for a message the client sent. Raises RuntimeError once CLOSED."""
        if self.phase is Phase.CLOSED:
            raise RuntimeError(f"connection {self.connection_id} is closed")
        return self._event(message=message)

    def acknowledged(self, sequence: int) -> None:
        """A worker acknowledged event ``sequence``."""
        self.acked_through = max(self.acked_through, sequence)

    def is_stale(self, in_reply_to: int) -> bool:
        """Whether a command sent in reply to event ``in_reply_to`` comes too late: that
        event was acknowledged already, so this is a stale copy's work (0: not a reply)."""
        return 0 < in_reply_to <= self.acked_through

    def request_close(
        self, initiator: pb.CloseInitiator.ValueType, code: int, reason: str = ""
    ) -> bool:
        """Record a request to close. Only the first one counts; returns whether it was first."""
        if self.close_intent is not None or self.phase is Phase.CLOSED:
            return False
        self.close_intent = CloseIntent(initiator, code, reason)
        self.phase = Phase.CLOSING
        return True

    def closed_event(self) -> pb.ConnectionEvent | None:
        """The ``Closed`` event, the first time this is called; None afterwards.

        When nobody asked to close first, the transport broke without a close frame, and
        the event says so with 1006 (RFC 6455 section 7.1.5).
        """
        if self.phase is Phase.CLOSED:
            return None
        self.phase = Phase.CLOSED
        intent = self.close_intent
        if intent is None:
            intent = CloseIntent(pb.CLOSE_INITIATOR_UNSPECIFIED, CloseCode.ABNORMAL, "")
            self.close_intent = intent
        closed = pb.Closed(code=intent.code, reason=intent.reason, initiator=intent.initiator)
        return self._event(closed=closed)

    def _event(
        self, *, message: pb.Message | None = None, closed: pb.Closed | None = None
    ) -> pb.ConnectionEvent:
        self._sequence += 1
        return pb.ConnectionEvent(
            connection_id=self.connection_id,
            sequence=self._sequence,
            path=self.path,
            message=message,
            closed=closed,
        )
