"""The worker role and the handler SDK that user code imports.

::

    from worker import Accept, App, Connection, ConnectRequest, DurableObject, Reject
    from worker import JWTVerifier, Unauthorized  # authentication at connect
"""

from worker.app import Accept, App, ConnectRequest, Reject, Route
from worker.auth import Authenticator
from worker.connection import Connection
from worker.durable import DurableObject, Peer
from worker.env import Env
from worker.errors import (
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
from worker.jwt_verifier import JWTVerifier
from worker.state_client import ObjectStorage, Transaction

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
