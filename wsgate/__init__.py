"""wsgate: Cloudflare-Workers-style WebSockets with Durable Objects, self-hosted.

User code imports everything from here::

    from wsgate import Accept, App, Connection, ConnectRequest, DurableObject, Reject
    from wsgate import JWTVerifier, Unauthorized  # authentication at connect
    from wsgate import ObjectQuotaExceeded, StateError  # typed refusals of the state service

``wsgate`` is the only top-level import name the distribution installs. The roles live in
the repository's top-level folders (the layout is fixed) and are installed inside this
package by ``pyproject.toml``'s ``package-dir``: ``gateway/`` is ``wsgate.gateway``,
``worker/`` is ``wsgate.worker``, ``stateservice/`` is ``wsgate.stateservice`` and
``examples/`` is ``wsgate.examples``. The rest of ``wsgate/`` is the kernel all roles share
(generated protobuf code, subjects, ids, configuration, the value codec, errors) and, at
the top, the CLI, ``wsgate dev`` and ``wsgate bench`` (docs/architecture.md, "Packages and
layers").

The names below are loaded on first use (PEP 562), so a gateway or a state service that
imports ``wsgate.config`` does not load the handler SDK with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    # The handler SDK.
    "Accept": "wsgate.worker.app",
    "App": "wsgate.worker.app",
    "ConnectRequest": "wsgate.worker.app",
    "Reject": "wsgate.worker.app",
    "Route": "wsgate.worker.app",
    "Authenticator": "wsgate.worker.auth",
    "Connection": "wsgate.worker.connection",
    "HttpRequest": "wsgate.worker.http",
    "Response": "wsgate.worker.http",
    "DurableObject": "wsgate.worker.durable",
    "Peer": "wsgate.worker.durable",
    "Env": "wsgate.worker.env",
    "AlarmInfo": "wsgate.worker.alarms_client",
    "ObjectAlarm": "wsgate.worker.alarms_client",
    "BroadcastResult": "wsgate.worker.membership",
    "JWTVerifier": "wsgate.worker.jwt_verifier",
    "ObjectStorage": "wsgate.worker.object_storage",
    "Transaction": "wsgate.worker.object_storage",
    # Errors raised to handler code.
    "AppLoadError": "wsgate.worker.errors",
    "AuthFailure": "wsgate.worker.errors",
    "ConnectionClosed": "wsgate.worker.errors",
    "InvalidCloseCode": "wsgate.worker.errors",
    "InvalidMessage": "wsgate.worker.errors",
    "InvalidResponse": "wsgate.worker.errors",
    "InvalidRoute": "wsgate.worker.errors",
    "NoConnectionState": "wsgate.worker.errors",
    "NotAccepted": "wsgate.worker.errors",
    "TurnOver": "wsgate.worker.errors",
    "Unauthorized": "wsgate.worker.errors",
    "WorkerError": "wsgate.worker.errors",
    "WsgateError": "wsgate.errors",
    "StateError": "wsgate.errors",
    "StateUnavailable": "wsgate.errors",
    "StateTimeout": "wsgate.errors",
    "InvalidValue": "wsgate.errors",
    "InvalidObjectId": "wsgate.errors",
    "TransactionAborted": "wsgate.errors",
    "LimitExceeded": "wsgate.errors",
    "KeyTooLarge": "wsgate.errors",
    "ValueTooLarge": "wsgate.errors",
    "TooManyKeys": "wsgate.errors",
    "TooManyTags": "wsgate.errors",
    "TagTooLarge": "wsgate.errors",
    "AttachmentTooLarge": "wsgate.errors",
    "ObjectNameTooLong": "wsgate.errors",
    "ObjectQuotaExceeded": "wsgate.errors",
    "TooManyObjectKeys": "wsgate.errors",
    "ObjectTooLarge": "wsgate.errors",
    "TooManyMembers": "wsgate.errors",
    "StorageFull": "wsgate.errors",
    "CallCycle": "wsgate.errors",
    "CallError": "wsgate.errors",
    "CallFailed": "wsgate.errors",
    "CallTimeout": "wsgate.errors",
    "CallTooLarge": "wsgate.errors",
    "CallUnavailable": "wsgate.errors",
    "InvalidCall": "wsgate.errors",
    "NoSuchMethod": "wsgate.errors",
    "ObjectNamespace": "wsgate.worker.object_calls",
    "ObjectStub": "wsgate.worker.object_calls",
    "StorableValue": "wsgate.values",
    "Value": "wsgate.values",
}

__all__ = [
    "Accept",
    "AlarmInfo",
    "App",
    "AppLoadError",
    "AttachmentTooLarge",
    "AuthFailure",
    "Authenticator",
    "BroadcastResult",
    "CallCycle",
    "CallError",
    "CallFailed",
    "CallTimeout",
    "CallTooLarge",
    "CallUnavailable",
    "ConnectRequest",
    "Connection",
    "ConnectionClosed",
    "DurableObject",
    "Env",
    "HttpRequest",
    "InvalidCall",
    "InvalidCloseCode",
    "InvalidMessage",
    "InvalidObjectId",
    "InvalidResponse",
    "InvalidRoute",
    "InvalidValue",
    "JWTVerifier",
    "KeyTooLarge",
    "LimitExceeded",
    "NoConnectionState",
    "NoSuchMethod",
    "NotAccepted",
    "ObjectAlarm",
    "ObjectNameTooLong",
    "ObjectNamespace",
    "ObjectQuotaExceeded",
    "ObjectStorage",
    "ObjectStub",
    "ObjectTooLarge",
    "Peer",
    "Reject",
    "Response",
    "Route",
    "StateError",
    "StateTimeout",
    "StateUnavailable",
    "StorableValue",
    "StorageFull",
    "TagTooLarge",
    "TooManyKeys",
    "TooManyMembers",
    "TooManyObjectKeys",
    "TooManyTags",
    "Transaction",
    "TransactionAborted",
    "TurnOver",
    "Unauthorized",
    "Value",
    "ValueTooLarge",
    "WorkerError",
    "WsgateError",
]

if TYPE_CHECKING:
    from wsgate.errors import (
        AttachmentTooLarge,
        CallCycle,
        CallError,
        CallFailed,
        CallTimeout,
        CallTooLarge,
        CallUnavailable,
        InvalidCall,
        InvalidObjectId,
        InvalidValue,
        KeyTooLarge,
        LimitExceeded,
        NoSuchMethod,
        ObjectNameTooLong,
        ObjectQuotaExceeded,
        ObjectTooLarge,
        StateError,
        StateTimeout,
        StateUnavailable,
        StorageFull,
        TagTooLarge,
        TooManyKeys,
        TooManyMembers,
        TooManyObjectKeys,
        TooManyTags,
        TransactionAborted,
        ValueTooLarge,
        WsgateError,
    )
    from wsgate.values import StorableValue, Value
    from wsgate.worker.alarms_client import AlarmInfo, ObjectAlarm
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
    from wsgate.worker.http import HttpRequest, Response
    from wsgate.worker.jwt_verifier import JWTVerifier
    from wsgate.worker.membership import BroadcastResult
    from wsgate.worker.object_calls import ObjectNamespace, ObjectStub
    from wsgate.worker.object_storage import ObjectStorage, Transaction


def __getattr__(name: str) -> object:
    """Load a public name from its module on first use, then keep it here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'wsgate' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
