"""The worker role and the handler SDK that user code imports.

::

    from wsgate import Accept, App, Connection, ConnectRequest, DurableObject, Reject
    from wsgate import JWTVerifier, Unauthorized  # authentication at connect
"""

from wsgate.worker.app import Accept, App, ConnectRequest, Reject, Route
from wsgate.worker.auth import Authenticator
from wsgate.worker.connection import Connection
from wsgate.worker.durable import DurableObject, Peer
from wsgate.worker.env import Env
from wsgate.worker.errors import (
    AppLoadError,
    AuthFailure,
    ConnectionClosed,
    InvalidCloseCode,
    InvalidMessage,
    InvalidResponse,
    InvalidRoute,
    NoConnectionState,
    NotAccepted,
    TurnOver,
    Unauthorized,
    WorkerError,
)
from wsgate.worker.jwt_verifier import JWTVerifier
from wsgate.worker.object_storage import ObjectStorage, Transaction

__all__ = [
    "Accept",
    "App",
    "AppLoadError",
    "AuthFailure",
    "Authenticator",
    "ConnectRequest",
    "Connection",
    "ConnectionClosed",
    "DurableObject",
    "Env",
    "InvalidCloseCode",
    "InvalidMessage",
    "InvalidResponse",
    "InvalidRoute",
    "JWTVerifier",
    "NoConnectionState",
    "NotAccepted",
    "ObjectStorage",
    "Peer",
    "Reject",
    "Route",
    "Transaction",
    "TurnOver",
    "Unauthorized",
    "WorkerError",
]
