"""The worker role and the handler SDK that user code imports.

::

    from worker import Accept, App, Connection, ConnectRequest, Reject
"""

from worker.app import Accept, App, ConnectRequest, Reject, Route
from worker.connection import Connection
from worker.env import Env
from worker.errors import (
    AppLoadError,
    ConnectionClosed,
    InvalidCloseCode,
    InvalidMessage,
    InvalidResponse,
    InvalidRoute,
    NotAccepted,
    WorkerError,
)

__all__ = [
    "Accept",
    "App",
    "AppLoadError",
    "ConnectRequest",
    "Connection",
    "ConnectionClosed",
    "Env",
    "InvalidCloseCode",
    "InvalidMessage",
    "InvalidResponse",
    "InvalidRoute",
    "NotAccepted",
    "Reject",
    "Route",
    "WorkerError",
]
