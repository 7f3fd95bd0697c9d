"""The state service role: ``wsgate.v1.State`` over grpc.aio, backed by SQLite.

Besides ``wsgate.v1.State`` the server runs the standard gRPC health service
(``grpc.health.v1.Health``), which reports SERVING for ``""`` and ``"wsgate.v1.State"``
while the server accepts calls, and NOT_SERVING once it is closing; Kubernetes' gRPC
probes and ``grpc_health_probe`` read it.

Calls with bad input are refused with INVALID_ARGUMENT, a readable details string, and an
ErrorInfo in the trailing metadata (see :mod:`wsgate.state_errors`). The limits are
checked here, at the service boundary, and nowhere else.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Awaitable
from typing import Any, NoReturn, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from stateservice.limits import check_key, check_value_size
from stateservice.storage import ObjectId, SqliteStorage, Storage
from wsgate.config import StateConfig
from wsgate.service import Service
from wsgate.state_errors import REFUSAL_TYPES, Refusal, refusal_metadata
from wsgate.v1 import state_pb2 as pb
from wsgate.v1 import state_pb2_grpc
from wsgate.values import decode_value

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The health service's name for the State service (its full protobuf name).
STATE_SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["State"].full_name


class StateServer(Service):
    """One state service process's server.

    Use ``async with StateServer(config) as server`` or call :meth:`start`, then
    :meth:`close`. ``close`` is idempotent; :meth:`wait_closed` returns once it finished.
    """

    def __init__(self, config: StateConfig) -> None:
        super().__init__()
        self.config = config
        self._storage = SqliteStorage(config.db_path)
        self._server: Any = None  # grpc.aio.Server once started
        self._health: health_aio.HealthServicer | None = None
        self._port: int | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the database, listen, and report SERVING.

        Call once. Raises OSError if the address cannot be bound (the port is taken),
        ``sqlite3.Error`` or OSError if the database cannot be opened; the server is then
        closed.
        """
        self._enter_running()
        try:
            await self._storage.start()
            # No SO_REUSEPORT (gRPC's default is on): a second state service started on the
            # same port must fail, not silently share the traffic.
            server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            self._server = server
            health = health_aio.HealthServicer()
            self._health = health
            for service in ("", STATE_SERVICE_NAME):
                await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
            state_pb2_grpc.add_StateServicer_to_server(_StateServicer(self._storage), server)
            health_pb2_grpc.add_HealthServicer_to_server(health, server)
            target = f"{_host_for_address(self.config.host)}:{self.config.port}"
            try:
                self._port = server.add_insecure_port(target)
            except RuntimeError as exc:
                raise OSError(f"state service cannot listen on {target}: {exc}") from exc
            await server.start()
            for service in ("", STATE_SERVICE_NAME):
                await health.set(service, health_pb2.HealthCheckResponse.SERVING)
        except BaseException:
            await self.close()
            raise
        log.info("state service listening on %s, data in %s", self.address, self.config.db_path)

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0). Only after :meth:`start`."""
        if self._port is None:
            raise RuntimeError("state server not started")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` actually bound, as :class:`~worker.state_client.StateClient` takes."""
        return f"{_host_for_address(self.config.host)}:{self.port}"

    async def close(self, grace_s: float = 5.0) -> None:
        """Report NOT_SERVING, refuse new calls, let calls in flight finish for up to
        ``grace_s`` seconds (then cancel them), and close the database.

        Idempotent; a second caller waits for the first. A write cancelled by the deadline
        was not acknowledged, so its client sees an error, never a lost write.
        """
        if not await self._enter_closing():
            return
        try:
            if self._health is not None:
                await self._health.enter_graceful_shutdown()
            if self._server is not None:
                await self._server.stop(grace_s)
            # After the server: every handler has returned, so no write is left queued.
            await self._storage.close()
        finally:
            self._mark_closed()
            log.info("state service closed")


class _StateServicer(state_pb2_grpc.StateServicer):
    """``wsgate.v1.State``: checks each request, then hands it to the storage."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    async def Get(self, request: pb.GetRequest, context: Any) -> pb.GetResponse:
        try:
            obj = _object_id(request.object)
            check_key(request.key)
        except REFUSAL_TYPES as exc:
            await _refuse(context, exc)
        value = await _stored(context, self._storage.get(obj, request.key))
        if value is None:
            return pb.GetResponse(found=False)
        return pb.GetResponse(found=True, value=value)

    async def Put(self, request: pb.PutRequest, context: Any) -> pb.PutResponse:
        try:
            obj = _object_id(request.object)
            check_key(request.key)
            # Size first: it is cheap, and parsing a huge value is not.
            check_value_size(request.value, request.key)
            # Parsed only to refuse garbage; the bytes are stored as received.
            decode_value(request.value)
        except REFUSAL_TYPES as exc:
            await _refuse(context, exc)
        await _stored(context, self._storage.put(obj, request.key, request.value))
        return pb.PutResponse()

    async def Delete(self, request: pb.DeleteRequest, context: Any) -> pb.DeleteResponse:
        try:
            obj = _object_id(request.object)
            check_key(request.key)
        except REFUSAL_TYPES as exc:
            await _refuse(context, exc)
        deleted = await _stored(context, self._storage.delete(obj, request.key))
        return pb.DeleteResponse(deleted=deleted)

    async def List(self, request: pb.ListRequest, context: Any) -> pb.ListResponse:
        try:
            obj = _object_id(request.object)
        except REFUSAL_TYPES as exc:
            await _refuse(context, exc)
        entries = await _stored(
            context,
            self._storage.list(
                obj,
                prefix=request.prefix,
                start=request.start if request.HasField("start") else None,
                end=request.end if request.HasField("end") else None,
                # On the wire 0 means no limit (proto3 cannot tell 0 from unset).
                limit=request.limit or None,
                reverse=request.reverse,
            ),
        )
        return pb.ListResponse(entries=[pb.Entry(key=k, value=v) for k, v in entries])


def _object_id(message: pb.ObjectId) -> ObjectId:
    return ObjectId(message.namespace, message.name)


async def _refuse(context: Any, exc: Refusal) -> NoReturn:
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT, str(exc), trailing_metadata=refusal_metadata(exc)
    )
    raise AssertionError("unreachable: ServicerContext.abort() raises")


async def _stored(context: Any, operation: Awaitable[T]) -> T:
    try:
        return await operation
    except sqlite3.Error as exc:
        # The disk or the file failed; the transaction was rolled back, nothing was stored.
        log.exception("storage failed")
        await context.abort(grpc.StatusCode.INTERNAL, f"storage failed: {exc}")
        raise AssertionError("unreachable: ServicerContext.abort() raises") from exc


def _host_for_address(host: str) -> str:
    # An IPv6 literal needs brackets before ":port".
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
