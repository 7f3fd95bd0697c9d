"""The worker role and the handler SDK that user code imports.

::

    from worker import Accept, App, Connection, ConnectRequest, Reject, Transaction
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
from worker.state_client import ObjectStorage, Transaction

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
    "ObjectStorage",
    "Reject",
    "Route",
    "Transaction",
    "WorkerError",
]
