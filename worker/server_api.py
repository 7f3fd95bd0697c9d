"""The server API: the rest of a backend talks to live connections and durable objects
over HTTP/JSON (docs/server-api.md), as Centrifugo's server API or Pusher's ``trigger``.

Workers serve it on a port of their own (``WSGATE_API_PORT``), with the NATS connection
and the state client they already hold. Every call needs a bearer token: one of
``WSGATE_API_KEYS``, or a JWT verified with the app's ``WSGATE_JWT_*`` keys whose ``scope``
claim holds ``WSGATE_API_JWT_SCOPE``. HTTPS with ``WSGATE_API_TLS_CERT``/``_KEY``.

::

    POST /v1/connections/{id}/send         {"text": str} | {"base64": str}     202
    POST /v1/connections/{id}/close        {"code": int, "reason": str}         202
    POST /v1/objects/{ns}/{name}/broadcast {"text"|"base64", "tag", "exclude"}  200
    GET  /v1/objects/{ns}/{name}/connections?tag=                               200
    POST /v1/objects/{ns}/{name}/call/{method}  {"args": [...], "kwargs": {}}   200
    GET  /v1/objects/{ns}?prefix=&after=&limit=                                 200

Errors are JSON, ``{"error": {"type": ..., "message": ...}}``, with a status that says
which: 400 malformed, 401 no or a bad token, 403 a JWT without the scope, 404 an unknown
connection, namespace or method, 409 a call that would wait for itself, 413 a body or
value over its limit, 500 a method that raised, 503 nothing to serve it, 504 no answer in
time.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import nats.errors
from aiohttp import web
from google.protobuf.message import DecodeError
from nats.aio.client import Client as NatsClient

from wsgate import ids, subjects
from wsgate.closecodes import MAX_REASON_BYTES, is_sendable
from wsgate.errors import (
    CallCycle,
    CallError,
    CallFailed,
    CallTimeout,
    CallTooLarge,
    CallUnavailable,
    InvalidCall,
    InvalidConnectionId,
    LimitExceeded,
    NoSuchMethod,
    StateError,
    StateTimeout,
    StateUnavailable,
    WsgateError,
)
from wsgate.v1 import envelope_pb2 as pb
from wsgate.v1 import state_pb2 as state_pb
from wsgate.values import Value
from wsgate.worker.errors import InvalidMessage, Unauthorized
from wsgate.worker.membership import ObjectMembers
from wsgate.worker.messages import message_envelope
from wsgate.worker.object_calls import ObjectCalls

if TYPE_CHECKING:
    from wsgate.config import WorkerConfig
    from wsgate.worker.app import ObjectClass
    from wsgate.worker.jwt_verifier import JWTVerifier
    from wsgate.worker.state_client import StateClient

log = logging.getLogger(__name__)

#: How long a command waits for its gateway's receipt.
RECEIPT_TIMEOUT_S = 5.0
#: Objects a listing page holds at most (the state service's limit).
MAX_LIST_LIMIT = 1000

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An answer other than success: ``status`` and a typed message."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


#: Each call error's status.
_CALL_STATUS: tuple[tuple[type[CallError], int], ...] = (
    (NoSuchMethod, 404),
    (CallCycle, 409),
    (CallTooLarge, 413),
    (InvalidCall, 400),
    (CallFailed, 500),
    (CallUnavailable, 503),
    (CallTimeout, 504),
)


def error_response(
    status: int, kind: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """The JSON body of a failure."""
    return web.json_response(
        {"error": {"type": kind, "message": message}}, status=status, headers=headers
    )


class ServerApi:
    """The server API's aiohttp application, on ``nc``, ``state`` and ``calls``, for the
    durable ``classes`` of the worker's app (namespace → class)."""

    def __init__(
        self,
        config: WorkerConfig,
        *,
        nc: NatsClient,
        state: StateClient,
        calls: ObjectCalls,
        classes: Mapping[str, type[ObjectClass]],
        jwt: JWTVerifier | None,
    ) -> None:
        self._config = config
        self._nc = nc
        self._state = state
        self._calls = calls
        self._classes = dict(classes)
        self._keys = [key.encode() for key in config.api_key_list]
        self._jwt = jwt
        self._runner: web.AppRunner | None = None
        if not self._keys and jwt is None:
            raise WsgateError(
                "the server API needs WSGATE_API_KEYS or a JWT key (WSGATE_JWT_*): "
                "it takes no call without a token"
            )

    def application(self) -> web.Application:
        """The routes, behind the token check and the error mapping."""
        app = web.Application(
            middlewares=[self._errors, self._authenticated],
            client_max_size=self._config.api_max_body_bytes,
        )
        app.router.add_post("/v1/connections/{id}/send", self._send)
        app.router.add_post("/v1/connections/{id}/close", self._close)
        app.router.add_post("/v1/objects/{ns}/{name}/broadcast", self._broadcast)
        app.router.add_get("/v1/objects/{ns}/{name}/connections", self._connections)
        app.router.add_post("/v1/objects/{ns}/{name}/call/{method}", self._call)
        app.router.add_get("/v1/objects/{ns}", self._list)
        return app

    async def start(self, host: str, port: int) -> int:
        """Listen; the port bound. Raises OSError if it is taken."""
        self._runner = web.AppRunner(self.application(), handle_signals=False, access_log=None)
        await self._runner.setup()
        tls = None
        if self._config.api_tls_cert:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(self._config.api_tls_cert, self._config.api_tls_key)
        await web.TCPSite(self._runner, host, port, ssl_context=tls).start()
        return int(self._runner.addresses[0][1])

    async def close(self) -> None:
        """Stop listening. Idempotent."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # -- middlewares ---------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
            return error_response(exc.status, exc.kind, str(exc), headers)
        except web.HTTPRequestEntityTooLarge:
            limit = self._config.api_max_body_bytes
            return error_response(413, "PayloadTooLarge", f"a body is at most {limit} bytes")
        except web.HTTPException as exc:
            return error_response(exc.status, type(exc).__name__, exc.reason)
        except CallError as exc:
            status = next((s for cls, s in _CALL_STATUS if isinstance(exc, cls)), 500)
            return error_response(status, type(exc).__name__, str(exc))
        except LimitExceeded as exc:
            return error_response(413 if exc.unit == "bytes" else 400, type(exc).__name__, str(exc))
        except (StateUnavailable, StateTimeout) as exc:
            status = 504 if isinstance(exc, StateTimeout) else 503
            return error_response(status, type(exc).__name__, str(exc))
        except (StateError, InvalidMessage, InvalidConnectionId) as exc:
            return error_response(400, type(exc).__name__, str(exc))

    @web.middleware
    async def _authenticated(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "Unauthorized", "a bearer token is required")
        token = token.strip()
        given = token.encode()
        # Every key compared, in constant time each: no early exit says which was close.
        matched = [hmac.compare_digest(given, key) for key in self._keys]
        if any(matched):
            return await handler(request)
        if self._jwt is None or token.count(".") != 2:
            raise ApiError(401, "Unauthorized", "an unknown API key")
        try:
            claims = self._jwt.verify_token(token)
        except Unauthorized as exc:
            raise ApiError(401, "Unauthorized", exc.description) from None
        scope = claims.get("scope")
        scopes = scope.split() if isinstance(scope, str) else []
        if self._config.api_jwt_scope not in scopes:
            raise ApiError(
                403, "Forbidden", f"the token's scope lacks {self._config.api_jwt_scope!r}"
            )
        return await handler(request)

    # -- connections ---------------------------------------------------------------------

    async def _send(self, request: web.Request) -> web.Response:
        connection_id = _connection_id(request)
        body = await _json_object(request)
        message = message_envelope(_payload(body), "send")
        command = pb.GatewayCommand(connection_ids=[connection_id], send=message)
        await self._command(connection_id, command)
        return web.json_response({"sent": 1}, status=202)

    async def _close(self, request: web.Request) -> web.Response:
        connection_id = _connection_id(request)
        body = await _json_object(request)
        code = body.get("code", 1000)
        reason = body.get("reason", "")
        if not isinstance(code, int) or isinstance(code, bool) or not is_sendable(code):
            raise ApiError(
                400, "InvalidCloseCode", f"{code!r} is no close code an endpoint may send"
            )
        if not isinstance(reason, str) or len(reason.encode()) > MAX_REASON_BYTES:
            raise ApiError(
                400, "InvalidCloseCode", f"a reason is a str of at most {MAX_REASON_BYTES} bytes"
            )
        command = pb.GatewayCommand(
            connection_ids=[connection_id], close=pb.CloseConnection(code=code, reason=reason)
        )
        await self._command(connection_id, command)
        return web.json_response({"closing": 1}, status=202)

    async def _command(self, connection_id: str, command: pb.GatewayCommand) -> None:
        """Send ``command`` to its connection's gateway and wait for the receipt: 404 if the
        gateway is gone or does not hold the connection."""
        gateway_id = ids.gateway_of(connection_id)
        subject = subjects.gateway_subject(self._config.prefix, gateway_id)
        batch = pb.GatewayBatch(items=[pb.GatewayItem(command=command)])
        try:
            reply = await self._nc.request(subject, batch.SerializeToString(), RECEIPT_TIMEOUT_S)
        except nats.errors.NoRespondersError:
            raise ApiError(
                404, "UnknownConnection", f"{connection_id}: its gateway is gone"
            ) from None
        except nats.errors.TimeoutError:
            raise ApiError(504, "Timeout", "the gateway did not answer in time") from None
        except nats.errors.Error as exc:
            raise ApiError(503, "BusUnavailable", f"the bus failed: {exc!r}") from None
        try:
            receipt = pb.CommandReceipt.FromString(reply.data)
        except DecodeError:
            raise ApiError(502, "BadReceipt", "the gateway's answer does not parse") from None
        if connection_id in receipt.unknown_connection_ids:
            raise ApiError(404, "UnknownConnection", f"{connection_id} is not connected")

    # -- objects -------------------------------------------------------------------------

    def _namespace(self, request: web.Request) -> str:
        namespace = request.match_info["ns"]
        if namespace not in self._classes:
            raise ApiError(404, "UnknownNamespace", f"no durable class serves {namespace[:80]!r}")
        return namespace

    async def _broadcast(self, request: web.Request) -> web.Response:
        namespace = self._namespace(request)
        body = await _json_object(request)
        tag = body.get("tag")
        exclude = body.get("exclude", [])
        if tag is not None and not isinstance(tag, str):
            raise ApiError(400, "InvalidRequest", "tag is a str")
        if not isinstance(exclude, list) or not all(isinstance(c, str) for c in exclude):
            raise ApiError(400, "InvalidRequest", "exclude is a list of connection ids")
        members = ObjectMembers(self._state, namespace, request.match_info["name"])
        result = await members.broadcast(_payload(body), tag=tag, exclude=exclude)
        return web.json_response({"recipients": result.recipients, "commands": result.commands})

    async def _connections(self, request: web.Request) -> web.Response:
        namespace = self._namespace(request)
        members = ObjectMembers(self._state, namespace, request.match_info["name"])
        found = await members.connections(request.query.get("tag"))
        return web.json_response(
            {
                "connections": [
                    {"id": m.id, "tags": list(m.tags), "state": _jsonable(m.attachment)}
                    for m in found
                ]
            }
        )

    async def _call(self, request: web.Request) -> web.Response:
        namespace = self._namespace(request)
        body = await _json_object(request)
        args = body.get("args", [])
        kwargs = body.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise ApiError(400, "InvalidRequest", "args is a list and kwargs an object")
        value = await self._calls.call(
            namespace, request.match_info["name"], request.match_info["method"], args, kwargs
        )
        return web.json_response({"value": _jsonable(value)})

    async def _list(self, request: web.Request) -> web.Response:
        namespace = request.match_info["ns"]
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            raise ApiError(400, "InvalidRequest", "limit is a number") from None
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise ApiError(400, "InvalidRequest", f"limit is 1..{MAX_LIST_LIMIT}")
        page = await self._state.kv.list_objects(
            state_pb.ListObjectsRequest(
                namespace=namespace,
                prefix=request.query.get("prefix", ""),
                after=request.query.get("after", ""),
                limit=limit,
            )
        )
        objects = [
            {
                "name": s.name,
                "members": s.usage.members,
                "bytes": s.usage.bytes,
                "keys": s.usage.keys,
            }
            for s in page.objects
        ]
        return web.json_response({"objects": objects, "more": page.more})


def _connection_id(request: web.Request) -> str:
    connection_id = request.match_info["id"]
    ids.gateway_of(connection_id)  # InvalidConnectionId: 400
    return connection_id


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json() if request.can_read_body else {}
    except json.JSONDecodeError:
        raise ApiError(400, "InvalidRequest", "the body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "InvalidRequest", "the body is a JSON object")
    return body


def _payload(body: Mapping[str, Any]) -> str | bytes:
    """The message a body carries: ``text`` (a text frame) or ``base64`` (binary)."""
    if "text" in body and isinstance(body["text"], str):
        return str(body["text"])
    if "base64" in body and isinstance(body["base64"], str):
        try:
            return base64.b64decode(body["base64"], validate=True)
        except binascii.Error:
            raise ApiError(400, "InvalidRequest", "base64 does not decode") from None
    raise ApiError(400, "InvalidRequest", 'give the message as "text" (a str) or "base64"')


def _jsonable(value: Value) -> object:
    """A stored value as JSON: bytes as ``{"base64": ...}``."""
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
