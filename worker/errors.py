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
        └── ConnectionClosed             sending on, or closing, a closed connection
            └── NotAccepted              closing before accepting (reject instead)
"""

from __future__ import annotations

from wsgate.errors import WsgateError


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
