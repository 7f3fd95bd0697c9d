"""A connection as a durable object's handler sees it: what it sends joins the turn.

Same API as :class:`~wsgate.worker.connection.Connection` (it is one). Nothing leaves the worker
while the handler runs: messages and the close are the turn's output, released in order
once the turn has committed (the output gate), riding on the event's ack when they can.
``conn.state`` is the connection's attachment in the object, and ``conn.tags`` its tags, from
the activation's memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from wsgate.closecodes import CloseCode
from wsgate.v1 import envelope_pb2 as pb
from wsgate.values import StorableValue, Value
from wsgate.worker.connection import Connection, Phase
from wsgate.worker.errors import ConnectionClosed, NoConnectionState
from wsgate.worker.messages import message_envelope

if TYPE_CHECKING:
    from wsgate.worker.activation import Activation
    from wsgate.worker.turn import Turn


class _NoSink:
    """Connections of an activation publish nothing themselves."""

    async def send_command(self, connection_id: str, command: pb.GatewayCommand) -> None:
        raise AssertionError("an activation's connection handle publishes through its turn")


_NO_SINK = _NoSink()


class ObjectConnection(Connection):
    """The connection whose event a turn of a durable object handles."""

    def __init__(
        self,
        activation: Activation,
        turn: Turn,
        connection_id: str,
        path: str,
        params: Mapping[str, str],
        *,
        connecting: bool = False,
        closed: bool = False,
        sequence: int = 0,
        redelivered: bool = False,
    ) -> None:
        super().__init__(
            connection_id,
            path,
            params,
            sink=_NO_SINK,
            env=activation.env,
            connecting=connecting,
            closed=closed,
            sequence=sequence,
            redelivered=redelivered,
        )
        self._activation = activation
        self._turn = turn

    @property
    def state(self) -> Value:
        """This connection's attachment in the object (see :attr:`Connection.state`)."""
        if self._phase is Phase.CONNECTING:
            raise NoConnectionState(
                "in on_connect the connection is not accepted yet: return Accept(state=...)"
            )
        return self._activation.members.attachment_of(self.id)

    @state.setter
    def state(self, value: StorableValue) -> None:
        if self._phase is Phase.CONNECTING:
            raise NoConnectionState(
                "in on_connect the connection is not accepted yet: return Accept(state=...)"
            )
        self._activation.members.set_attachment(self._turn, self.id, value)

    @property
    def tags(self) -> tuple[str, ...]:
        """This connection's tags in the object (see :attr:`Connection.tags`)."""
        if self._phase is Phase.CONNECTING:
            raise NoConnectionState(
                "in on_connect the connection is not accepted yet: return Accept(tags=...)"
            )
        return self._activation.members.tags_of(self.id)

    @tags.setter
    def tags(self, tags: Iterable[str]) -> None:
        if self._phase is Phase.CONNECTING:
            raise NoConnectionState(
                "in on_connect the connection is not accepted yet: return Accept(tags=...)"
            )
        if self._phase is Phase.CLOSED:
            raise ConnectionClosed(self.id)
        if isinstance(tags, str):
            raise TypeError("tags are a sequence of str, not one str: use [tag]")
        self._activation.members.set_tags(self._turn, self.id, tags)

    async def send(self, message: str | bytes | bytearray | memoryview) -> None:
        """Send a message to the client; it leaves once the turn has committed."""
        envelope = message_envelope(message, "send()")
        if self._phase is Phase.CLOSED:
            raise ConnectionClosed(self.id)
        self._turn.reply(envelope)

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close the connection (after what was sent before), once the turn committed.

        Raises InvalidCloseCode, ConnectionClosed if already closed, NotAccepted in
        ``on_connect`` (return ``Reject(...)`` there instead).
        """
        self._start_closing(code, reason)
        self._turn.close(code, reason)
