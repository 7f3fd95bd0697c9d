"""What a handler can reach besides its connection: the worker's environment."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING

from wsgate import ids
from wsgate.errors import CallUnavailable
from wsgate.v1 import envelope_pb2 as pb
from wsgate.worker.alarms_client import ObjectAlarm
from wsgate.worker.connection import current_connection
from wsgate.worker.gate import open_current_gate
from wsgate.worker.membership import ObjectMembers
from wsgate.worker.messages import message_envelope
from wsgate.worker.object_calls import ObjectCalls, ObjectNamespace
from wsgate.worker.object_storage import ObjectStorage
from wsgate.worker.state_client import StateClient
from wsgate.worker.turn import current_turn

if TYPE_CHECKING:
    from wsgate.worker.activation import Activation
    from wsgate.worker.send_buffer import CommandSink


class Env:
    """Shared by every handler call of one worker process.

    ``env.storage("counter", name)`` gives the storage of one durable object; any worker
    reaches the same object through the state service. ``env.objects("Counter").get(name)``
    calls its methods, as turns of its activation. ``env.send_many(ids, message)``
    sends one message to many connections wherever they are.
    """

    def __init__(self, state: StateClient, sink: CommandSink) -> None:
        self._state = state
        self._sink = sink
        self._calls: ObjectCalls | None = None

    def bind_calls(self, calls: ObjectCalls) -> None:
        """Make calls of objects' methods with ``calls`` (the worker does, once on NATS)."""
        self._calls = calls

    def objects(self, namespace: str) -> ObjectNamespace:
        """The durable objects of ``namespace`` (a durable class's ``namespace``, by default
        its class name), to call their methods::

            total = await env.objects("Counter").get("clicks").call("add", 2)

        Each call runs as one turn of the object's activation, wherever it is, and returns
        the method's value once the turn's writes are durable (see
        :mod:`wsgate.worker.object_calls`). Raises CallUnavailable here outside a worker
        (no NATS connection to call over).
        """
        if self._calls is None:
            raise CallUnavailable(
                "calls of durable objects need a running worker (env.objects in a handler)",
                namespace=namespace,
            )
        return ObjectNamespace(self._calls, namespace)

    def storage(self, namespace: str, name: str) -> ObjectStorage:
        """The key/value storage of the object ``name`` in ``namespace``.

        In a durable object's own handler, its own object's storage is the activation's
        (``self.storage``). Any other object is reached through the state service: reads
        see what it committed; writes to an object that an activation holds are refused
        (ObjectActive), since the activation is its one writer.
        """
        activation = _own_activation(namespace, name)
        if activation is not None:
            return activation.storage
        return self._state.storage(namespace, name)

    def members(self, namespace: str, name: str) -> ObjectMembers:
        """The connections accepted into the object ``name`` in ``namespace`` (membership,
        tags, attachments, broadcast): see :mod:`wsgate.worker.membership`."""
        return ObjectMembers(self._state, namespace, name)

    def alarm(self, namespace: str, name: str) -> ObjectAlarm:
        """The alarm of the object ``name`` in ``namespace`` (see
        :mod:`wsgate.worker.alarms_client`; in the object's own handler, its activation's)."""
        activation = _own_activation(namespace, name)
        if activation is not None:
            return activation.alarm
        return ObjectAlarm(self._state, namespace, name)

    async def send_many(
        self, connection_ids: Iterable[str], message: str | bytes | bytearray | memoryview
    ) -> int:
        """Send ``message`` to every listed connection: one command per gateway that holds
        any of them, never one per connection. Connections that are gone are skipped by
        their gateway. Returns the number of commands published.

        Raises InvalidMessage for a message that is neither str nor bytes-like, and
        InvalidConnectionId for an id that is not one.
        """
        envelope = message_envelope(message, "send_many()")
        turn = current_turn.get()
        if turn is not None:
            # In a durable object's turn: output of the turn, released once it committed.
            return turn.send_to(list(connection_ids), envelope)
        # Output: only once the running handler's writes are durable (the output gate).
        await open_current_gate()
        sender = current_connection.get()
        if sender is not None:
            # What the running handler sent to its own connection goes first.
            await sender.flush()
        by_gateway: defaultdict[str, list[str]] = defaultdict(list)
        for connection_id in connection_ids:
            by_gateway[ids.gateway_of(connection_id)].append(connection_id)
        for members in by_gateway.values():
            command = pb.GatewayCommand(connection_ids=members, send=envelope)
            await self._sink.send_command(members[0], command)
        return len(by_gateway)


def _own_activation(namespace: str, name: str) -> Activation | None:
    """The activation of (``namespace``, ``name``) if this runs in one of its turns."""
    turn = current_turn.get()
    if turn is None:
        return None
    activation = turn.activation
    return activation if (activation.namespace, activation.name) == (namespace, name) else None
