"""A handle on one client connection, usable from any worker.

A worker holds no sockets: what a handler sends goes to the gateway that owns the
connection (its id names it). Sends are buffered (a :class:`~wsgate.worker.send_buffer.SendBuffer`
per handle) and leave in order, by the cheapest way that keeps that order:

- in ``on_connect`` the socket does not exist yet, so they travel inside the Accept and
  are written right after the 101;
- in an event handler they go with the event's final ack when the handler finishes
  without waiting on anything else (the common case: one NATS message instead of two);
- when the handler waits on something after sending (a storage call, a sleep), what is
  buffered is published as commands at once, so a long handler streams as it goes.

The worker drives a handle through its public methods only: :meth:`Connection.end_connect`
after ``on_connect``, :meth:`Connection.end_event` or :meth:`Connection.abandon_output`
after an event handler, and :meth:`Connection.flush` before another way of sending
(``env.send_many``, a broadcast), so that what the handler sent first leaves first.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from wsgate.closecodes import MAX_REASON_BYTES, CloseCode, is_sendable
from wsgate.v1 import envelope_pb2 as pb
from wsgate.values import StorableValue, Value
from wsgate.worker.errors import (
    ConnectionClosed,
    InvalidCloseCode,
    NoConnectionState,
    NotAccepted,
)
from wsgate.worker.gate import OutputGate
from wsgate.worker.messages import encoded_message
from wsgate.worker.send_buffer import CommandSink, SendBuffer

if TYPE_CHECKING:
    from wsgate.worker.env import Env


#: The connection whose event handler is running in this context, so that other ways of
#: sending (Env.send_many) can first flush what it buffered and keep the order.
current_connection: contextvars.ContextVar[Connection | None] = contextvars.ContextVar(
    "wsgate_current_connection", default=None
)


class Phase(enum.Enum):
    """Where a handle is in its handler call: what it may still do."""

    CONNECTING = "connecting"  # in on_connect: sends are buffered into the Accept
    OPEN = "open"
    CLOSED = "closed"  # closed by this handler, or the close event is being handled


# The members bound once: on Python 3.11 reading an Enum member off its class costs about
# four times a plain attribute, and a handle reads them several times per event.
_CONNECTING = Phase.CONNECTING
_OPEN = Phase.OPEN
_CLOSED = Phase.CLOSED

_NO_STATE = (
    "conn.state exists in a durable object's handlers once the connection is accepted; "
    "in on_connect, return Accept(state=...)"
)
_NO_TAGS = (
    "conn.tags exist in a durable object's handlers once the connection is accepted; "
    "in on_connect, return Accept(tags=...)"
)


class Connection:
    """One client connection, as seen by a handler.

    Valid for the duration of one handler call; another event for the same connection
    gets a new handle (workers are stateless). ``send`` after ``close`` (or in
    ``on_close``) raises ConnectionClosed.
    """

    def __init__(
        self,
        connection_id: str,
        path: str,
        params: Mapping[str, str],
        *,
        sink: CommandSink,
        env: Env,
        connecting: bool = False,
        closed: bool = False,
        sequence: int = 0,
        redelivered: bool = False,
        gate: OutputGate | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.id = connection_id
        self.path = path
        #: Values of the route's ``{name}`` segments.
        self.params: Mapping[str, str] = params
        #: The worker's environment: durable object storage and the like.
        self.env = env
        #: The sequence of the event being handled (0 in on_connect). With ``id`` it is the
        #: event's idempotency key: a redelivered event has the same one.
        self.sequence = sequence
        #: True when this event was sent before and not acknowledged in time: its handler
        #: may already have run, fully or in part (at-least-once delivery).
        self.redelivered = redelivered
        self._sink = sink
        # Output waits for the storage writes of the same handler run (the output gate).
        self._gate = gate
        self._phase = _CLOSED if closed else _CONNECTING if connecting else _OPEN
        # Passed the loop where known: asyncio.get_running_loop() costs a getpid() on 3.11.
        # Positional: keyword arguments cost more per call, and this runs for every event.
        self._buffer = SendBuffer(sink, connection_id, sequence, gate, loop)

    @property
    def closed(self) -> bool:
        """Whether this handle can no longer send."""
        return self._phase is _CLOSED

    @property
    def state(self) -> Value:
        """This connection's state in its durable object (its attachment): what
        ``Accept(state=...)`` gave, or what was assigned since.

        Assigning stores a new state (a storable value, at most 16 KiB encoded), committed
        with the turn. Only a durable object's handle has one
        (:class:`~wsgate.worker.object_connection.ObjectConnection`, once the connection is
        accepted), which raises InvalidValue for a value that cannot be stored. This one
        raises NoConnectionState both ways, as the object's does in ``on_connect``.
        """
        raise NoConnectionState(_NO_STATE)

    @state.setter
    def state(self, value: StorableValue) -> None:
        raise NoConnectionState(_NO_STATE)

    @property
    def tags(self) -> tuple[str, ...]:
        """This connection's tags in its durable object: what ``Accept(tags=...)`` gave, or
        what was set since. Changeable while connected (Cloudflare's tags are not):
        assigning a sequence of str replaces them, :meth:`add_tags` and
        :meth:`remove_tags` change some, each at most 10 tags of 1 to 256 characters
        (TooManyTags, TagTooLarge), committed with the turn. Broadcasts and
        ``connections(tag)`` see the change at once, in this turn and the next ones.

        Only a durable object's handle has tags (once the connection is accepted); this one
        raises NoConnectionState, as the object's does in ``on_connect``."""
        raise NoConnectionState(_NO_TAGS)

    @tags.setter
    def tags(self, tags: Iterable[str]) -> None:
        raise NoConnectionState(_NO_TAGS)

    def add_tags(self, *tags: str) -> tuple[str, ...]:
        """Add ``tags`` (those it has already are kept where they are); the tags now."""
        current = self.tags
        self.tags = (*current, *(tag for tag in dict.fromkeys(tags) if tag not in current))
        return self.tags

    def remove_tags(self, *tags: str) -> tuple[str, ...]:
        """Remove ``tags`` (those it does not have are ignored); the tags now."""
        gone = set(tags)
        self.tags = tuple(tag for tag in self.tags if tag not in gone)
        return self.tags

    async def send(self, message: str | bytes | bytearray | memoryview) -> None:
        """Send a text (``str``) or binary (bytes-like) message to the client.

        Messages arrive in the order sent. Raises InvalidMessage for other types and
        ConnectionClosed once closed.
        """
        envelope = encoded_message(message, "send()")
        phase = self._phase
        if phase is _CLOSED:
            raise ConnectionClosed(self.id)
        full = self._buffer.append(envelope, len(message))
        if phase is _OPEN:  # in on_connect, everything waits for the Accept
            if full:
                await self._buffer.flush()
            else:
                # Runs only if the handler yields to the loop before finishing.
                self._buffer.flush_soon()

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close the connection with ``code`` (1000, or 3000-4999 for the app's own) and
        ``reason`` (at most 123 bytes of UTF-8). Messages sent before are delivered first.

        Raises InvalidCloseCode, ConnectionClosed if already closed, NotAccepted in the
        connect handler (return ``Reject(...)`` there instead).
        """
        self._start_closing(code, reason)
        if self._gate is not None:
            await self._gate.open()
        for envelope in await self._buffer.finish():  # what was sent before goes first
            await self._sink.send_command(
                self.id,
                pb.GatewayCommand(
                    connection_ids=[self.id],
                    send=pb.Message.FromString(envelope),
                    in_reply_to=self.sequence,
                ),
            )
        await self._sink.send_command(
            self.id,
            pb.GatewayCommand(
                connection_ids=[self.id],
                close=pb.CloseConnection(code=code, reason=reason),
                in_reply_to=self.sequence,
            ),
        )

    def _start_closing(self, code: int, reason: str) -> None:
        """Check a close (InvalidCloseCode, NotAccepted, ConnectionClosed) and mark the
        handle closed: nothing more can be sent on it."""
        reason_bytes = len(reason.encode("utf-8"))
        if not is_sendable(code):
            raise InvalidCloseCode(
                code, reason_bytes, f"close code {code} may not be sent (use 1000 or 3000-4999)"
            )
        if reason_bytes > MAX_REASON_BYTES:
            raise InvalidCloseCode(
                code, reason_bytes, f"close reason is {reason_bytes} bytes, over {MAX_REASON_BYTES}"
            )
        if self._phase is Phase.CONNECTING:
            raise NotAccepted(self.id, "cannot close before accepting: return Reject(...) instead")
        if self._phase is Phase.CLOSED:
            raise ConnectionClosed(self.id)
        self._phase = Phase.CLOSED

    # -- for the worker (handlers never call these) -------------------------------------

    def end_connect(self) -> list[pb.Message]:
        """After ``on_connect`` accepted: return what it sent (it travels in the Accept);
        the handle is open from now on."""
        self._phase = Phase.OPEN
        return self._buffer.take()

    async def end_event(self) -> list[bytes]:
        """After an event handler: wait for sends already being published, and return
        what is still buffered, serialized (``Message`` envelopes), to go with the final
        ack."""
        return await self._buffer.finish()

    def take_event_output(self) -> list[bytes] | None:
        """:meth:`end_event` without waiting, when there is nothing to wait for (no flush
        in flight): what is still buffered; None otherwise (then ``await end_event()``)."""
        return self._buffer.finish_nowait()

    def abandon_output(self) -> None:
        """Drop what is buffered or still being published: the handler failed, and the
        output its gate held goes with it."""
        self._buffer.discard()

    async def flush(self) -> None:
        """Publish what this handle has buffered now, as commands, after what is already
        being published. Called before another way of sending (``env.send_many``, a
        broadcast), so that what the running handler sent first arrives first. Returns at
        once when nothing is buffered."""
        await self._buffer.flush()

    def __repr__(self) -> str:
        return f"<Connection {self.id} {self.path} {self._phase.value}>"
