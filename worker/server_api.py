"""The server API's operations, whatever carries them: the rest of a backend talks to
live connections and durable objects (docs/server-api.md), as Centrifugo's server API or
Pusher's ``trigger``. :mod:`wsgate.worker.server_api_http` serves them as HTTP/JSON,
:mod:`wsgate.worker.server_api_grpc` as gRPC.

Workers serve it, with the NATS connection and the state client they already hold. Every
call needs a bearer token (:meth:`ServerApi.authenticate`): one of ``WSGATE_API_KEYS``, or
a JWT verified with the app's ``WSGATE_JWT_*`` keys whose ``scope`` claim holds
``WSGATE_API_JWT_SCOPE``.

Every failure is an :class:`ApiError`: an HTTP status (the gRPC adapter maps it to a
code) and a type name (:func:`api_error` maps wsgate's exceptions).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import nats.errors
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
from wsgate.worker.membership import BroadcastResult, Member, ObjectMembers
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


class ApiError(Exception):
    """An answer other than success: an HTTP ``status`` and the error's ``kind``."""

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


def api_error(exc: Exception) -> ApiError | None:
    """What a failure of an operation answers (None: not one of wsgate's, a bug: 500)."""
    if isinstance(exc, ApiError):
        return exc
    kind = type(exc).__name__
    if isinstance(exc, CallError):
        status = next((s for cls, s in _CALL_STATUS if isinstance(exc, cls)), 500)
        return ApiError(status, kind, str(exc))
    if isinstance(exc, LimitExceeded):
        return ApiError(413 if exc.unit == "bytes" else 400, kind, str(exc))
    if isinstance(exc, StateTimeout):
        return ApiError(504, kind, str(exc))
    if isinstance(exc, StateUnavailable):
        return ApiError(503, kind, str(exc))
    if isinstance(exc, StateError | InvalidMessage | InvalidConnectionId):
        return ApiError(400, kind, str(exc))
    return None


class ServerApi:
    """The operations, on ``nc``, ``state`` and ``calls``, for the durable ``classes`` of
    the worker's app (namespace → class). Raises WsgateError if no token could ever pass
    (no key and no JWT verifier)."""

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
        self.config = config
        self._nc = nc
        self._state = state
        self._calls = calls
        self._classes = dict(classes)
        self._keys = [key.encode() for key in config.api_key_list]
        self._jwt = jwt
        if not self._keys and jwt is None:
            raise WsgateError(
                "the server API needs WSGATE_API_KEYS or a JWT key (WSGATE_JWT_*): "
                "it takes no call without a token"
            )

    def authenticate(self, authorization: str) -> None:
        """Check an ``Authorization`` value (``Bearer <token>``): ApiError 401 for none or
        a bad one, 403 for a JWT without the scope."""
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "Unauthorized", "a bearer token is required")
        given = token.encode()
        # Every key compared, in constant time each: no early exit says which was close.
        matched = [hmac.compare_digest(given, key) for key in self._keys]
        if any(matched):
            return
        if self._jwt is None or token.count(".") != 2:
            raise ApiError(401, "Unauthorized", "an unknown API key")
        try:
            claims = self._jwt.verify_token(token)
        except Unauthorized as exc:
            raise ApiError(401, "Unauthorized", exc.description) from None
        scope = claims.get("scope")
        if self.config.api_jwt_scope not in (scope.split() if isinstance(scope, str) else []):
            lacks = f"the token's scope lacks {self.config.api_jwt_scope!r}"
            raise ApiError(403, "Forbidden", lacks)

    # -- connections ---------------------------------------------------------------------

    async def send(self, connection_id: str, message: str | bytes) -> None:
        """Send ``message`` to the connection (404 if it is not there)."""
        envelope = message_envelope(message, "send")
        command = pb.GatewayCommand(connection_ids=[connection_id], send=envelope)
        await self._command(connection_id, command)

    async def close(self, connection_id: str, code: int, reason: str) -> None:
        """Close the connection with ``code`` and ``reason`` (400 for a code an endpoint
        may not send or a reason over 123 bytes, 404 if it is not there)."""
        if isinstance(code, bool) or not isinstance(code, int) or not is_sendable(code):
            raise ApiError(400, "InvalidCloseCode", f"{code!r} is no close code one may send")
        if not isinstance(reason, str) or len(reason.encode()) > MAX_REASON_BYTES:
            refused = f"a reason is a str of at most {MAX_REASON_BYTES} bytes"
            raise ApiError(400, "InvalidCloseCode", refused)
        close = pb.CloseConnection(code=code, reason=reason)
        await self._command(
            connection_id, pb.GatewayCommand(connection_ids=[connection_id], close=close)
        )

    async def _command(self, connection_id: str, command: pb.GatewayCommand) -> None:
        """Send ``command`` to its connection's gateway and wait for the receipt: 404 if the
        gateway is gone or does not hold the connection."""
        gateway_id = ids.gateway_of(connection_id)  # InvalidConnectionId: 400
        subject = subjects.gateway_subject(self.config.prefix, gateway_id)
        batch = pb.GatewayBatch(items=[pb.GatewayItem(command=command)])
        try:
            reply = await self._nc.request(subject, batch.SerializeToString(), RECEIPT_TIMEOUT_S)
        except nats.errors.NoRespondersError:
            gone = f"{connection_id}: its gateway is gone"
            raise ApiError(404, "UnknownConnection", gone) from None
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

    def _served(self, namespace: str) -> str:
        if namespace not in self._classes:
            raise ApiError(404, "UnknownNamespace", f"no durable class serves {namespace[:80]!r}")
        return namespace

    async def broadcast(
        self,
        namespace: str,
        name: str,
        message: str | bytes,
        *,
        tag: str | None = None,
        exclude: Sequence[str] = (),
    ) -> BroadcastResult:
        """Send ``message`` to the object's members (with ``tag``), but ``exclude``."""
        members = ObjectMembers(self._state, self._served(namespace), name)
        return await members.broadcast(message, tag=tag, exclude=exclude)

    async def connections(self, namespace: str, name: str, tag: str | None = None) -> list[Member]:
        """The object's connections (with ``tag``), in id order."""
        return await ObjectMembers(self._state, self._served(namespace), name).connections(tag)

    async def call(
        self,
        namespace: str,
        name: str,
        method: str,
        args: Sequence[object],
        kwargs: Mapping[str, object],
    ) -> Value:
        """``method(*args, **kwargs)`` of the object, as one of its turns."""
        return await self._calls.call(self._served(namespace), name, method, args, dict(kwargs))

    async def list_objects(
        self, namespace: str, *, prefix: str = "", after: str = "", limit: int = 100
    ) -> state_pb.ListObjectsResponse:
        """A page of the namespace's objects (``limit``: 1..1000)."""
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise ApiError(400, "InvalidRequest", f"limit is 1..{MAX_LIST_LIMIT}")
        request = state_pb.ListObjectsRequest(
            namespace=namespace, prefix=prefix, after=after, limit=limit
        )
        return await self._state.kv.list_objects(request)
