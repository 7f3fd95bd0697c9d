"""The server API over gRPC (``proto/wsgate/v1/api.proto``, service ``ServerApi``), on
``WSGATE_API_GRPC_PORT``: the calls of the HTTP/JSON API, with values in the storage
codec (``wsgate.v1.Value``, bytes included) instead of JSON.

The token comes in the metadata ``authorization: Bearer <token>``. A failure is the gRPC
status of its :class:`~wsgate.worker.server_api.ApiError`'s HTTP status, with details
``"<type>: <message>"``. TLS with ``WSGATE_API_TLS_CERT``/``_KEY``, as the HTTP API.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from wsgate.calls import decode_arguments
from wsgate.grpc_tls import ServerTls, add_port
from wsgate.v1 import api_pb2 as api
from wsgate.v1 import api_pb2_grpc
from wsgate.v1 import state_pb2 as state_pb
from wsgate.values import encode_optional, encode_value
from wsgate.worker.server_api import ApiError, ServerApi, api_error

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The gRPC status of each HTTP status the API answers.
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


class GrpcServerApi(api_pb2_grpc.ServerApiServicer):
    """The gRPC face of ``api``."""

    def __init__(self, api_: ServerApi) -> None:
        self._api = api_
        self._server: Any = None

    async def start(self, host: str, port: int) -> int:
        """Listen; the port bound."""
        config = self._api.config
        limit = config.api_max_body_bytes
        self._server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit)])
        api_pb2_grpc.add_ServerApiServicer_to_server(self, self._server)
        tls = (
            ServerTls.load(config.api_tls_cert, config.api_tls_key) if config.api_tls_cert else None
        )
        bound = add_port(self._server, f"{host}:{port}", tls)
        await self._server.start()
        return bound

    async def close(self) -> None:
        """Stop serving (calls under way get a second to finish). Idempotent."""
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(1.0)

    async def _run(self, context: Any, operation: Callable[[], Awaitable[T]]) -> T:
        """Check the token, run ``operation``, map its failure to a status."""
        try:
            metadata = dict(context.invocation_metadata() or ())
            self._api.authenticate(str(metadata.get("authorization", "")))
            return await operation()
        except Exception as exc:
            error = api_error(exc)
            if error is None:
                raise
            await _abort(context, error)

    # -- the calls -----------------------------------------------------------------------

    async def Send(self, request: api.ApiSendRequest, context: Any) -> api.ApiSendResponse:
        async def send() -> api.ApiSendResponse:
            await self._api.send(request.connection_id, _message(request.message))
            return api.ApiSendResponse()

        return await self._run(context, send)

    async def Close(self, request: api.ApiCloseRequest, context: Any) -> api.ApiCloseResponse:
        async def close() -> api.ApiCloseResponse:
            await self._api.close(request.connection_id, request.code, request.reason)
            return api.ApiCloseResponse()

        return await self._run(context, close)

    async def Broadcast(
        self, request: api.ApiBroadcastRequest, context: Any
    ) -> api.ApiBroadcastResponse:
        async def broadcast() -> api.ApiBroadcastResponse:
            result = await self._api.broadcast(
                request.object.namespace,
                request.object.name,
                _message(request.message),
                tag=request.tag if request.HasField("tag") else None,
                exclude=list(request.exclude),
            )
            return api.ApiBroadcastResponse(recipients=result.recipients, commands=result.commands)

        return await self._run(context, broadcast)

    async def Connections(
        self, request: api.ApiConnectionsRequest, context: Any
    ) -> api.ApiConnectionsResponse:
        async def connections() -> api.ApiConnectionsResponse:
            tag = request.tag if request.HasField("tag") else None
            found = await self._api.connections(request.object.namespace, request.object.name, tag)
            return api.ApiConnectionsResponse(
                connections=[
                    api.ApiConnection(id=m.id, tags=m.tags, state=encode_optional(m.attachment))
                    for m in found
                ]
            )

        return await self._run(context, connections)

    async def Call(self, request: api.ApiCallRequest, context: Any) -> api.ApiCallResponse:
        async def call() -> api.ApiCallResponse:
            args, kwargs = decode_arguments(request.arguments) if request.arguments else ([], {})
            obj = request.object
            value = await self._api.call(obj.namespace, obj.name, request.method, args, kwargs)
            return api.ApiCallResponse(value=encode_value(value))

        return await self._run(context, call)

    async def ListObjects(
        self, request: state_pb.ListObjectsRequest, context: Any
    ) -> state_pb.ListObjectsResponse:
        async def listing() -> state_pb.ListObjectsResponse:
            return await self._api.list_objects(
                request.namespace,
                prefix=request.prefix,
                after=request.after,
                limit=request.limit or 100,
            )

        return await self._run(context, listing)


def _message(message: Any) -> str | bytes:
    kind = message.WhichOneof("data")
    if kind == "text":
        return str(message.text)
    if kind == "binary":
        return bytes(message.binary)
    raise ApiError(400, "InvalidRequest", "the message has neither text nor binary")


async def _abort(context: Any, error: ApiError) -> NoReturn:
    code = _CODES.get(error.status, grpc.StatusCode.UNKNOWN)
    await context.abort(code, f"{error.kind}: {error}")
    raise AssertionError("context.abort returned")  # pragma: no cover
