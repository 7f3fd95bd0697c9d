"""The workers' client of the state service: durable object storage over gRPC.

::

    async with StateClient("127.0.0.1:7070") as state:
        room = state.storage("room", "lobby")
        await room.put("topic", {"text": "hello", "votes": [1, 2]})
        topic = await room.get("topic")

Values go through :mod:`wsgate.values`: a value that cannot be stored raises InvalidValue
here, before any call. Limits (key and value sizes) and the object id are checked by the
state service, the one authority on them, and come back as the same typed exceptions
(:class:`~wsgate.errors.KeyTooLarge` with ``size``, ``limit`` and ``key``, ...).
"""

from __future__ import annotations

import enum
from typing import Any

import grpc

from wsgate.service import StartsAndCloses
from wsgate.state_errors import exception_from_rpc_error
from wsgate.v1 import state_pb2 as pb
from wsgate.v1 import state_pb2_grpc
from wsgate.values import decode_value, encode_value

#: The largest ``limit`` the wire carries (a uint32); larger ones mean "no limit".
_MAX_WIRE_LIMIT = 2**32 - 1

_CHANNEL_OPTIONS = (
    # A list answer is bounded by what the object holds, not by gRPC's 4 MiB default;
    # the caller bounds it with ``limit``.
    ("grpc.max_receive_message_length", -1),
    # After the state service restarts, reconnect within seconds: the default backoff
    # grows to 120 s, failing every call fast with UNAVAILABLE meanwhile.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


class ClientPhase(enum.Enum):
    """The client's lifecycle; it only moves forward."""

    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class StateClient(StartsAndCloses):
    """A gRPC channel to one state service.

    Use ``async with StateClient(address)`` or call :meth:`start`, then :meth:`close`.
    ``start`` does not wait for the service: the channel connects on the first call, so a
    worker may start before the state service; calls made while it cannot be reached
    raise StateUnavailable. Each call has a deadline of ``timeout_s`` seconds
    (StateTimeout after it).
    """

    def __init__(self, address: str, *, timeout_s: float = 5.0) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.address = address
        self.timeout_s = timeout_s
        self.phase = ClientPhase.NEW
        self._channel: Any = None  # grpc.aio.Channel while open
        self._stub: Any = None  # state_pb2_grpc.StateStub while open

    async def start(self) -> None:
        """Create the channel. Idempotent while open; RuntimeError once closed."""
        if self.phase is ClientPhase.OPEN:
            return
        if self.phase is ClientPhase.CLOSED:
            raise RuntimeError("state client is closed; make a new StateClient")
        self._channel = grpc.aio.insecure_channel(self.address, options=_CHANNEL_OPTIONS)
        self._stub = state_pb2_grpc.StateStub(self._channel)
        self.phase = ClientPhase.OPEN

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled. Idempotent."""
        if self.phase is ClientPhase.CLOSED:
            return
        self.phase = ClientPhase.CLOSED
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()

    async def wait_closed(self) -> None:
        """Nothing to wait for once :meth:`close` returned; here for the common lifecycle."""

    def storage(self, namespace: str, name: str) -> ObjectStorage:
        """The storage of the durable object ``name`` in ``namespace``.

        Cheap (no call is made); usable once the client is started. An empty namespace is
        refused by the service at the first call (InvalidObjectId).
        """
        return ObjectStorage(self, namespace, name)

    async def _call(self, method: str, request: Any) -> Any:
        stub = self._stub
        if self.phase is not ClientPhase.OPEN or stub is None:
            raise RuntimeError(f"state client is {self.phase.value}, not open")
        try:
            return await getattr(stub, method)(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise exception_from_rpc_error(exc, method) from exc


class ObjectStorage:
    """Key/value storage of one durable object, as a handler sees it.

    Keys are str (at most 2 KiB of UTF-8); values are what :mod:`wsgate.values` stores
    (JSON types plus bytes, at most 128 KiB encoded). Every method raises
    StateUnavailable, StateTimeout, or the refusal's own StateError (KeyTooLarge,
    ValueTooLarge, InvalidValue, InvalidObjectId).
    """

    def __init__(self, client: StateClient, namespace: str, name: str) -> None:
        self._client = client
        self.namespace = namespace
        self.name = name
        self._object = pb.ObjectId(namespace=namespace, name=name)

    def __repr__(self) -> str:
        return f"<ObjectStorage {self.namespace!r}/{self.name!r}>"

    async def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` if it does not exist."""
        response = await self._client._call("Get", pb.GetRequest(object=self._object, key=key))
        if not response.found:
            return default
        return decode_value(response.value)

    async def put(self, key: str, value: Any) -> None:
        """Set ``key`` to ``value``; durable once this returns.

        Raises InvalidValue (before any call) if ``value`` cannot be stored.
        """
        encoded = encode_value(value)
        await self._client._call("Put", pb.PutRequest(object=self._object, key=key, value=encoded))

    async def delete(self, key: str) -> bool:
        """Delete ``key``; durable once this returns. Returns whether it existed."""
        response = await self._client._call(
            "Delete", pb.DeleteRequest(object=self._object, key=key)
        )
        return bool(response.deleted)

    async def list(
        self,
        *,
        prefix: str = "",
        start: str | None = None,
        end: str | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> dict[str, Any]:
        """The entries whose keys start with ``prefix``, are ``>= start`` and ``< end``,
        as a dict in ascending UTF-8 byte order of keys (descending if ``reverse``).

        ``limit`` keeps the first entries in that order (with ``reverse``, the greatest
        keys); None means all, 0 means none. Raises ValueError for a negative limit.
        """
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        if limit == 0:
            # The wire's 0 means "no limit", so "none" is answered here.
            return {}
        wire_limit = 0 if limit is None or limit > _MAX_WIRE_LIMIT else limit
        request = pb.ListRequest(
            object=self._object, prefix=prefix, limit=wire_limit, reverse=reverse
        )
        if start is not None:
            request.start = start
        if end is not None:
            request.end = end
        response = await self._client._call("List", request)
        return {entry.key: decode_value(entry.value) for entry in response.entries}
