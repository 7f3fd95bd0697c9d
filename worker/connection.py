"""A handle on one client connection, usable from any worker.

A worker holds no sockets: ``send`` and ``close`` publish a command to the gateway that
owns the connection (its id names it). In the connect handler the socket does not exist
yet, so what is sent there travels inside the Accept and is written right after the 101.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from worker.errors import (
    ConnectionClosed,
    InvalidCloseCode,
    InvalidMessage,
    NotAccepted,
)
from wsgate.closecodes import MAX_REASON_BYTES, CloseCode, is_sendable
from wsgate.v1 import envelope_pb2 as pb

if TYPE_CHECKING:
    from worker.env import Env


class CommandSink(Protocol):
    """Where commands for gateways go (NATS in a worker)."""

    async def send_command(self, connection_id: str, command: pb.GatewayCommand) -> None:
        """Deliver ``command`` to the gateway that holds ``connection_id``."""
        ...


class _Phase(enum.Enum):
    CONNECTING = "connecting"  # in on_connect: sends are buffered into the Accept
    OPEN = "open"
    CLOSED = "closed"  # closed by this handler, or the close event is being handled


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
    ) -> None:
        self.id = connection_id
        self.path = path
        #: Values of the route's ``{name}`` segments.
        self.params: Mapping[str, str] = dict(params)
        #: The worker's environment: durable object storage and the like.
        self.env = env
        #: The sequence of the event being handled (0 in on_connect). With ``id`` it is the
        #: event's idempotency key: a redelivered event has the same one.
        self.sequence = sequence
        #: True when this event was sent before and not acknowledged in time: its handler
        #: may already have run, fully or in part (at-least-once delivery).
        self.redelivered = redelivered
        self._sink = sink
        self._phase = _Phase.CLOSED if closed else _Phase.CONNECTING if connecting else _Phase.OPEN
        self._pending: list[pb.Message] = []

    @property
    def closed(self) -> bool:
        """Whether this handle can no longer send."""
        return self._phase is _Phase.CLOSED

    async def send(self, message: str | bytes | bytearray | memoryview) -> None:
        """Send a text (``str``) or binary (bytes-like) message to the client.

        Messages from one handler arrive in the order sent. Raises InvalidMessage for
        other types and ConnectionClosed once closed.
        """
        if isinstance(message, str):
            envelope = pb.Message(text=message)
        elif isinstance(message, (bytes, bytearray, memoryview)):
            envelope = pb.Message(binary=bytes(message))
        else:
            raise InvalidMessage(
                f"send() takes str (text) or bytes (binary), not {type(message).__name__}"
            )
        if self._phase is _Phase.CLOSED:
            raise ConnectionClosed(self.id)
        if self._phase is _Phase.CONNECTING:
            self._pending.append(envelope)
            return
        await self._sink.send_command(
            self.id,
            pb.GatewayCommand(connection_ids=[self.id], send=envelope, in_reply_to=self.sequence),
        )

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close the connection with ``code`` (1000, or 3000-4999 for the app's own) and
        ``reason`` (at most 123 bytes of UTF-8). Messages sent before are delivered first.

        Raises InvalidCloseCode, ConnectionClosed if already closed, NotAccepted in the
        connect handler (return ``Reject(...)`` there instead).
        """
        reason_bytes = len(reason.encode("utf-8"))
        if not is_sendable(code):
            raise InvalidCloseCode(
                code, reason_bytes, f"close code {code} may not be sent (use 1000 or 3000-4999)"
            )
        if reason_bytes > MAX_REASON_BYTES:
            raise InvalidCloseCode(
                code, reason_bytes, f"close reason is {reason_bytes} bytes, over {MAX_REASON_BYTES}"
            )
        if self._phase is _Phase.CONNECTING:
            raise NotAccepted(self.id, "cannot close before accepting: return Reject(...) instead")
        if self._phase is _Phase.CLOSED:
            raise ConnectionClosed(self.id)
        self._phase = _Phase.CLOSED
        await self._sink.send_command(
            self.id,
            pb.GatewayCommand(
                connection_ids=[self.id],
                close=pb.CloseConnection(code=code, reason=reason),
                in_reply_to=self.sequence,
            ),
        )

    def _take_pending(self) -> list[pb.Message]:
        """The messages sent during connect; the handle is open from now on."""
        pending, self._pending = self._pending, []
        self._phase = _Phase.OPEN
        return pending

    def __repr__(self) -> str:
        return f"<Connection {self.id} {self.path} {self._phase.value}>"
