"""One gateway connection's policy, without I/O: inputs in, actions out.

In the manner of python-websockets' sans-I/O ``Protocol`` and of h11, :class:`Session`
reads no clock, touches no socket and publishes nothing. The gateway's wiring
(``gateway/server.py``, ``gateway/delivery.py``) feeds it what happened and performs the
actions it returns, in order:

============================  =====================================================
input                         what it is
============================  =====================================================
:meth:`Session.opened`        the 101 was sent (with the app's ``Accept``)
:meth:`Session.abort`         the app accepted it, but the socket never opened
:meth:`Session.client_frame`  a text or binary message from the client
:meth:`Session.client_close`  the client's close frame
:meth:`Session.transport_error`  the transport closed it itself (1002/1007/1009, no pong)
:meth:`Session.transport_closed`  the socket is gone
:meth:`Session.command`       a ``GatewayCommand`` for this connection (send or close)
:meth:`Session.ack_messages`  what a final ack carried for this connection
:meth:`Session.reply`         what came back for the event in flight (final ack,
                              progress, retry, no responders, timeout)
:meth:`Session.give_up`       no reply can come any more (the bus is gone)
:meth:`Session.close`         the gateway closes it (drain, shed, slow consumer)
:meth:`Session.tick`          time passed (``now`` is the only clock)
============================  =====================================================

Actions: :class:`Publish` an event (to a worker, or the queue), :class:`Write` a frame,
:class:`Close` the socket (after what is queued, or at once, dropping it),
:class:`Delivered` / :class:`GaveUp` (the event in flight settled), :class:`Count` a
metric. The ``Closed`` event the app receives is a :class:`Publish` like any other.

States move only forward: CONNECTING → OPEN → CLOSING → CLOSED. CLOSING begins with the
first request to close (whoever made it: its code, reason and initiator are what the app's
``Closed`` event carries); CLOSED when the socket is gone. Nothing is written after
CLOSED; exactly one ``Closed`` event is published, last.

**Window 1.** At most one event is in flight; the events behind it wait in a queue made
only when needed (the gateway reads the next frame only once the window is free, so in
practice it stays empty: the client's TCP connection holds the rest). The event in flight
is published again (same sequence, ``redelivered`` set) when no reply came by its ack
deadline; see :meth:`Session.reply` for the whole delivery policy.
"""

from __future__ import annotations

import collections
import enum
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from wsgate.batches import varint
from wsgate.closecodes import CloseCode, is_sendable
from wsgate.gateway.rate import TokenBucket
from wsgate.v1 import envelope_pb2 as pb

#: First wait after a no-responders answer or a retry; doubled each time up to the max.
FIRST_BACKOFF_S = 0.05
MAX_BACKOFF_S = 1.0


class State(enum.Enum):
    CONNECTING = "connecting"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class Reply(enum.Enum):
    """What came back for one published copy of an event."""

    ACKED = "acked"
    PROGRESS = "progress"
    NO_RESPONDERS = "no_responders"
    TIMEOUT = "timeout"
    RETRY = "retry"


# -- events ----------------------------------------------------------------------------


@functools.cache
def _ack_wait_field(ack_wait_ms: int) -> bytes:
    # One value per gateway (its ack timeout): made once.
    return b"\x38" + varint(ack_wait_ms)


def string_field(tag: int, value: str) -> bytes:
    """A length-delimited protobuf field ``tag`` holding ``value``'s UTF-8 (none if empty,
    as proto3 writes a plain string field)."""
    if not value:
        return b""
    data = value.encode("utf-8")
    return bytes((tag << 3 | 2,)) + varint(len(data)) + data


class Event:
    """One ``ConnectionEvent`` as the session keeps it: its fields, not a protobuf object
    (which costs more to build than the whole encoding). :meth:`encode` gives exactly the
    bytes protobuf's ``SerializeToString`` gives for :meth:`to_proto` (tested against it).

    ``data`` is the client's message (str: text, bytes: binary) or ``closed`` is set:
    exactly one of the two. ``head`` is the connection's encoded ``connection_id`` field
    and ``path_field`` its ``path`` field, made once per connection (see
    :func:`string_field`).
    """

    __slots__ = (
        "ack_wait_ms",
        "closed",
        "connection_id",
        "data",
        "head",
        "path",
        "path_field",
        "redelivered",
        "sequence",
    )

    def __init__(
        self,
        connection_id: str,
        sequence: int,
        path: str,
        *,
        data: str | bytes | None = None,
        closed: pb.Closed | None = None,
        head: bytes | None = None,
        path_field: bytes | None = None,
    ) -> None:
        self.connection_id = connection_id
        self.sequence = sequence
        self.path = path
        self.data = data
        self.closed = closed
        self.redelivered = False
        self.ack_wait_ms = 0
        self.head = string_field(1, connection_id) if head is None else head
        self.path_field = string_field(4, path) if path_field is None else path_field

    @property
    def kind(self) -> str:
        """ "message" or "closed" (the ``kind`` oneof)."""
        return "message" if self.closed is None else "closed"

    @property
    def message(self) -> pb.Message:
        """The client's message as a protobuf (made on each call: for tests and logs)."""
        data = self.data
        if isinstance(data, str):
            return pb.Message(text=data)
        return pb.Message(binary=data or b"")

    def to_proto(self) -> pb.ConnectionEvent:
        """The same event as a protobuf object."""
        event = pb.ConnectionEvent(
            connection_id=self.connection_id,
            sequence=self.sequence,
            redelivered=self.redelivered,
            path=self.path,
            ack_wait_ms=self.ack_wait_ms,
        )
        if self.closed is None:
            event.message.CopyFrom(self.message)
        else:
            event.closed.CopyFrom(self.closed)
        return event

    def encode(self) -> bytes:
        """The serialized ``ConnectionEvent``, fields in number order as protobuf writes
        them, defaults left out (proto3), the oneof member always written."""
        closed = self.closed
        if closed is None:
            data = self.data
            if data.__class__ is str:
                payload = data.encode("utf-8")
                tag = 0x0A  # Message.text
            else:
                payload = data  # type: ignore[assignment]
                tag = 0x12  # Message.binary
            size = len(payload)
            # ConnectionEvent.message (5), holding the one field of Message, then its bytes.
            if size < 126:
                kind = bytes((0x2A, size + 2, tag, size))
            else:
                length = varint(size)
                kind = b"\x2a" + varint(1 + len(length) + size) + bytes((tag,)) + length
        else:
            payload = closed.SerializeToString()
            kind = b"\x32" + varint(len(payload))  # ConnectionEvent.closed (6)
        sequence = self.sequence
        ack_wait_ms = self.ack_wait_ms
        return b"".join(
            (
                self.head,
                (b"\x10" + varint(sequence)) if sequence else b"",
                b"\x18\x01" if self.redelivered else b"",
                self.path_field,
                kind,
                payload,
                _ack_wait_field(ack_wait_ms) if ack_wait_ms else b"",
            )
        )


# -- actions ---------------------------------------------------------------------------


class Publish(NamedTuple):
    """Publish ``event`` to ``worker``'s own subject ("": the app's queue)."""

    event: Event
    worker: str


class Write(NamedTuple):
    """Queue a data frame for the client."""

    frame: str | bytes


class Close(NamedTuple):
    """Close the socket with ``code`` and ``reason``: after what is queued, or, ``force``,
    at once, dropping what is queued (slow consumer, outbound budget)."""

    code: int
    reason: str
    force: bool = False


class Delivered(NamedTuple):
    """The event in flight was acknowledged, ``round_trip_s`` after its first publish."""

    event: Event
    round_trip_s: float


class GaveUp(NamedTuple):
    """The event in flight was given up (no sign of a worker for the delivery timeout)."""

    event: Event


class Count(NamedTuple):
    """Add ``n`` to the gateway metric ``metric`` (an attribute of GatewayMetrics), with
    ``label`` if it has one."""

    metric: str
    label: str = ""
    n: int = 1


Action = Publish | Write | Close | Delivered | GaveUp | Count

#: Builds a NamedTuple from a tuple of its fields, without the Python-level ``__new__``
#: that calling the class runs (a frame per action): for the actions of every message.
_new = tuple.__new__

MESSAGE_IN = Count("messages_in")
MESSAGE_OUT = Count("messages_out")
AUTO_RESPONSE = Count("auto_responses")
RATE_LIMITED = Count("rate_limited")
REDELIVERY = Count("redeliveries")
STALE = Count("drops", "stale")
UNKNOWN_CONNECTION = Count("drops", "unknown_connection")
SLOW_CONSUMER = Count("drops", "slow_consumer")

CLOSE_LABELS = {
    pb.CLOSE_INITIATOR_UNSPECIFIED: "transport",
    pb.CLOSE_INITIATOR_CLIENT: "client",
    pb.CLOSE_INITIATOR_APP: "app",
    pb.CLOSE_INITIATOR_GATEWAY: "gateway",
}
_CLOSES = {initiator: Count("closes", label) for initiator, label in CLOSE_LABELS.items()}

NO_WORKER_REASON = "no worker acknowledged the message"
SLOW_CONSUMER_REASON = "slow consumer"
IDLE_REASON = "idle timeout"


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """What every session of one gateway shares (one instance per gateway).

    0 turns ``message_rate`` and ``idle_timeout_s`` off.
    """

    max_message_bytes: int = 1024 * 1024
    #: The bound on commands kept for a connection still upgrading.
    max_outbound_bytes: int = 4 * 1024 * 1024
    message_rate: float = 0.0
    message_burst: int = 1
    idle_timeout_s: float = 0.0
    ack_timeout_s: float = 5.0
    delivery_timeout_s: float = 30.0
    auto_responses: Mapping[str, str] = field(default_factory=dict)

    @property
    def rate_reason(self) -> str:
        return f"message rate exceeded ({self.message_rate:g}/s, burst {self.message_burst})"


class _Flight:
    """The event in flight and its delivery clock."""

    __slots__ = (
        "ack_deadline",
        "backoff_s",
        "event",
        "give_up_at",
        "retry_at",
        "started",
        "worker",
    )

    def __init__(self, event: Event, now: float, limits: SessionLimits) -> None:
        self.event = event
        self.started = now
        self.give_up_at = now + limits.delivery_timeout_s
        #: When the copy published last times out (None while waiting to retry).
        self.ack_deadline: float | None = None
        #: When to publish again after a no-responders answer or a retry (None: not waiting).
        self.retry_at: float | None = None
        self.backoff_s = FIRST_BACKOFF_S
        #: The worker the last copy went to ("" for the queue).
        self.worker = ""


class _Early:
    """Commands for a connection still upgrading, applied once it opens."""

    __slots__ = ("commands", "overflowed", "size")

    def __init__(self) -> None:
        self.commands: list[pb.GatewayCommand] = []
        self.size = 0
        #: More than max_outbound_bytes came: it opens only to close as a slow consumer.
        self.overflowed = False


class Session:
    """The policy of one accepted connection. See the module docstring.

    Every input returns the list of actions to perform, in order. Inputs that make no
    sense in the current state (a frame before ``opened``, a reply with nothing in
    flight) raise RuntimeError: they are the wiring's bugs, never the client's.
    """

    __slots__ = (
        "_close_code",
        "_close_reason",
        "_early",
        "_fields",
        "_flight",
        "_initiator",
        "_last_read",
        "_queue",
        "_rate",
        "_sequence",
        "acked_through",
        "connection_id",
        "limits",
        "path",
        "state",
        "worker",
    )

    def __init__(self, connection_id: str, path: str, limits: SessionLimits) -> None:
        self.connection_id = connection_id
        self.path = path
        self.limits = limits
        self.state = State.CONNECTING
        #: The worker holding the activation of the connection's durable object (from the
        #: connect decision and the final acks): its events go there first. "" for the queue.
        self.worker = ""
        #: The highest sequence a worker has acknowledged.
        self.acked_through = 0
        self._sequence = 0
        self._close_code = 0
        self._close_reason = ""
        self._initiator: pb.CloseInitiator.ValueType | None = None
        self._rate: TokenBucket | None = None
        self._last_read = 0.0
        self._flight: _Flight | None = None
        self._queue: collections.deque[Event] | None = None
        #: The encoded connection_id and path fields of its events (made at the first).
        self._fields: tuple[bytes, bytes] | None = None
        self._early: _Early | None = None

    # -- what the wiring reads -----------------------------------------------------------

    @property
    def last_sequence(self) -> int:
        """The sequence of the latest event produced (0 before any)."""
        return self._sequence

    @property
    def busy(self) -> bool:
        """An event is in flight."""
        return self._flight is not None

    @property
    def in_flight(self) -> Event | None:
        """The event in flight (None when the window is free)."""
        flight = self._flight
        return None if flight is None else flight.event

    @property
    def close_requested(self) -> tuple[pb.CloseInitiator.ValueType, int, str] | None:
        """The first request to close: initiator, code, reason (None before any)."""
        if self._initiator is None:
            return None
        return self._initiator, self._close_code, self._close_reason

    @property
    def ack_deadline(self) -> float | None:
        """When the copy of the event in flight published last times out."""
        flight = self._flight
        return None if flight is None else flight.ack_deadline

    @property
    def retry_at(self) -> float | None:
        """When the event in flight is to be published again (see :meth:`tick`)."""
        flight = self._flight
        return None if flight is None else flight.retry_at

    @property
    def give_up_at(self) -> float:
        """When the event in flight is given up without a sign of a worker."""
        flight = self._flight
        if flight is None:
            raise RuntimeError("no event in flight")
        return flight.give_up_at

    def read_timeout(self, now: float) -> float | None:
        """How long the wiring may wait for the client's next frame before calling
        :meth:`tick` (None: no idle limit). While open, until the idle deadline; while
        closing, a whole idle period again (the close handshake ends the wait)."""
        idle = self.limits.idle_timeout_s
        if not idle:
            return None
        if self.state is State.OPEN:
            return max(self._last_read + idle - now, 0.0)
        return idle

    # -- the socket ----------------------------------------------------------------------

    def opened(
        self, now: float, *, worker: str = "", messages: Sequence[pb.Message] = ()
    ) -> list[Action]:
        """The 101 went out. Writes the decision's ``messages``, then the commands that
        came while it was upgrading (their turns ran after the connect turn)."""
        if self.state is not State.CONNECTING:
            raise RuntimeError(f"{self.connection_id} opened twice")
        self.state = State.OPEN
        self.worker = worker
        self._last_read = now
        limits = self.limits
        if limits.message_rate > 0:
            self._rate = TokenBucket(limits.message_rate, limits.message_burst, now)
        actions: list[Action] = []
        for message in messages:
            self._push_message(actions, message, "connect_reply")
        early = self._early
        if early is not None:
            self._early = None
            for command in early.commands:
                self._apply_command(actions, command)
            if early.overflowed:
                actions.extend(self.slow_consumer())
        return actions

    def abort(self, code: int, now: float) -> list[Action]:
        """The app accepted the connection but its socket never opened (the client left
        during the handshake, the gateway is shutting down, a bad subprotocol): CLOSED,
        and the app gets its ``Closed`` event with ``code``."""
        if self.state is not State.CONNECTING:
            raise RuntimeError(f"{self.connection_id} is {self.state.value}, not connecting")
        self._request_close(pb.CLOSE_INITIATOR_GATEWAY, code, "")
        # Not counted among the closes (wsgate_gateway_closes_total): it never opened.
        return [a for a in self.transport_closed(now) if not isinstance(a, Count)]

    def client_frame(self, data: str | bytes, now: float) -> list[Action]:
        """A text (str) or binary (bytes) message from the client."""
        state = self.state
        if state is State.CONNECTING:
            raise RuntimeError(f"a frame for {self.connection_id} before it opened")
        if state is State.CLOSED:
            return []
        self._last_read = now
        rate = self._rate
        if rate is not None and not rate.take(now):
            # Dropped; the connection closes with 1008 after what is queued for it (once:
            # later messages are dropped as it is closing).
            if self._request_close(
                pb.CLOSE_INITIATOR_GATEWAY, CloseCode.POLICY_VIOLATION, self.limits.rate_reason
            ):
                return [RATE_LIMITED, Close(CloseCode.POLICY_VIOLATION, self.limits.rate_reason)]
            return []
        if state is not State.OPEN:
            return []  # closing: what the client sends meanwhile is not the app's anymore
        if len(data) > self.limits.max_message_bytes:
            # The transport's parser enforces the limit in bytes already; a str's length
            # in characters is at most its size in UTF-8, so this never refuses a message
            # within the limit.
            return self._close_now(
                pb.CLOSE_INITIATOR_GATEWAY, CloseCode.MESSAGE_TOO_BIG, "message too big"
            )
        auto_responses = self.limits.auto_responses
        # Looked up only when there are any: a message's str is new, and its hash is
        # computed over all of it.
        if auto_responses and isinstance(data, str):
            response = auto_responses.get(data)
            if response is not None:
                return [AUTO_RESPONSE, Write(response)]
        actions: list[Action] = [MESSAGE_IN]
        self._enqueue(actions, self._event(data=data), now)
        return actions

    def client_close(self, code: int, reason: str, now: float) -> list[Action]:
        """The client's close frame (``code`` 0: it had none). Answered with the same
        code, 1000 for none; a code no endpoint may send is a protocol error (1002)."""
        if self.state is State.CLOSED:
            return []
        self._last_read = now
        reply: int
        if code == 0:  # an empty close frame: no status code (RFC 6455 7.1.5)
            code, reply = CloseCode.NO_STATUS, CloseCode.NORMAL
        elif is_sendable(code):
            reply = code
        else:
            # RFC 6455 7.4.1: a code that may not be sent is a protocol error.
            return self._close_now(
                pb.CLOSE_INITIATOR_GATEWAY, CloseCode.PROTOCOL_ERROR, "invalid close code"
            )
        if self._request_close(pb.CLOSE_INITIATOR_CLIENT, code, reason):
            return [Close(reply, "")]
        return []

    def transport_error(self, code: int, reason: str) -> list[Action]:
        """The transport closed the socket itself: a protocol violation (RFC 6455 7.4.1;
        aiohttp sent 1002, 1007 or 1009 already) or no pong to a heartbeat (1006). The app
        is told ``code``; nothing is to be written."""
        if self.state is not State.CLOSED:
            self._request_close(pb.CLOSE_INITIATOR_GATEWAY, code, reason)
        return []

    def transport_closed(self, now: float) -> list[Action]:
        """The socket is gone: CLOSED. The ``Closed`` event follows the event in flight,
        if any. When nobody asked to close first, the transport broke without a close
        frame, and the event says so with 1006 (RFC 6455 section 7.1.5)."""
        if self.state is State.CLOSED:
            return []
        if self._initiator is None:
            self._request_close(pb.CLOSE_INITIATOR_UNSPECIFIED, CloseCode.ABNORMAL, "")
        self.state = State.CLOSED
        self._early = None
        initiator = self._initiator
        assert initiator is not None
        closed = pb.Closed(code=self._close_code, reason=self._close_reason, initiator=initiator)
        actions: list[Action] = [_CLOSES[initiator]]
        self._enqueue(actions, self._event(closed=closed), now)
        return actions

    # -- the app and the gateway ---------------------------------------------------------

    def command(self, command: pb.GatewayCommand) -> list[Action]:
        """A command for this connection. Kept while it is upgrading (see :meth:`opened`;
        at most ``max_outbound_bytes``, beyond which it opens only to close as a slow
        consumer); applied while open; dropped and counted otherwise."""
        state = self.state
        if state is State.CONNECTING:
            return self._keep_early(command)
        actions: list[Action] = []
        self._apply_command(actions, command)
        return actions

    def ack_messages(self, messages: Sequence[pb.Message]) -> list[Action]:
        """What a final ack carried for this connection, before its flight settles."""
        actions: list[Action] = []
        if self.state is not State.OPEN:
            actions.append(Count("drops", "unknown_connection", len(messages)))
            return actions
        for message in messages:
            self._push_message(actions, message, "acks")
        return actions

    def close(
        self,
        code: int,
        reason: str,
        initiator: pb.CloseInitiator.ValueType = pb.CLOSE_INITIATOR_GATEWAY,
    ) -> list[Action]:
        """Close after what is queued (the gateway draining: 1001). Only the first
        request to close counts."""
        if self._request_close(initiator, code, reason):
            return [Close(code, reason)]
        return []

    def slow_consumer(self) -> list[Action]:
        """A frame did not fit in the outbound queue (max_outbound_bytes): it was dropped,
        and the connection closes with 1008 at once, its queue dropped."""
        if self._request_close(
            pb.CLOSE_INITIATOR_GATEWAY, CloseCode.POLICY_VIOLATION, SLOW_CONSUMER_REASON
        ):
            return [SLOW_CONSUMER, Close(CloseCode.POLICY_VIOLATION, SLOW_CONSUMER_REASON, True)]
        return [SLOW_CONSUMER]

    def shed(self, reason: str) -> list[Action]:
        """The gateway's outbound budget is exceeded and this connection is among the
        furthest behind: 1013 at once, its queue dropped, even if it was closing already
        (its queue is what holds the memory)."""
        if self.state is State.CLOSED:
            return []
        self._request_close(pb.CLOSE_INITIATOR_GATEWAY, CloseCode.TRY_AGAIN_LATER, reason)
        return [Close(CloseCode.TRY_AGAIN_LATER, reason, True)]

    # -- delivery ------------------------------------------------------------------------

    def reply(self, outcome: Reply, now: float, *, worker: str = "") -> list[Action]:
        """What came back for the copy of the event in flight published last (``worker``:
        whom a final ack named as the holder of the object's activation).

        - ACKED: delivered; the next event, if any, is published.
        - PROGRESS: the worker is alive and busy: a fresh ack deadline, and a fresh
          delivery deadline.
        - past the delivery deadline (``delivery_timeout_s`` since the first publish or
          the last progress), anything else: given up. A message event given up closes
          the connection with 1013.
        - published to a worker (the hint) and anything else: the hint is dropped and the
          event goes to the queue again at once.
        - NO_RESPONDERS or RETRY: published again after a backoff (50 ms doubling to 1 s,
          never past the delivery deadline): call :meth:`tick` at :attr:`retry_at`.
        - TIMEOUT: published again at once.

        Every copy after the first is marked ``redelivered``, with the same sequence.
        """
        flight = self._flight
        if flight is None:
            raise RuntimeError(f"a reply for {self.connection_id} with nothing in flight")
        limits = self.limits
        if outcome is Reply.PROGRESS:
            flight.give_up_at = now + limits.delivery_timeout_s
            flight.ack_deadline = now + limits.ack_timeout_s
            return []
        flight.ack_deadline = None
        if outcome is Reply.ACKED:
            self.worker = worker
            event = flight.event
            if event.closed is None:
                self.acked_through = max(self.acked_through, event.sequence)
            actions: list[Action] = [_new(Delivered, (event, now - flight.started))]
            self._settled(actions, now)
            return actions
        if now >= flight.give_up_at:
            return self.give_up(now)
        if flight.worker:
            # The activation's host did not take it: back to the queue, at once.
            self.worker = ""
            return [self._republish(flight, now)]
        if outcome is Reply.TIMEOUT:
            return [self._republish(flight, now)]
        # No worker subscribed right now (all restarting), or the object is moving: retry
        # soon, not at once.
        flight.retry_at = now + min(flight.backoff_s, max(0.0, flight.give_up_at - now))
        flight.backoff_s = min(flight.backoff_s * 2, MAX_BACKOFF_S)
        return []

    def give_up(self, now: float) -> list[Action]:
        """The event in flight is given up: no reply can come (its delivery deadline
        passed, or the bus is gone for good)."""
        flight = self._flight
        if flight is None:
            raise RuntimeError(f"nothing in flight for {self.connection_id} to give up")
        event = flight.event
        actions: list[Action] = [GaveUp(event)]
        if event.closed is None and self._request_close(
            pb.CLOSE_INITIATOR_GATEWAY, CloseCode.TRY_AGAIN_LATER, NO_WORKER_REASON
        ):
            actions.append(Close(CloseCode.TRY_AGAIN_LATER, NO_WORKER_REASON))
        self._settled(actions, now)
        return actions

    def tick(self, now: float) -> list[Action]:
        """Time passed: the event in flight is published again at its retry time, or
        handled as TIMEOUT past its ack deadline; an open connection with nothing in
        flight that read nothing for ``idle_timeout_s`` closes with 1001."""
        flight = self._flight
        if flight is not None:
            if flight.retry_at is not None and now >= flight.retry_at:
                return [self._republish(flight, now)]
            if flight.ack_deadline is not None and now >= flight.ack_deadline:
                return self.reply(Reply.TIMEOUT, now)
            return []
        idle = self.limits.idle_timeout_s
        if idle and self.state is State.OPEN and now >= self._last_read + idle:
            return self.close(CloseCode.GOING_AWAY, IDLE_REASON)
        return []

    # -- inside --------------------------------------------------------------------------

    def _request_close(
        self, initiator: pb.CloseInitiator.ValueType, code: int, reason: str
    ) -> bool:
        """Record a request to close. Only the first counts; returns whether it was first."""
        if self._initiator is not None or self.state is State.CLOSED:
            return False
        self._initiator = initiator
        self._close_code = code
        self._close_reason = reason
        if self.state is State.OPEN:
            self.state = State.CLOSING
        return True

    def _close_now(
        self, initiator: pb.CloseInitiator.ValueType, code: int, reason: str
    ) -> list[Action]:
        if self._request_close(initiator, code, reason):
            return [Close(code, reason)]
        return []

    def _event(self, *, data: str | bytes | None = None, closed: pb.Closed | None = None) -> Event:
        self._sequence += 1
        fields = self._fields
        if fields is None:
            # Kept from the first event on: an idle connection that never sent holds none.
            fields = self._fields = (
                string_field(1, self.connection_id),
                string_field(4, self.path),
            )
        return Event(
            self.connection_id,
            self._sequence,
            self.path,
            data=data,
            closed=closed,
            head=fields[0],
            path_field=fields[1],
        )

    def _enqueue(self, actions: list[Action], event: Event, now: float) -> None:
        if self._flight is None:
            actions.append(self._take_off(event, now))
        else:
            if self._queue is None:
                self._queue = collections.deque()
            self._queue.append(event)

    def _take_off(self, event: Event, now: float) -> Publish:
        limits = self.limits
        event.ack_wait_ms = int(limits.ack_timeout_s * 1000)
        flight = self._flight = _Flight(event, now, limits)
        flight.worker = self.worker
        flight.ack_deadline = now + limits.ack_timeout_s
        return _new(Publish, (event, flight.worker))

    def _republish(self, flight: _Flight, now: float) -> Publish:
        flight.retry_at = None
        flight.event.redelivered = True
        flight.worker = self.worker
        flight.ack_deadline = now + self.limits.ack_timeout_s
        return Publish(flight.event, flight.worker)

    def _settled(self, actions: list[Action], now: float) -> None:
        """The event in flight is done: the next one takes off."""
        self._flight = None
        self._last_read = now  # the idle clock runs from when reading resumes
        queue = self._queue
        if queue:
            actions.append(self._take_off(queue.popleft(), now))
            if not queue:
                self._queue = None

    def _keep_early(self, command: pb.GatewayCommand) -> list[Action]:
        # The object may have committed the join and run its next turn already: that
        # turn's broadcast can be handled before the upgrade sees the decision (another
        # NATS subscription, another task), and a member that joined would miss a post
        # that is neither in its replay nor sent to it live. Kept for it.
        early = self._early
        if early is None:
            early = self._early = _Early()
        if early.overflowed:
            return [SLOW_CONSUMER]
        size = command.ByteSize()
        if early.size + size > self.limits.max_outbound_bytes:
            early.overflowed = True
            early.commands.clear()
            return [SLOW_CONSUMER]
        early.size += size
        early.commands.append(command)
        return []

    def _apply_command(self, actions: list[Action], command: pb.GatewayCommand) -> None:
        if self.state is not State.OPEN:
            # The connection is gone or closing: count it, never loop.
            actions.append(UNKNOWN_CONNECTION)
            return
        if command.in_reply_to > self._sequence:
            # In reply to an event this connection has not produced: no worker sent it.
            actions.append(Count("garbage", "command"))
            return
        if 0 < command.in_reply_to <= self.acked_through:
            # That event was acknowledged already: this is a stale copy's work.
            actions.append(STALE)
            return
        if command.WhichOneof("action") == "send":
            self._push_message(actions, command.send, "command")
        else:
            # The code and reason were checked when the command was read.
            close = command.close
            if self._request_close(pb.CLOSE_INITIATOR_APP, close.code, close.reason):
                actions.append(Close(close.code, close.reason))

    def _push_message(self, actions: list[Action], message: pb.Message, subject: str) -> None:
        text = message.text
        if text:
            # Set, as a oneof's unset member reads empty: no WhichOneof (a lookup by name).
            actions.append(_new(Write, (text,)))
            actions.append(MESSAGE_OUT)
            return
        kind = message.WhichOneof("data")
        if kind == "text":
            actions.append(Write(text))
        elif kind == "binary":
            actions.append(Write(message.binary))
        else:
            actions.append(Count("garbage", subject))
            return
        actions.append(MESSAGE_OUT)
