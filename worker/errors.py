"""Errors of the worker SDK, raised to handler code that misuses it.

::

    WsgateError
    └── WorkerError
        ├── AppLoadError                 --app does not name an App
        ├── InvalidRoute(ValueError)     a malformed or duplicate route pattern
        ├── InvalidResponse(ValueError)  a Reject status outside 400-599, a bad subprotocol
        ├── InvalidMessage(TypeError)    sending something other than str or bytes
        ├── InvalidCloseCode(ValueError) a close code an endpoint may not send, a long reason
        ├── NoConnectionState            conn.state outside a durable object's handlers
        ├── TurnOver                     a durable object's storage or connection used by
        │                                a task that outlived the turn that made it
        ├── Unauthorized                 a connect's credentials were refused (its
        │                                AuthFailure); uncaught in on_connect, a 401
        └── ConnectionClosed             sending on, or closing, a closed connection
            └── NotAccepted              closing before accepting (reject instead)
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from wsgate.errors import WsgateError

if TYPE_CHECKING:
    from wsgate.worker.app import Reject


class WorkerError(WsgateError):
    """Root of the worker SDK's errors."""


class AppLoadError(WorkerError):
    """The ``module:attribute`` given as the app cannot be imported or is not an App."""


class InvalidRoute(WorkerError, ValueError):
    """A route pattern is malformed, or the same pattern is registered twice."""


class InvalidResponse(WorkerError, ValueError):
    """A connect decision cannot be sent: a status outside 400-599, or a subprotocol the
    client did not offer."""


class InvalidMessage(WorkerError, TypeError):
    """Only ``str`` (a text frame) and ``bytes`` (a binary frame) can be sent."""


class InvalidCloseCode(WorkerError, ValueError):
    """The close code may not be sent (RFC 6455 7.4), or the reason is over 123 bytes."""

    def __init__(self, code: int, reason_bytes: int, message: str) -> None:
        self.code = code
        self.reason_bytes = reason_bytes
        super().__init__(message)


class ConnectionClosed(WorkerError):
    """The connection is closed (or closing): nothing more can be sent on it."""

    def __init__(self, connection_id: str, message: str = "") -> None:
        self.connection_id = connection_id
        super().__init__(message or f"connection {connection_id} is closed")


class NotAccepted(ConnectionClosed):
    """``close()`` was called in the connect handler: return ``Reject(...)`` instead."""


class NoConnectionState(WorkerError):
    """``conn.state`` exists only in a durable object's handlers, once the connection is
    accepted (in ``on_connect``, give it with ``Accept(state=...)``)."""


class TurnOver(WorkerError):
    """A durable object's storage, alarm or connection was used after the turn (the event's
    handler) that it belongs to had ended: a task the handler started and did not await.
    The turn's writes and output were already committed without it."""


class AuthFailure(enum.Enum):
    """Why credentials were refused: the value is the metric label, :attr:`description`
    the short text the client gets. None of them says anything about the keys."""

    MISSING_TOKEN = "missing_token"
    MALFORMED = "malformed"
    ALGORITHM_NOT_ALLOWED = "algorithm_not_allowed"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    WRONG_AUDIENCE = "wrong_audience"
    WRONG_ISSUER = "wrong_issuer"
    MISSING_CLAIM = "missing_claim"
    INVALID_CLAIM = "invalid_claim"

    @property
    def description(self) -> str:
        """The short reason, e.g. ``token expired``."""
        return _AUTH_DESCRIPTIONS[self]


_AUTH_DESCRIPTIONS = {
    AuthFailure.MISSING_TOKEN: "missing token",
    AuthFailure.MALFORMED: "malformed token",
    AuthFailure.ALGORITHM_NOT_ALLOWED: "algorithm not allowed",
    AuthFailure.UNKNOWN_KEY: "unknown key",
    AuthFailure.BAD_SIGNATURE: "bad signature",
    AuthFailure.EXPIRED: "token expired",
    AuthFailure.NOT_YET_VALID: "token not yet valid",
    AuthFailure.WRONG_AUDIENCE: "wrong audience",
    AuthFailure.WRONG_ISSUER: "wrong issuer",
    AuthFailure.MISSING_CLAIM: "missing claim",
    AuthFailure.INVALID_CLAIM: "invalid claim",
}


class Unauthorized(WorkerError):
    """A connect's credentials were refused, for ``reason``. Raised by
    ``JWTVerifier.verify`` (and any :class:`~wsgate.worker.auth.Authenticator`); left uncaught in
    ``on_connect``, it answers the upgrade as :meth:`reject` does, like returning it.

    ``description`` is what the client reads (the reason's, or a more precise one such as
    ``missing claim: sub``): never anything about a key.
    """

    def __init__(self, reason: AuthFailure, description: str = "") -> None:
        self.reason = reason
        self.description = description or reason.description
        super().__init__(self.description)

    def reject(self) -> Reject:
        """The answer: 401, the description as the body, and ``WWW-Authenticate: Bearer``
        with ``error="invalid_token"`` and the description (RFC 6750 3.1; a request with
        no token gets the bare challenge, as the RFC asks)."""
        from wsgate.worker.app import Reject

        if self.reason is AuthFailure.MISSING_TOKEN:
            challenge = "Bearer"
        else:
            quoted = self.description.replace("\\", "\\\\").replace('"', '\\"')
            challenge = f'Bearer error="invalid_token", error_description="{quoted}"'
        return Reject(401, self.description, headers={"WWW-Authenticate": challenge})
