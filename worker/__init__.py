"""The worker role and the handler SDK that user code imports.

::

    from worker import Accept, App, Connection, ConnectRequest, DurableObject, Reject
"""

from worker.app import Accept, App, ConnectRequest, Reject, Route
from worker.connection import Connection
from worker.durable import DurableObject, Peer
from worker.env import Env
from worker.errors import (
    AppLoadError,
    ConnectionClosed,
    InvalidCloseCode,
    InvalidMessage,
    InvalidResponse,
    InvalidRoute,
    NoConnectionState,
    NotAccepted,
    TurnOver,
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
    "DurableObject",
    "Env",
    "InvalidCloseCode",
    "InvalidMessage",
    "InvalidResponse",
    "InvalidRoute",
    "NoConnectionState",
    "NotAccepted",
    "ObjectStorage",
    "Peer",
    "Reject",
    "Route",
    "Transaction",
    "TurnOver",
    "WorkerError",
]
